//! Asking for a passphrase on a terminal (the console in early boot, the
//! user's terminal after it): echo off while it is typed, restored after
//! whatever happens, an optional timeout, Esc or an empty entry as "no".
//! `unlock_loop` is the pure state machine of the boot's tries.

use crate::util::secret::{MAX_PASSPHRASE, Secret, wipe};
use anyhow::{Context, Result};
use nix::sys::termios::{self, LocalFlags, SetArg};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// What one question got.
#[derive(Debug)]
pub enum Entry {
    Line(Secret),
    /// Enter alone: the user does not want to unlock now.
    Empty,
    /// Esc, end of input, or Ctrl-C/Ctrl-D.
    Cancelled,
    Timeout,
}

/// Echo off on `tty` until dropped (nothing to do when it is no terminal).
struct NoEcho<'a> {
    tty: &'a File,
    saved: Option<termios::Termios>,
}

impl<'a> NoEcho<'a> {
    fn new(tty: &'a File) -> NoEcho<'a> {
        let saved = termios::tcgetattr(tty.as_fd()).ok();
        if let Some(t) = &saved {
            let mut quiet = t.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            quiet.local_flags.insert(LocalFlags::ECHONL);
            let _ = termios::tcsetattr(tty.as_fd(), SetArg::TCSAFLUSH, &quiet);
        }
        NoEcho { tty, saved }
    }
}

impl Drop for NoEcho<'_> {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = termios::tcsetattr(self.tty.as_fd(), SetArg::TCSAFLUSH, t);
        }
    }
}

/// Print `prompt` on `out` and read one line from `tty` with echo off. The bytes go
/// straight into the secret's buffer (no copy left behind); longer than
/// `MAX_PASSPHRASE`: read to the end of the line and refused.
pub fn ask_hidden(
    tty: &File,
    out: &mut dyn Write,
    prompt: &str,
    timeout: Option<Duration>,
) -> Result<Entry> {
    // echo off before the question shows: nothing typed after it is echoed
    let _quiet = NoEcho::new(tty);
    out.write_all(prompt.as_bytes())
        .context("writing the prompt")?;
    out.flush()?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut line: Vec<u8> = Vec::with_capacity(MAX_PASSPHRASE + 1);
    let mut too_long = false;
    let mut byte = [0u8; 1];
    let mut input = tty;
    loop {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [nix::poll::PollFd::new(
                tty.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, ms) {
                Ok(0) if left.as_millis() <= u128::from(u16::MAX) => {
                    wipe(&mut line);
                    let _ = out.write_all(b"\n");
                    return Ok(Entry::Timeout);
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waiting for the passphrase"),
            }
            if fds[0].revents().is_none_or(|r| r.is_empty()) {
                continue;
            }
        }
        match input.read(&mut byte) {
            Ok(0) => {
                wipe(&mut line);
                return Ok(Entry::Cancelled);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                wipe(&mut line);
                return Err(e).context("reading the passphrase");
            }
        }
        let c = byte[0];
        byte[0] = 0;
        match c {
            b'\n' | b'\r' => break,
            // Esc, Ctrl-C, Ctrl-D (raw or uncooked consoles)
            0x1b | 0x03 | 0x04 => {
                wipe(&mut line);
                let _ = out.write_all(b"\n");
                return Ok(Entry::Cancelled);
            }
            _ if line.len() >= MAX_PASSPHRASE => too_long = true,
            _ => line.push(c),
        }
    }
    if too_long {
        wipe(&mut line);
        anyhow::bail!("the passphrase is longer than {MAX_PASSPHRASE} bytes");
    }
    if line.is_empty() {
        return Ok(Entry::Empty);
    }
    Ok(Entry::Line(Secret::new(line)?))
}

/// How the tries at boot ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Unlocked<T> {
    /// Opened, at this try (1-based), with what `attempt` returned.
    Open { value: T, try_no: u32 },
    /// Not opened: why, for the RAM mode's reason.
    Locked(String),
}

/// The boot's tries: ask, try, at most `tries` times. An empty entry, Esc
/// or a timeout ends at once (the user chose RAM mode); a wrong
/// passphrase asks again, saying how many tries are left; an error while
/// trying ends (nothing is retried on a device that failed).
/// `ask(n, left)`: question `n`; `attempt`: `Ok(Some(v))` opened,
/// `Ok(None)` wrong passphrase.
pub fn unlock_loop<T>(
    tries: u32,
    mut ask: impl FnMut(u32) -> Result<Entry>,
    mut attempt: impl FnMut(&Secret) -> Result<Option<T>>,
    mut say: impl FnMut(&str),
) -> Unlocked<T> {
    for n in 1..=tries {
        let entry = match ask(n) {
            Ok(e) => e,
            Err(e) => return Unlocked::Locked(format!("reading the passphrase failed: {e:#}")),
        };
        let pass = match entry {
            Entry::Line(p) => p,
            Entry::Empty => return Unlocked::Locked("no passphrase entered".into()),
            Entry::Cancelled => {
                return Unlocked::Locked("the passphrase prompt was cancelled".into());
            }
            Entry::Timeout => {
                return Unlocked::Locked("nobody answered the passphrase prompt in time".into());
            }
        };
        match attempt(&pass) {
            Ok(Some(value)) => return Unlocked::Open { value, try_no: n },
            Ok(None) if n < tries => say(&format!(
                "Wrong passphrase; {} {} left.",
                tries - n,
                if tries - n == 1 { "try" } else { "tries" }
            )),
            Ok(None) => {}
            Err(e) => return Unlocked::Locked(format!("unlocking failed: {e:#}")),
        }
    }
    Unlocked::Locked(format!("{tries} wrong passphrases"))
}

/// A new passphrase: asked twice (`ask(false)` the first entry,
/// `ask(true)` the repeat), the same both times; entries that differ are
/// asked again, at most `tries` times. An empty entry, Esc or a timeout
/// ends at once: `Err` with why.
pub fn new_passphrase_loop(
    tries: u32,
    mut ask: impl FnMut(bool) -> Result<Entry>,
    mut say: impl FnMut(&str),
) -> Result<Secret, String> {
    let line = |e: Result<Entry>| match e {
        Ok(Entry::Line(p)) => Ok(p),
        Ok(Entry::Empty) => Err("no passphrase entered".to_string()),
        Ok(Entry::Cancelled) => Err("the passphrase prompt was cancelled".to_string()),
        Ok(Entry::Timeout) => Err("nobody answered the passphrase prompt in time".to_string()),
        Err(e) => Err(format!("reading the passphrase failed: {e:#}")),
    };
    for n in 1..=tries {
        let first = line(ask(false))?;
        let again = line(ask(true))?;
        if first.same_as(&again) {
            return Ok(first);
        }
        if n < tries {
            say("The two entries differ; once more.");
        }
    }
    Err(format!("the two entries differed {tries} times"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Entry {
        Entry::Line(Secret::new(s.as_bytes().to_vec()).unwrap())
    }

    fn run(entries: Vec<Entry>, good: &str) -> (Unlocked<()>, Vec<String>, usize) {
        let mut entries = entries.into_iter();
        let mut said = vec![];
        let mut attempts = 0;
        let r = unlock_loop(
            3,
            |_| Ok(entries.next().unwrap_or(Entry::Cancelled)),
            |p| {
                attempts += 1;
                Ok((p.expose() == good.as_bytes()).then_some(()))
            },
            |s| said.push(s.to_string()),
        );
        (r, said, attempts)
    }

    #[test]
    fn a_new_passphrase_is_the_same_twice() {
        let mut q = vec![line("a"), line("b"), line("c"), line("c")].into_iter();
        let mut said = vec![];
        let mut asked = vec![];
        let r = new_passphrase_loop(
            3,
            |again| {
                asked.push(again);
                Ok(q.next().unwrap())
            },
            |s| said.push(s.to_string()),
        );
        assert_eq!(r.unwrap().expose(), b"c");
        assert_eq!(asked, [false, true, false, true]);
        assert_eq!(said, ["The two entries differ; once more."]);
        let mut q = vec![line("a"), line("b"), line("c"), line("d")].into_iter();
        assert!(
            new_passphrase_loop(2, |_| Ok(q.next().unwrap()), |_| {})
                .unwrap_err()
                .contains("differed 2 times")
        );
        for (e, why) in [(Entry::Empty, "no passphrase"), (Entry::Timeout, "in time")] {
            let mut q = vec![line("a"), e].into_iter();
            let r = new_passphrase_loop(3, |_| Ok(q.next().unwrap()), |_| {});
            assert!(r.unwrap_err().contains(why));
        }
    }

    #[test]
    fn three_tries_then_locked() {
        let (r, said, n) = run(vec![line("a"), line("b"), line("c"), line("good")], "good");
        assert_eq!(r, Unlocked::Locked("3 wrong passphrases".into()));
        assert_eq!(n, 3, "never a fourth try");
        assert_eq!(
            said,
            [
                "Wrong passphrase; 2 tries left.",
                "Wrong passphrase; 1 try left."
            ]
        );
    }

    #[test]
    fn opens_at_the_try_it_is_right() {
        let (r, said, _) = run(vec![line("a"), line("good")], "good");
        assert_eq!(
            r,
            Unlocked::Open {
                value: (),
                try_no: 2
            }
        );
        assert_eq!(said.len(), 1);
    }

    #[test]
    fn empty_esc_or_timeout_end_at_once_without_trying() {
        for (e, why) in [
            (Entry::Empty, "no passphrase"),
            (Entry::Cancelled, "cancelled"),
            (Entry::Timeout, "in time"),
        ] {
            let (r, _, n) = run(vec![e, line("good")], "good");
            assert!(
                matches!(&r, Unlocked::Locked(m) if m.contains(why)),
                "{r:?}"
            );
            assert_eq!(n, 0, "nothing tried on the device");
        }
        let (r, _, n) = run(vec![line("x"), Entry::Empty], "good");
        assert!(matches!(r, Unlocked::Locked(_)) && n == 1);
    }

    #[test]
    fn an_error_while_trying_is_not_retried() {
        let mut n = 0;
        let r: Unlocked<()> = unlock_loop(
            3,
            |_| Ok(line("x")),
            |_| {
                n += 1;
                anyhow::bail!("device-mapper missing")
            },
            |_| {},
        );
        assert!(matches!(r, Unlocked::Locked(m) if m.contains("device-mapper missing")));
        assert_eq!(n, 1);
    }

    #[test]
    fn reading_from_a_pipe_stops_at_the_newline_and_refuses_long_lines() {
        let read = |input: &[u8]| {
            let (r, w) = nix::unistd::pipe().unwrap();
            let mut w = File::from(w);
            w.write_all(input).unwrap();
            drop(w);
            let mut shown = vec![];
            let e = ask_hidden(
                &File::from(r),
                &mut shown,
                "Passphrase: ",
                Some(Duration::from_secs(2)),
            );
            assert!(shown.starts_with(b"Passphrase: "));
            assert!(!shown.windows(3).any(|w| w == b"hun"), "never echoed");
            e
        };
        assert!(
            matches!(read(b"hunter2\nrest").unwrap(), Entry::Line(s) if s.expose() == b"hunter2")
        );
        assert!(matches!(read(b"\n").unwrap(), Entry::Empty));
        assert!(matches!(read(b"ab\x1bcd\n").unwrap(), Entry::Cancelled));
        assert!(matches!(read(b"").unwrap(), Entry::Cancelled));
        let mut long = vec![b'a'; MAX_PASSPHRASE + 10];
        long.push(b'\n');
        assert!(read(&long).is_err());
        long.drain(..10);
        assert!(matches!(read(&long).unwrap(), Entry::Line(s) if s.len() == MAX_PASSPHRASE));
        // nobody answers: a timeout, not a hang
        let (r, _w) = nix::unistd::pipe().unwrap();
        let t0 = Instant::now();
        let e = ask_hidden(
            &File::from(r),
            &mut vec![],
            "",
            Some(Duration::from_millis(300)),
        )
        .unwrap();
        assert!(matches!(e, Entry::Timeout), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
