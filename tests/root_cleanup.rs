//! Root test of the temp cleanup on a real tmpfs, against real processes:
//! a file held open, one only mapped, one locked, a process's cwd and its
//! chroot, a socket, a FIFO, a symlink to a file outside, a mount point
//! inside. One pass (with the clock two hours ahead, since ctime cannot be
//! set back) must remove exactly the unused old entries; once the
//! processes are gone, the next pass removes the rest. The space held by a
//! deleted-but-open file is reported with its holder.

mod common;

use common::*;
use mados_persistence::companion::cleanup;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn listing(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn cleanup_never_removes_what_is_in_use() {
    if !require_root("cleanup_never_removes_what_is_in_use") {
        return;
    }
    private_mounts();
    let d = tmpdir("cleanup");
    let t = d.join("tmp");
    let outside = d.join("outside");
    fs::create_dir_all(&t).unwrap();
    fs::create_dir_all(&outside).unwrap();
    sh(&format!("mount -t tmpfs -o size=64M tmp {}", t.display()));
    // only a dir in RAM is cleaned: this tmpfs, not /proc (nor a disk)
    assert_eq!(mados_persistence::companion::cleanup::in_ram(&t), Ok(()));
    let why = mados_persistence::companion::cleanup::in_ram(Path::new("/proc")).unwrap_err();
    assert!(why.contains("not in RAM"), "{why}");
    let w = |rel: &str, data: &str| {
        let p = t.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    };
    w("plain", "old and unused");
    w("deep/er/file", "old and unused");
    w("open", "held open by a child");
    w("mapped", "mapped, not open");
    w("locked", "flocked, then closed by nobody");
    w("cwd/inside", "in a child's cwd");
    w("root/inside", "in a child's root");
    fs::create_dir_all(t.join("mnt")).unwrap();
    fs::create_dir_all(t.join(".X11-unix")).unwrap();
    fs::write(outside.join("target"), "outside").unwrap();
    std::os::unix::fs::symlink(outside.join("target"), t.join("link")).unwrap();
    nix::unistd::mkfifo(
        &t.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let sock = std::os::unix::net::UnixListener::bind(t.join("sock")).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=1M inner {0}/mnt && echo x > {0}/mnt/under-a-mount",
        t.display()
    ));

    // the users
    let mut open_child = Command::new("sh")
        .args([
            "-c",
            &format!("exec 3<{}/open; exec sleep 600", t.display()),
        ])
        .spawn()
        .unwrap();
    let mut cwd_child = Command::new("sleep")
        .arg("600")
        .current_dir(t.join("cwd"))
        .spawn()
        .unwrap();
    // a child whose root is t/root: forked, it only makes system calls
    let root_c = std::ffi::CString::new(t.join("root").display().to_string()).unwrap();
    // SAFETY: the child calls only alarm, chroot, pause and _exit
    let root_pid = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => unsafe {
            // gone by itself if the test dies first (it shares its stdout)
            nix::libc::alarm(120);
            if nix::libc::chroot(root_c.as_ptr()) != 0 {
                nix::libc::_exit(1);
            }
            loop {
                nix::libc::pause();
            }
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    let mapped = fs::File::open(t.join("mapped")).unwrap();
    // SAFETY: a private read-only mapping of a file nobody truncates here
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(4096).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
            &mapped,
            0,
        )
        .unwrap()
    };
    drop(mapped);
    let locked = fs::File::open(t.join("locked")).unwrap();
    let lock = nix::fcntl::Flock::lock(locked, nix::fcntl::FlockArg::LockShared).unwrap();
    // a deleted file still open, for the report
    fs::write(t.join("gone"), vec![7u8; 1 << 20]).unwrap();
    let gone = fs::File::open(t.join("gone")).unwrap();
    fs::remove_file(t.join("gone")).unwrap();
    // let the children open, map and settle
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        nix::sys::wait::waitpid(root_pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).unwrap(),
        nix::sys::wait::WaitStatus::StillAlive,
        "the chroot child failed"
    );

    let now = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 7200) as i64;
    let before = listing(&t);
    let pass = cleanup::run(&[t.as_path()], Path::new("/proc"), now, 600)
        .pop()
        .unwrap()
        .unwrap();
    let after = listing(&t);
    let removed: BTreeSet<&str> = before.difference(&after).map(String::as_str).collect();
    let want: BTreeSet<&str> = ["plain", "deep", "deep/er", "deep/er/file", "link"].into();
    assert_eq!(removed, want, "pass {pass:?}");
    assert!(pass.errors.is_empty(), "{pass:?}");
    assert_eq!(pass.files, 3, "{pass:?}");
    assert!(outside.join("target").exists(), "followed the symlink");
    assert!(t.join("mnt/under-a-mount").exists(), "crossed a mount");
    for kept in [
        "open",
        "mapped",
        "locked",
        "cwd/inside",
        "fifo",
        "sock",
        ".X11-unix",
    ] {
        assert!(
            t.join(kept).symlink_metadata().is_ok(),
            "{kept} was removed"
        );
    }
    assert!(
        t.join("root/inside").exists(),
        "a process's root was removed"
    );

    // the deleted-but-open file is reported, with this process as holder
    let held = cleanup::deleted_open(Path::new("/proc"));
    let me = std::process::id().to_string();
    let g = held
        .iter()
        .find(|h| h.path.ends_with("/tmp/gone"))
        .unwrap_or_else(|| panic!("not reported: {held:?}"));
    assert!(g.bytes >= 1 << 20, "{g:?}");
    assert!(
        g.holders.iter().any(|h| h.starts_with(&format!("{me} "))),
        "{g:?}"
    );
    drop(gone);
    assert!(
        !cleanup::deleted_open(Path::new("/proc"))
            .iter()
            .any(|h| h.path.ends_with("/tmp/gone")),
        "still reported after close"
    );

    // the users go; the next pass removes what they held
    for c in [&mut open_child, &mut cwd_child] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    nix::sys::signal::kill(root_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    nix::sys::wait::waitpid(root_pid, None).unwrap();
    // SAFETY: unmapping the mapping made above
    unsafe { nix::sys::mman::munmap(map, 4096).unwrap() };
    drop(lock);
    let pass = cleanup::run(&[t.as_path()], Path::new("/proc"), now, 600)
        .pop()
        .unwrap()
        .unwrap();
    let left = listing(&t);
    for gone in ["open", "mapped", "locked", "cwd", "cwd/inside", "root"] {
        assert!(
            !left.contains(gone),
            "{gone} still there after its user left: {pass:?}"
        );
    }
    let expect_left: BTreeSet<String> = ["fifo", "sock", ".X11-unix", "mnt"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let top: BTreeSet<String> = left.iter().filter(|p| !p.contains('/')).cloned().collect();
    assert_eq!(top, expect_left);
    drop(sock);
    sh(&format!("umount {0}/mnt && umount {0}", t.display()));
    let _ = fs::remove_dir_all(&d);
}
