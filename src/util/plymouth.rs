//! Asking for a passphrase through plymouth when its daemon runs (a boot
//! splash owns the screen: a question on the console would be hidden
//! under it). `plymouth --ping` says whether plymouthd runs;
//! `plymouth ask-for-password --prompt=…` shows the question and prints
//! the answer on its stdout, read here into a `Secret` (never logged).
//! One answer per call: the tries are `prompt::unlock_loop`'s, as on the
//! console.

use crate::util::prompt::Entry;
use crate::util::secret::{MAX_PASSPHRASE, Secret, wipe};
use anyhow::{Context, Result};
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DIRS: &[&str] = &["/usr/bin", "/bin", "/usr/sbin", "/sbin"];

/// The plymouth client in the initramfs, if any.
pub fn find() -> Option<PathBuf> {
    find_in(DIRS.iter().map(Path::new))
}

fn find_in<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    dirs.into_iter()
        .map(|d| d.join("plymouth"))
        .find(|p| p.is_file())
}

/// Which prompt asks: plymouth when its client is there and its daemon
/// answers `ping`, else `None` (the console). `ping` is not called when
/// there is no client.
pub fn choose(client: Option<PathBuf>, ping: impl FnOnce(&Path) -> bool) -> Option<PathBuf> {
    client.filter(|c| ping(c))
}

pub fn ping_args() -> Vec<String> {
    vec!["--ping".into()]
}

/// `ask-for-password`: one question, the answer on stdout. The prompt is
/// one line (plymouth shows it in a single text entry).
pub fn ask_args(prompt: &str) -> Vec<String> {
    let one_line = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    vec!["ask-for-password".into(), format!("--prompt={one_line}")]
}

pub fn message_args(text: &str) -> Vec<String> {
    vec!["display-message".into(), format!("--text={text}")]
}

/// Does plymouthd run? (`plymouth --ping` exits 0.)
pub fn running(client: &Path) -> bool {
    Command::new(client)
        .args(ping_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Show `text` on the splash (a wrong passphrase's "tries left").
pub fn say(client: &Path, text: &str) {
    let r = Command::new(client)
        .args(message_args(text))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = r {
        log::warn!("plymouth display-message: {e}");
    }
}

/// What plymouth's answer means: a failed client (plymouthd gone, the
/// question cancelled) is `Cancelled`; nothing, or a lone newline, is
/// `Empty`; else the passphrase (one trailing newline is not part of
/// it). Longer than `MAX_PASSPHRASE`: refused, as on the console.
pub fn entry_from_answer(success: bool, mut out: Vec<u8>) -> Result<Entry> {
    if !success {
        wipe(&mut out);
        return Ok(Entry::Cancelled);
    }
    if out.is_empty() || out == b"\n" {
        return Ok(Entry::Empty);
    }
    if out.len() > MAX_PASSPHRASE + usize::from(out.last() == Some(&b'\n')) {
        wipe(&mut out);
        anyhow::bail!("the passphrase is longer than {MAX_PASSPHRASE} bytes");
    }
    Ok(Entry::Line(Secret::from_file_bytes(out)?))
}

/// Ask `prompt` through plymouth; nobody answering within `timeout`: the
/// client is killed, `Timeout`.
pub fn ask(client: &Path, prompt: &str, timeout: Option<Duration>) -> Result<Entry> {
    let args = ask_args(prompt);
    // the command line holds the question, never the answer
    log::info!(
        "asking through plymouth: {} {}",
        client.display(),
        args.join(" ")
    );
    let mut child = Command::new(client)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", client.display()))?;
    let mut out = child.stdout.take().context("plymouth's stdout")?;
    let deadline = timeout.map(|t| Instant::now() + t);
    // room for the longest passphrase, its newline and one byte more
    // (then it is too long): never reallocated, so no copy is left behind
    let cap = MAX_PASSPHRASE + 2;
    let mut answer: Vec<u8> = Vec::with_capacity(cap);
    let mut too_long = false;
    let mut chunk = [0u8; 64];
    loop {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [nix::poll::PollFd::new(
                out.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, ms) {
                Ok(0) if left.as_millis() <= u128::from(u16::MAX) => {
                    wipe(&mut answer);
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(Entry::Timeout);
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    wipe(&mut answer);
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e).context("waiting for plymouth's answer");
                }
            }
            if fds[0].revents().is_none_or(|r| r.is_empty()) {
                continue;
            }
        }
        let n = match out.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                wipe(&mut answer);
                wipe(&mut chunk);
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).context("reading plymouth's answer");
            }
        };
        if n == 0 {
            break;
        }
        if answer.len() + n > cap {
            too_long = true;
        } else {
            answer.extend_from_slice(&chunk[..n]);
        }
        wipe(&mut chunk);
    }
    let status = child.wait().context("waiting for plymouth")?;
    if too_long {
        wipe(&mut answer);
        anyhow::bail!("the passphrase is longer than {MAX_PASSPHRASE} bytes");
    }
    entry_from_answer(status.success(), answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn plymouth_only_when_its_client_is_there_and_its_daemon_answers() {
        let mut pinged = false;
        assert_eq!(
            choose(None, |_| {
                pinged = true;
                true
            }),
            None
        );
        assert!(!pinged, "no client: nothing to ping");
        let c = PathBuf::from("/usr/bin/plymouth");
        assert_eq!(choose(Some(c.clone()), |_| false), None, "no daemon");
        assert_eq!(choose(Some(c.clone()), |p| p == c), Some(c));
    }

    #[test]
    fn the_arguments() {
        assert_eq!(ping_args(), ["--ping"]);
        assert_eq!(
            ask_args(
                "\nPassphrase for the encrypted persistence on /dev/sda3 (Enter alone: RAM): "
            ),
            [
                "ask-for-password",
                "--prompt=Passphrase for the encrypted persistence on /dev/sda3 (Enter alone: RAM):"
            ]
        );
        assert_eq!(
            message_args("Wrong passphrase; 2 tries left."),
            ["display-message", "--text=Wrong passphrase; 2 tries left."]
        );
    }

    #[test]
    fn what_an_answer_means() {
        let e = |ok, s: &[u8]| entry_from_answer(ok, s.to_vec());
        assert!(matches!(e(true, b"hunter2").unwrap(), Entry::Line(s) if s.expose() == b"hunter2"));
        assert!(
            matches!(e(true, b"hunter2\n").unwrap(), Entry::Line(s) if s.expose() == b"hunter2")
        );
        assert!(matches!(e(true, b"").unwrap(), Entry::Empty));
        assert!(matches!(e(true, b"\n").unwrap(), Entry::Empty));
        assert!(matches!(e(false, b"hunter2").unwrap(), Entry::Cancelled));
        let long = vec![b'a'; MAX_PASSPHRASE];
        assert!(matches!(e(true, &long).unwrap(), Entry::Line(s) if s.len() == MAX_PASSPHRASE));
        let mut nl = long.clone();
        nl.push(b'\n');
        assert!(matches!(e(true, &nl).unwrap(), Entry::Line(s) if s.len() == MAX_PASSPHRASE));
        let mut over = long;
        over.push(b'a');
        assert!(e(true, &over).is_err());
    }

    /// A stand-in client (a shell script): the arguments it got, the
    /// answer it printed, how it exited.
    fn fake(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("plymouth");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn asking_a_client() {
        let d = crate::util::testutil::tmp("plymouth-ask");
        let args = d.join("args");
        let c = fake(
            &d,
            &format!(
                "printf '%s\\n' \"$@\" >'{}'; [ \"$1\" = --ping ] && exit 0; printf hunter2",
                args.display()
            ),
        );
        assert!(running(&c));
        assert_eq!(std::fs::read_to_string(&args).unwrap(), "--ping\n");
        assert_eq!(find_in([d.as_path()]), Some(c.clone()));
        let e = ask(&c, "Passphrase: ", Some(Duration::from_secs(10))).unwrap();
        assert!(matches!(e, Entry::Line(s) if s.expose() == b"hunter2"));
        assert_eq!(
            std::fs::read_to_string(&args).unwrap(),
            "ask-for-password\n--prompt=Passphrase:\n"
        );
        // plymouthd gone: the client fails, the question counts as cancelled
        let c = fake(&d, "exit 1");
        assert!(!running(&c));
        assert!(matches!(ask(&c, "P", None).unwrap(), Entry::Cancelled));
        let c = fake(&d, "printf ''");
        assert!(matches!(ask(&c, "P", None).unwrap(), Entry::Empty));
        let c = fake(
            &d,
            &format!("head -c {} /dev/zero | tr '\\0' a", MAX_PASSPHRASE + 40),
        );
        assert!(ask(&c, "P", None).is_err());
        // nobody answers: a timeout, the client killed, not a hang
        let c = fake(&d, "exec sleep 30");
        let t0 = Instant::now();
        let e = ask(&c, "P", Some(Duration::from_millis(300))).unwrap();
        assert!(matches!(e, Entry::Timeout), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(find_in([d.join("none").as_path()]), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
