//! Root tests of the companion against a local attacker (security review,
//! issue 17): each test acts as uid 65534 (`setpriv`) where the attack is
//! a user's, and says what happened on the code before the fix.
//!
//! - (a) the locks in the run dir: a user cannot hold them; a holder (root)
//!   makes `sync` fail after a bounded wait (`MADOS_PERSISTENCE_LOCK_WAIT`,
//!   seconds), naming the holder, instead of hanging.
//! - (b) a hot path whose parent dir is swapped for a symlink into /dev
//!   (`/dev/pts`): pinning, capture and the read-ahead open nothing there,
//!   and a session leader never takes the pty as its controlling terminal.
//! - (c) a pinned small file grown far past the budget between the decision
//!   and the pin: the locked memory stays within the budget.
//! - (d) the capture of a 1 TiB sparse file: bounded memory.

mod common;

use common::*;
use mados_persistence::companion::heat::{FileId, PinPlan};
use mados_persistence::companion::hotset::HotFile;
use mados_persistence::companion::pin::{self, Pin};
use mados_persistence::companion::pinset::PinSet;
use mados_persistence::companion::prefetch;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tests that measure this process's locked or resident memory run one at
/// a time.
static MEM: Mutex<()> = Mutex::new(());

fn setpriv(script: &str) -> Command {
    as_nobody_cmd(&["sh", "-c", script])
}

/// Run `script` as uid 65534; its output.
fn as_nobody(script: &str) -> std::process::Output {
    setpriv(script).output().expect("running setpriv")
}

fn spawn_as_nobody(script: &str) -> Child {
    setpriv(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running setpriv")
}

fn chown_nobody(p: &Path) {
    std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// A dir of uid 65534 (what a user owns: their home, a dir in /tmp).
fn user_dir(tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_nobody(&d);
    d
}

/// Opens of one node, counted with inotify (`IN_OPEN`).
struct Opens(i32);

impl Opens {
    fn watch(p: &Path) -> Opens {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain syscalls on a fresh inotify fd and a C string.
        unsafe {
            let fd = nix::libc::inotify_init1(nix::libc::IN_NONBLOCK | nix::libc::IN_CLOEXEC);
            assert!(fd >= 0);
            assert!(nix::libc::inotify_add_watch(fd, c.as_ptr(), nix::libc::IN_OPEN) >= 0);
            Opens(fd)
        }
    }

    /// Opens since the last call.
    fn count(&self) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer we own.
            let r = unsafe { nix::libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                return n;
            }
            let mut at = 0usize;
            while at + 16 <= r as usize {
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                n += 1;
                at += 16 + len;
            }
        }
    }
}

impl Drop for Opens {
    fn drop(&mut self) {
        // SAFETY: our own fd, closed once.
        unsafe { nix::libc::close(self.0) };
    }
}

fn id_of(p: &Path) -> FileId {
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

fn state_with_a_tier(run: &Path) {
    let st = mados_persistence::boot::state::State {
        version: 1,
        mode: "persistent".into(),
        ..Default::default()
    };
    let mut v = serde_json::to_value(st).unwrap();
    let t = run.join("tier");
    let s = |n: &str| t.join(n).display().to_string();
    v["tiers"] = serde_json::json!([{
        "dir": s("dir"), "base": s("base"), "lower": s("lower"), "stage": s("stage"),
        "tmp": s("tmp"), "upper": s("upper"), "work": s("work"), "excluded": []
    }]);
    std::fs::write(run.join("state.json"), serde_json::to_vec(&v).unwrap()).unwrap();
}

/// (a) The review: `/run/mados-persistence/*.lock` were 0644 and `flock`
/// needs only a read-only fd, so a user holding `sync.lock` stopped every
/// sync, the final one at shutdown too, and one holding `daemon.lock` kept
/// the daemon from starting.
///
/// Fails without the fix: the user's `flock -n sync.lock sleep 60` held
/// the 0644 file and `Lock::take` (blocking, the old `take(p, true)`) was
/// still waiting after 10 s (`Err(Timeout)`); the test stopped there, so
/// the `sync` part below ran only with the fix (without it, `sync` took
/// the lock with a blocking `flock` and no timeout).
#[test]
fn a_user_cannot_hold_the_locks_and_a_held_lock_is_not_waited_on_forever() {
    if !require_root("a_user_cannot_hold_the_locks_and_a_held_lock_is_not_waited_on_forever") {
        return;
    }
    let run = tmpdir("attack-lock");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in ["sync.lock", "daemon.lock"] {
        let p = run.join(name);
        // left 0644 by an earlier release this boot
        std::fs::write(&p, b"").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        // the daemon takes it once (and fchmods it), then lets go
        drop(mados_persistence::companion::Lock::take(&p, Some(Duration::from_secs(5))).unwrap());
        // the user tries to take it now
        let mut holder = spawn_as_nobody(&format!("exec flock -n {} sleep 60", p.display()));
        std::thread::sleep(Duration::from_millis(300));
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(
                mados_persistence::companion::Lock::take(&p2, Some(Duration::from_secs(30)))
                    .map(|_| ()),
            );
        });
        let got = rx.recv_timeout(Duration::from_secs(10));
        let _ = holder.kill();
        let out = holder.wait_with_output().unwrap();
        assert!(
            matches!(got, Ok(Ok(()))),
            "{name}: the daemon could not take its lock within 10 s: {got:?}"
        );
        assert!(!out.status.success(), "{name}: the user held the lock");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{name}: {err}");
        assert_eq!(
            std::fs::metadata(&p).unwrap().mode() & 0o777,
            0o600,
            "{name}: fchmod'ed to 0600"
        );
    }

    // a holder the user cannot be (root): `sync` fails after the wait,
    // naming the holder, instead of hanging
    state_with_a_tier(&run);
    let mut root_holder = Command::new("flock")
        .args([run.join("sync.lock").to_str().unwrap(), "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut sync = Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
        .arg("sync")
        .env("MADOS_PERSISTENCE_RUN", &run)
        .env("MADOS_PERSISTENCE_LOCK_WAIT", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hung = true;
    while t0.elapsed() < Duration::from_secs(20) {
        if sync.try_wait().unwrap().is_some() {
            hung = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if hung {
        let _ = sync.kill();
    }
    let out = sync.wait_with_output().unwrap();
    let _ = root_holder.kill();
    let _ = root_holder.wait();
    assert!(!hung, "sync was still waiting on the lock after 20 s");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", root_holder.id())) && err.contains("flock"),
        "the holder is named: {err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    std::fs::remove_dir_all(&run).unwrap();
}

/// A pty from /dev/ptmx: the master (held) and the slave's number.
fn open_pty() -> (std::fs::File, String) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt and friends on a fresh fd we own.
    unsafe {
        let m = nix::libc::posix_openpt(nix::libc::O_RDWR | nix::libc::O_NOCTTY);
        assert!(m >= 0);
        assert_eq!(nix::libc::grantpt(m), 0);
        assert_eq!(nix::libc::unlockpt(m), 0);
        let mut buf = [0 as nix::libc::c_char; 64];
        assert_eq!(nix::libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()), 0);
        let name = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        (
            std::fs::File::from_raw_fd(m),
            name.rsplit('/').next().unwrap().to_string(),
        )
    }
}

/// The child of `a_hot_path_swapped_into_dev_opens_nothing_there`: a
/// session leader without a tty (as the daemon under systemd) pins the
/// path it is given and says whether it got a controlling terminal.
#[test]
fn pty_child() {
    let Some(p) = std::env::var_os("MADOS_ATTACK_PIN") else {
        return;
    };
    let r = Pin::new(Path::new(&p));
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let tty_nr: i64 = after.split_whitespace().nth(4).unwrap().parse().unwrap();
    println!("PIN={} TTY_NR={tty_nr}", r.is_ok());
}

/// (b) The review: pinning opened a hot path with `O_NOFOLLOW` on the last
/// component only and without `O_NOCTTY`; a user swapped a parent dir for a
/// symlink to /dev/pts, the daemon (a session leader without a tty) took
/// the pty as its controlling terminal, the user closed the master: SIGHUP,
/// exit 0, not restarted.
///
/// Fails without the fix: the session-leader child printed `PIN=false
/// TTY_NR=34816`: `Pin::new` refused the pty as not a regular file, but
/// had opened it first and taken it as its controlling terminal. (The test
/// stopped there; the capture, read-ahead and race checks below ran only
/// with the fix: 0 opens of the pty, ~1/3 of the 400 racing pins made,
/// each of the real file.)
#[test]
fn a_hot_path_swapped_into_dev_opens_nothing_there() {
    if !require_root("a_hot_path_swapped_into_dev_opens_nothing_there") {
        return;
    }
    let _g = MEM.lock().unwrap_or_else(|e| e.into_inner());
    let d = user_dir("attack-pty");
    let (_master, n) = open_pty();
    let pts = PathBuf::from("/dev/pts").join(&n);
    // the file the decision was made on: <d>/sub/<n>, the user's
    let out = as_nobody(&format!(
        "cd {} && mkdir sub && head -c 8192 /dev/zero > sub/{n}",
        d.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let hot = d.join("sub").join(&n);
    let real = id_of(&hot);
    assert!(Pin::new(&hot).is_ok(), "the file itself is pinned");
    // the user swaps the parent for a symlink into /dev/pts
    let out = as_nobody(&format!(
        "cd {} && mv sub real && ln -s /dev/pts sub",
        d.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let opens = Opens::watch(&pts);

    // a session leader (the daemon under systemd) pins it
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["pty_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("MADOS_ATTACK_PIN", &hot);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            nix::unistd::setsid().map(|_| ()).map_err(|e| e.into())
        });
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PIN=false"), "{text}");
    assert!(
        text.contains("TTY_NR=0"),
        "the pinning session leader took the pty as its terminal: {text}"
    );
    assert_eq!(opens.count(), 0, "Pin::new opened the pty");

    // the hot set's capture and the read-ahead, the same
    assert!(prefetch::capture(hot.to_str().unwrap(), 1.0).is_none());
    assert_eq!(opens.count(), 0, "capture opened the pty");
    let hf = HotFile {
        path: hot.display().to_string(),
        ino: real.1,
        size: 8192,
        mtime_ns: 0,
        heat: 1.0,
        ranges: vec![(0, 8192)],
    };
    let shared: prefetch::SharedRef = Default::default();
    prefetch::start_pass(
        Arc::new(vec![hf]),
        true,
        1 << 30,
        Duration::from_secs(10),
        shared.clone(),
    )
    .join()
    .unwrap();
    assert_eq!(opens.count(), 0, "the read-ahead opened the pty");
    assert_eq!(shared.lock().unwrap().measure.read_files, 0);

    // the race: the user flips the parent back and forth while the daemon
    // pins; only the real file is ever mapped, the pty never opened
    let out = as_nobody(&format!("cd {} && rm sub && mv real sub", d.display()));
    assert!(out.status.success(), "{out:?}");
    let mut swapper = spawn_as_nobody(&format!(
        "cd {} && while :; do mv sub real; ln -s /dev/pts sub; rm sub; mv real sub; done",
        d.display()
    ));
    let (mut pinned, mut refused) = (0, 0);
    for _ in 0..400 {
        match Pin::new(&hot) {
            Ok(p) => {
                assert_eq!(p.id, real, "something else than the file was mapped");
                pinned += 1;
            }
            Err(_) => refused += 1,
        }
    }
    let _ = swapper.kill();
    let _ = swapper.wait();
    assert_eq!(opens.count(), 0, "a pin opened the pty in the race");
    eprintln!("race: {pinned} pinned, {refused} refused");
    let _ = std::fs::remove_dir_all(&d);
}

/// The most this process had locked while `f` ran (`VmLck`, sampled every
/// millisecond), above what it had before, in KiB.
fn peak_locked_during(f: impl FnOnce()) -> u64 {
    let base = pin::locked_kib().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(pin::locked_kib().unwrap());
            std::thread::sleep(Duration::from_millis(1));
        }
        peak.max(pin::locked_kib().unwrap())
    });
    f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap().saturating_sub(base)
}

/// (c) The review: `Pin::new` mapped and locked the whole file before the
/// budget check: a pinned 8 KiB file truncated to 2 GiB locked 2 GiB
/// against a 64 MiB budget.
///
/// Fails without the fix: 1048576 KiB locked at the peak against a
/// 65536 KiB budget (the pin was dropped after, over the budget).
#[test]
fn a_file_grown_past_the_budget_is_never_locked_past_it() {
    if !require_root("a_file_grown_past_the_budget_is_never_locked_past_it") {
        return;
    }
    let _g = MEM.lock().unwrap_or_else(|e| e.into_inner());
    const BUDGET: u64 = 64 << 20;
    // with CAP_IPC_LOCK (root) the memlock limit does not apply
    let _ = pin::raise_memlock(4 << 30);
    let d = user_dir("attack-budget");
    let f = d.join("small");
    let out = as_nobody(&format!("head -c 8192 /dev/zero > {}", f.display()));
    assert!(out.status.success(), "{out:?}");
    let id = id_of(&f);
    let plan = PinPlan {
        pin: vec![id],
        unpin: vec![],
        bytes: 8192,
    };
    // decided at 8 KiB; grown to 1 GiB (sparse) by the user before the pin
    let out = as_nobody(&format!("truncate -s 1G {}", f.display()));
    assert!(out.status.success(), "{out:?}");
    let mut set = PinSet::default();
    let peak = peak_locked_during(|| {
        set.apply(&plan, |_| Some(f.clone()), BUDGET);
    });
    assert!(
        peak <= BUDGET / 1024,
        "{peak} KiB locked at the peak, budget {} KiB",
        BUDGET / 1024
    );
    assert!(set.is_empty());

    // pinned small, then grown: `refresh` pins it again within the budget
    let out = as_nobody(&format!("truncate -s 8192 {}", f.display()));
    assert!(out.status.success(), "{out:?}");
    set.apply(&plan, |_| Some(f.clone()), BUDGET);
    assert_eq!(set.len(), 1);
    let out = as_nobody(&format!("truncate -s 1G {}", f.display()));
    assert!(out.status.success(), "{out:?}");
    let peak = peak_locked_during(|| {
        set.refresh(BUDGET);
    });
    assert!(peak <= BUDGET / 1024, "refresh: {peak} KiB locked");
    assert!(set.bytes() <= BUDGET);

    // the race: the user flips the size while the daemon pins, 200 times
    let mut flipper = spawn_as_nobody(&format!(
        "while :; do truncate -s 256M {f}; truncate -s 8192 {f}; done",
        f = f.display()
    ));
    let peak = peak_locked_during(|| {
        for _ in 0..200 {
            let mut set = PinSet::default();
            set.apply(&plan, |_| Some(f.clone()), BUDGET);
            assert!(set.bytes() <= BUDGET);
        }
    });
    let _ = flipper.kill();
    let _ = flipper.wait();
    assert!(peak <= BUDGET / 1024, "race: {peak} KiB locked at the peak");
    let _ = std::fs::remove_dir_all(&d);
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// (d) The review: the hot-set capture allocated 2 bytes a page of a
/// file's size (a 1 TiB sparse file: +520 MB), at SIGTERM, before the
/// final sync.
///
/// Fails without the fix: the peak RSS grew by 524 MiB (two vectors of
/// 256 Mi entries) during one capture.
#[test]
fn the_capture_of_a_huge_sparse_file_has_bounded_memory() {
    if !require_root("the_capture_of_a_huge_sparse_file_has_bounded_memory") {
        return;
    }
    let _g = MEM.lock().unwrap_or_else(|e| e.into_inner());
    let d = user_dir("attack-sparse");
    let f = d.join("huge");
    let out = as_nobody(&format!("truncate -s 1T {}", f.display()));
    assert!(out.status.success(), "{out:?}");
    // reset the peak RSS (VmHWM) to the RSS now
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss = status_kib("VmRSS:");
    let t0 = Instant::now();
    let h = prefetch::capture(f.to_str().unwrap(), 1.0);
    let took = t0.elapsed();
    let grew = status_kib("VmHWM:").saturating_sub(rss);
    eprintln!("capture of 1 TiB sparse: {took:?}, peak RSS +{grew} KiB");
    assert!(grew < 16 << 10, "the peak RSS grew by {grew} KiB");
    let h = h.expect("a regular file is captured");
    assert_eq!(h.size, 1 << 40);
    assert!(h.ranges.len() <= mados_persistence::companion::hotset::MAX_RANGES);
    let _ = std::fs::remove_dir_all(&d);
}
