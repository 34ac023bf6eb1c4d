//! Root tests of the RAM tier's sync against a local attacker (security
//! review of the `app` merge: the append after a reboot onto the lower's
//! file, `onto_lower`). Each attack is made by uid 65534 where it is a
//! user's; each test says what happened on the code it was written against.
//!
//! - (a) a bind tier's lower is a dir in a user's home (`/home/u/proj/target`
//!   → `<partition>/home/u/proj/target`): the user owns `proj`. A sync that
//!   appended onto the lower's file and then failed (the user fills the
//!   partition through /home) cut that file back by *path*
//!   (`undo_failed`: `Dir::open(t.lower)`, which follows a symlink on the
//!   way), after the user had swapped `proj` for a symlink: root truncated
//!   (or extended) a file of the user's choosing outside the partition.
//! - (b) a bind tier's lower rewritten in place by its owner in a boot
//!   that does not mount the tier but keeps its records, its mtime set back: the record and the upper agree
//!   and the tail went onto other bytes (only the user's own file). Now a
//!   bind tier is never appended onto its lower: it copies whole after a
//!   boot.

mod common;

use common::tier::*;
use common::*;
use mados_persistence::boot::tier::Tier;
use mados_persistence::companion::sync::{Manifest, sync_tier};
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The rig of `common::tier`, but the tier a bind tier's: its lower in a
/// user's (65534's) home on the partition, `home/u/proj/target`.
fn bind_rig(tag: &str) -> Rig {
    private_mounts();
    let d = tmpdir(tag);
    let pm = d.join("pm");
    let ram = d.join("ram");
    let image = d.join("image");
    for p in [&pm, &ram, &image, &d.join("view")] {
        fs::create_dir_all(p).unwrap();
    }
    sh(&format!(
        "chmod 755 {0} && truncate -s 256M {0}/part.img && mkfs.ext4 -q -F -b 4096 -m 1 {0}/part.img && mount -o loop,noatime,commit=60 {0}/part.img {1} && mount -t tmpfs -o size=200M ram {2}",
        d.display(),
        pm.display(),
        ram.display()
    ));
    fs::create_dir_all(pm.join("home/u/proj/target")).unwrap();
    sh(&format!(
        "chown -R 65534:65534 {}",
        pm.join("home/u").display()
    ));
    let base = pm.join("tier/home-u-proj-target");
    let tier = Tier {
        dir: "/home/u/proj/target".into(),
        base: base.display().to_string(),
        lower: pm.join("home/u/proj/target").display().to_string(),
        stage: base.join("stage").display().to_string(),
        tmp: base.join("tmp").display().to_string(),
        upper: ram.join("t/upper").display().to_string(),
        work: ram.join("t/work").display().to_string(),
        excluded: vec![],
    };
    let r = Rig {
        view: d.join("view"),
        d,
        image,
        tier,
    };
    mount_view(&r);
    r
}

/// `rename(at, at.real)` then `symlink(target, at)`, done by uid/gid 65534
/// in a forked child (raw syscalls only after the fork).
fn swap_for_symlink_as_nobody(target: &Path, at: &Path) -> bool {
    let t = CString::new(target.as_os_str().as_bytes()).unwrap();
    let aside = CString::new(at.with_extension("real").as_os_str().as_bytes()).unwrap();
    let a = CString::new(at.as_os_str().as_bytes()).unwrap();
    // SAFETY: the child makes raw syscalls only and exits.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            let ok = nix::libc::setgroups(0, std::ptr::null()) == 0
                && nix::libc::setresgid(NOBODY, NOBODY, NOBODY) == 0
                && nix::libc::setresuid(NOBODY, NOBODY, NOBODY) == 0
                && nix::libc::rename(a.as_ptr(), aside.as_ptr()) == 0
                && nix::libc::symlink(t.as_ptr(), a.as_ptr()) == 0;
            nix::libc::_exit(if ok { 0 } else { 1 })
        },
        nix::unistd::ForkResult::Parent { child } => matches!(
            nix::sys::wait::waitpid(child, None),
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0))
        ),
    }
}

/// (a) See the module doc.
#[test]
fn a_failed_sync_never_cuts_a_file_the_user_pointed_the_lower_at() {
    if !require_root("a_failed_sync_never_cuts_a_file_the_user_pointed_the_lower_at") {
        return;
    }
    let r = bind_rig("atk-tier-undo");
    let v = &r.view;
    let pm = r.d.join("pm");
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(v.join("big.log"), chunk.repeat(2)).unwrap();
    let mut m = Manifest::default();
    sync_tier(&r.tier, &mut m).unwrap();
    reboot(&r);
    // the victim: root's file, 4 MiB, where the user will point the lower
    let victim = r.d.join("victim");
    fs::create_dir_all(victim.join("target")).unwrap();
    let secret: Vec<u8> = b"root's own file ".repeat(1 << 18);
    fs::write(victim.join("target/big.log"), &secret).unwrap();
    sh(&format!("chmod 600 {}/target/big.log", victim.display()));
    // the log grows (copied up whole into RAM), and a large new file that
    // the partition has no room for makes the sync fail after the append
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(v.join("big.log"))
        .unwrap();
    f.write_all(&chunk[..64 << 10]).unwrap();
    drop(f);
    let filler: Vec<u8> = (0..100u32 << 20).map(|i| (i % 241) as u8 | 1).collect();
    fs::write(v.join("zz-big"), &filler).unwrap();
    drop(filler);
    let s = nix::sys::statvfs::statvfs(&pm).unwrap();
    let free = s.blocks_free() * s.fragment_size();
    let fill = fs::File::create(pm.join("fill")).unwrap();
    nix::fcntl::fallocate(
        &fill,
        nix::fcntl::FallocateFlags::empty(),
        0,
        (free - (40 << 20)) as i64,
    )
    .unwrap();
    drop(fill);
    // once the lower's file is linked into the stage (the sync is under
    // way: the real window is from its start), the user moves `proj` aside
    // and puts a symlink to the victim's dir in its place
    let lowfile = pm.join("home/u/proj/target/big.log");
    let link = pm.join("home/u/proj");
    // The user flips `proj` as soon as the lower's file has a second name
    // (the link into the stage), or, failing that, once the sync is under
    // way. Since a bind tier is no longer appended onto its lower (review
    // finding (b)), no link is made: the flip then comes mid-sync, and
    // the failed sync's undo must still leave the victim alone.
    let victim2 = victim.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let flipper = std::thread::spawn(move || {
        let t0 = Instant::now();
        while !done2.load(std::sync::atomic::Ordering::Relaxed) {
            if fs::symlink_metadata(&lowfile).is_ok_and(|m| m.nlink() == 2)
                || t0.elapsed() > Duration::from_millis(20)
            {
                return (
                    swap_for_symlink_as_nobody(&victim2, &link),
                    fs::symlink_metadata(&lowfile).is_ok_and(|m| m.nlink() == 2),
                );
            }
            std::hint::spin_loop();
        }
        (false, false)
    });
    let res = sync_tier(&r.tier, &mut m);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (flipped, linked) = flipper.join().unwrap();
    eprintln!("sync: {res:?}; flipped: {flipped}; lower linked: {linked}");
    assert!(res.is_err(), "the partition was full: the sync must fail");
    assert!(
        !linked,
        "a bind tier's lower file was linked into the stage"
    );
    if flipped {
        let real = pm.join("home/u/proj.real/target/big.log");
        assert_eq!(fs::metadata(&real).unwrap().len(), 2 << 20);
    }
    let now = fs::read(victim.join("target/big.log")).unwrap();
    assert!(
        now == secret,
        "root's file outside the partition was cut: {} bytes, was {}",
        now.len(),
        secret.len()
    );
}

/// (b) A bind tier's lower is the user's own dir on the partition: in a
/// boot that does not mount the tier yet keeps its records (a tier turned
/// off is handed back and its records removed; but a tier whose mount
/// failed, a hand-back refused with a warning, or the partition written
/// on another machine keep them) the user rewrites the synced log in
/// place, same length, and sets its
/// mtime back (`touch -d`: an owner may); inode and generation stay. The
/// next boot with the tier: the user writes the old bytes again plus a
/// tail in the overlay. The record (length, digest, inode, generation,
/// mtime) and the upper's prefix agree, so the sync appends the tail to
/// the rewritten lower file: the stick holds other bytes than the upper
/// had, and the new record vouches for the upper's.
#[test]
fn a_lower_rewritten_with_its_mtime_set_back_is_not_appended_onto() {
    if !require_root("a_lower_rewritten_with_its_mtime_set_back_is_not_appended_onto") {
        return;
    }
    let r = bind_rig("atk-tier-rewrite");
    let v = &r.view;
    let pm = r.d.join("pm");
    let a: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(v.join("big.log"), &a).unwrap();
    sh(&format!(
        "chown 65534:65534 {}",
        v.join("big.log").display()
    ));
    let mut m = Manifest::default();
    sync_tier(&r.tier, &mut m).unwrap();
    reboot(&r);
    // a boot without the tier: the user's own dir is theirs to write
    sh(&format!("umount {}", v.display()));
    let low = pm.join("home/u/proj/target/big.log");
    let md = fs::metadata(&low).unwrap();
    assert_eq!(md.uid(), NOBODY);
    let out = as_nobody_cmd(&[
        "sh",
        "-c",
        &format!(
            "head -c {} /dev/zero | tr '\\0' B | dd of={1} conv=notrunc status=none && touch -m -d @{2}.{3:09} {1}",
            a.len(),
            low.display(),
            md.mtime(),
            md.mtime_nsec()
        ),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::metadata(&low).unwrap().mtime_nsec(), md.mtime_nsec());
    // the tier again: the old bytes and a tail in the overlay
    fs::remove_dir_all(&r.tier.upper).unwrap();
    fs::remove_dir_all(&r.tier.work).unwrap();
    mount_view(&r);
    let mut want = a.clone();
    want.extend_from_slice(b"the tail\n");
    let out = as_nobody_cmd(&[
        "sh",
        "-c",
        &format!("cat > {}", v.join("big.log").display()),
    ])
    .stdin(std::process::Stdio::piped())
    .spawn()
    .and_then(|mut c| {
        c.stdin.take().unwrap().write_all(&want)?;
        c.wait_with_output()
    })
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rep = sync_tier(&r.tier, &mut m).unwrap();
    eprintln!("{rep:?}");
    reboot(&r);
    let got = fs::read(v.join("big.log")).unwrap();
    assert!(
        got == want,
        "the stick holds other bytes than the upper had: {:?}... (resumed {})",
        String::from_utf8_lossy(&got[..16]),
        rep.resumed
    );
}
