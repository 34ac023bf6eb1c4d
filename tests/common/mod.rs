//! Helpers shared by the integration tests: real images made by the same
//! tools distributions use, and the root/CI skip rule.
#![allow(dead_code)]

pub mod tier;

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Tests that need root may skip only when run unprivileged outside CI.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root, and CI must not skip it");
    }
    eprintln!("SKIP {test}: needs root (run the test suite as root to include it)");
    false
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mados-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Build a stick image with tests/fixtures/mkimage and enlarge it.
pub fn image(layout: &str, dir: &Path, grow_to: Option<u64>) -> PathBuf {
    let out = dir.join(format!("{layout}.img"));
    let st = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mkimage"
    ))
    .arg(layout)
    .arg(&out)
    .status()
    .expect("running tests/fixtures/mkimage (needs xorriso, mtools, dosfstools, grub)");
    assert!(st.success(), "mkimage {layout} failed");
    if let Some(size) = grow_to {
        let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        f.set_len(size).unwrap();
    }
    out
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A loop device over `size` bytes of `image` from `start` (a partition
/// of a stick image, as the kernel would show it); its path.
pub fn loop_part(image: &str, start: u64, size: u64) -> String {
    run(
        "losetup",
        &[
            "-f",
            "--show",
            "-o",
            &start.to_string(),
            "--sizelimit",
            &size.to_string(),
            image,
        ],
    )
    .trim()
    .to_string()
}

/// Bytes of `path` in [start, end).
pub fn bytes(path: &Path, start: u64, end: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut b = vec![0u8; (end - start) as usize];
    f.read_exact(&mut b).unwrap();
    b
}

/// A loop device over a file, detached (with its partitions) when dropped.
/// Attached with partition scanning, so that detaching drops the partitions
/// BLKPG added (without it they outlive the detach).
pub struct LoopDev(pub String);

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        LoopDev(
            run("losetup", &["-P", "-f", "--show", file.to_str().unwrap()])
                .trim()
                .to_string(),
        )
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("partx").args(["-d", &self.0]).status();
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Run a shell script in a private mount namespace; its mounts die with it.
pub fn in_namespace(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .output()
        .expect("running unshare")
}

/// xorshift64*: a fixed seed gives the same cases on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The unprivileged user the attack tests act as.
pub const NOBODY: u32 = 65534;

/// `args` run as uid/gid 65534 without supplementary groups (`setpriv`).
pub fn as_nobody_cmd(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args);
    c
}

/// `setxattr(path, name, value)` done by uid/gid 65534 (a forked child
/// that drops its ids first; only raw syscalls after the fork). Whether
/// the kernel let it.
pub fn setxattr_as_nobody(path: &Path, name: &str, value: &[u8]) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: the child makes raw syscalls only (no allocation) and exits.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            let ok = nix::libc::setgroups(0, std::ptr::null()) == 0
                && nix::libc::setresgid(NOBODY, NOBODY, NOBODY) == 0
                && nix::libc::setresuid(NOBODY, NOBODY, NOBODY) == 0
                && nix::libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                ) == 0;
            nix::libc::_exit(if ok { 0 } else { 1 })
        },
        nix::unistd::ForkResult::Parent { child } => matches!(
            nix::sys::wait::waitpid(child, None),
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0))
        ),
    }
}

/// This thread's own private mount namespace: its mounts die with it and
/// none leaks into the host's.
pub fn private_mounts() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("making / private");
}

/// The binary under test run with `args`, stdin closed.
pub fn mp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A command's stdout then stderr, as text.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
