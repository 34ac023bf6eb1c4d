//! Root tests of the set-aside restore and delete against hostile input
//! (security review of the `sa` merge): a crafted `.mados/restore.json`
//! (names that leave `set-aside/`, the dir itself, a symlink, a FIFO, a
//! huge file), and `set-aside delete` of a tree a user wrote into while it
//! was layered (`/var/tmp` in the old release's `/var` upper): symlinks
//! and hard links out of it, a FIFO, a tree deeper than the fds a process
//! may hold. Each case names what happened on the code it was written on.

mod common;

use common::tier::sh;
use common::*;
use mados_persistence::boot::iso_build::IsoBuild;
use mados_persistence::boot::set_aside::{self, Outcome};
use mados_persistence::util::safefs::Dir;
use std::fs;
use std::path::Path;

fn build() -> IsoBuild {
    IsoBuild {
        label: "MADOS_202611".into(),
        uuid: "2026-11-01-00-00-00-00".into(),
    }
}

/// A partition root with overlays in place, one set-aside dir of the
/// booted build, and a victim outside the partition.
fn scene(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = tmpdir(tag);
    let pm = d.join("pm");
    fs::create_dir_all(pm.join("overlays/etc/upper")).unwrap();
    fs::write(pm.join("overlays/etc/upper/now"), "now").unwrap();
    let a = pm.join("set-aside/old");
    fs::create_dir_all(a.join("overlays/etc/upper")).unwrap();
    fs::write(a.join("overlays/etc/upper/then"), "then").unwrap();
    set_aside::write_meta(&Dir::open(&a).unwrap(), &build()).unwrap();
    let victim = d.join("victim");
    fs::create_dir_all(victim.join("overlays/etc")).unwrap();
    fs::write(victim.join("secret"), "root's").unwrap();
    (pm, victim)
}

fn victim_intact(victim: &Path) {
    assert_eq!(fs::read_to_string(victim.join("secret")).unwrap(), "root's");
    assert!(victim.join("overlays/etc").is_dir());
}

fn journal(pm: &Path, body: &str) {
    fs::create_dir_all(pm.join(".mados")).unwrap();
    let _ = fs::remove_file(pm.join(".mados/restore.json"));
    fs::write(pm.join(".mados/restore.json"), body).unwrap();
}

/// Names that leave `set-aside/` (or are no one dir) are refused, and the
/// journal is dropped: nothing outside is touched, the overlays in place
/// stay.
#[test]
fn a_hostile_journal_moves_nothing_outside_and_is_dropped() {
    if !require_root("a_hostile_journal_moves_nothing_outside_and_is_dropped") {
        return;
    }
    let (pm, victim) = scene("atk-sa-journal");
    let rel_victim = format!("../../{}", victim.file_name().unwrap().to_string_lossy());
    let names = [
        "..",
        "../..",
        rel_victim.as_str(),
        "/etc",
        victim.to_str().unwrap(),
        "old/overlays",
        "",
        "%2E%2E",
        "%2Fetc",
        "old%00x",
        "a%2F..%2F..",
    ];
    for name in names {
        for started in [
            serde_json::Value::Null,
            serde_json::json!({"aside": "..", "ino": 1}),
            serde_json::json!({"aside": rel_victim, "ino": 1}),
        ] {
            let body = serde_json::json!({"name": name, "requested_at": 1, "started": started});
            journal(&pm, &body.to_string());
            let r = set_aside::restore(&pm, Some(&build()));
            victim_intact(&victim);
            assert_eq!(
                fs::read_to_string(pm.join("overlays/etc/upper/now")).unwrap(),
                "now",
                "{name:?}: {r:?}"
            );
            assert!(
                matches!(r, Ok(Some(Outcome::Dropped(_)))),
                "{name:?} {started}: {r:?}"
            );
            assert!(!pm.join(".mados/restore.json").exists(), "{name:?}");
        }
    }
}

/// `.` passed the journal's one-name check (`Path::components` yields one
/// `CurDir`, which `check_rel` allows): the restore then failed at every
/// boot (`lstat(".")` is refused), the journal never dropped. Now dropped.
#[test]
fn a_journal_naming_the_set_aside_dir_itself_is_dropped() {
    if !require_root("a_journal_naming_the_set_aside_dir_itself_is_dropped") {
        return;
    }
    let (pm, victim) = scene("atk-sa-dot");
    for (name, aside) in [(".", None), ("old", Some(".")), ("%2E", None)] {
        let started = aside.map(|a| serde_json::json!({"aside": a, "ino": 1}));
        journal(
            &pm,
            &serde_json::json!({"name": name, "requested_at": 1, "started": started}).to_string(),
        );
        let r = set_aside::restore(&pm, Some(&build()));
        victim_intact(&victim);
        assert!(
            matches!(r, Ok(Some(Outcome::Dropped(_)))),
            "{name:?} {aside:?}: {r:?}"
        );
        assert!(!pm.join(".mados/restore.json").exists(), "{name:?}");
    }
}

/// The journal as a symlink to a root file, a FIFO (a read would block
/// the boot), a huge sparse file: never read through, dropped.
#[test]
fn a_journal_that_is_no_small_regular_file_is_dropped_unread() {
    if !require_root("a_journal_that_is_no_small_regular_file_is_dropped_unread") {
        return;
    }
    let (pm, victim) = scene("atk-sa-kinds");
    let j = pm.join(".mados/restore.json");
    fs::create_dir_all(pm.join(".mados")).unwrap();
    // a symlink to a JSON that would be a valid request
    let good = pm.parent().unwrap().join("good.json");
    fs::write(&good, r#"{"name":"old","requested_at":1}"#).unwrap();
    std::os::unix::fs::symlink(&good, &j).unwrap();
    let r = set_aside::restore(&pm, Some(&build()));
    assert!(matches!(r, Ok(Some(Outcome::Dropped(_)))), "{r:?}");
    assert!(pm.join("overlays/etc/upper/now").exists(), "not restored");
    assert!(good.exists());
    let _ = fs::remove_file(&j);
    nix::unistd::mkfifo(&j, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let t0 = std::time::Instant::now();
    let r = set_aside::restore(&pm, Some(&build()));
    assert!(t0.elapsed().as_secs() < 5, "blocked on the FIFO");
    assert!(matches!(r, Ok(Some(Outcome::Dropped(_)))), "{r:?}");
    let _ = fs::remove_file(&j);
    let f = fs::File::create(&j).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    let t0 = std::time::Instant::now();
    let r = set_aside::restore(&pm, Some(&build()));
    assert!(t0.elapsed().as_secs() < 5, "read the huge file");
    assert!(matches!(r, Ok(Some(Outcome::Dropped(_)))), "{r:?}");
    victim_intact(&victim);
}

/// `set-aside delete` of a tree a user wrote: a symlink to the victim's
/// dir, a hard link to a file outside, a FIFO; bad names refused.
#[test]
fn delete_removes_only_the_set_aside_tree() {
    if !require_root("delete_removes_only_the_set_aside_tree") {
        return;
    }
    let (pm, victim) = scene("atk-sa-delete");
    let t = pm.join("set-aside/old/overlays/var/upper/tmp");
    fs::create_dir_all(&t).unwrap();
    std::os::unix::fs::symlink(&victim, t.join("link")).unwrap();
    std::os::unix::fs::symlink(victim.join("secret"), t.join("flink")).unwrap();
    nix::unistd::mkfifo(
        &t.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    // a hard link to a file outside the set-aside dir (same filesystem)
    fs::write(pm.join("outside"), "kept").unwrap();
    fs::hard_link(pm.join("outside"), t.join("hard")).unwrap();
    sh(&format!("chown -R 65534:65534 {}", t.display()));
    let root = Dir::open(&pm).unwrap();
    for bad in [
        "..",
        "../..",
        "",
        "/",
        "old/overlays",
        "%2E%2E",
        ".",
        ".mados",
    ] {
        assert!(set_aside::delete(&root, bad).is_err(), "{bad:?}");
    }
    assert!(pm.join("set-aside/old").exists());
    let freed = set_aside::delete(&root, "old").unwrap();
    assert!(freed.is_some());
    assert!(!pm.join("set-aside/old").exists());
    assert_eq!(fs::read_dir(pm.join("set-aside")).unwrap().count(), 0);
    assert_eq!(fs::read_to_string(pm.join("outside")).unwrap(), "kept");
    assert!(pm.join("overlays/etc/upper/now").exists());
    victim_intact(&victim);
}

/// A user's tree deeper than the fds a process may hold (the CLI's
/// usual soft limit, 1024): the walk and the removal keep one fd a level
/// (`tree_size`, `Dir::remove_all`). A delete that fails leaves the dir
/// renamed `.deleting-*`, and every later delete purges those first.
#[test]
fn delete_copes_with_a_tree_deeper_than_the_fd_limit() {
    if !require_root("delete_copes_with_a_tree_deeper_than_the_fd_limit") {
        return;
    }
    let (pm, _victim) = scene("atk-sa-deep");
    let t = pm.join("set-aside/old/overlays/var/upper/tmp");
    fs::create_dir_all(&t).unwrap();
    fs::create_dir_all(pm.join("set-aside/other/overlays")).unwrap();
    // 1,500 levels, made by fd
    let mut fd = nix::fcntl::open(
        &t,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    for _ in 0..1500 {
        nix::sys::stat::mkdirat(&fd, "d", nix::sys::stat::Mode::from_bits_truncate(0o755)).unwrap();
        fd = nix::fcntl::openat(
            &fd,
            "d",
            nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
    }
    drop(fd);
    // as the CLI runs: a soft limit of 1024 fds, the main thread's 8 MiB stack
    let pm2 = pm.clone();
    let r = std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            // in a child process: the limit is the process's
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    let _ = nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        1024,
                        20000,
                    );
                    let root = Dir::open(&pm2).unwrap();
                    let a = set_aside::delete(&root, "old").is_ok();
                    let b = set_aside::delete(&root, "other").is_ok();
                    unsafe { nix::libc::_exit(i32::from(a) | (i32::from(b) << 1)) }
                }
                nix::unistd::ForkResult::Parent { child } => {
                    match nix::sys::wait::waitpid(child, None).unwrap() {
                        nix::sys::wait::WaitStatus::Exited(_, c) => c,
                        other => panic!("{other:?}"),
                    }
                }
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let left: Vec<_> = fs::read_dir(pm.join("set-aside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        r,
        3,
        "delete old: {}, then delete other: {}; left: {left:?}",
        r & 1 == 1,
        r & 2 == 2
    );
    assert!(left.is_empty(), "{left:?}");
}
