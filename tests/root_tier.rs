//! Root tests of the RAM tier's sync on real mounts: an ext4 partition on
//! a loop device, a tmpfs upper, the overlay mounted as `boot` mounts it.
//! Every change kind is synced, folded at "the next boot" (the overlay
//! unmounted, `fold`, a fresh RAM upper) and the directory must look the
//! same; appends and renames cost what changed; `kill -9` of `sync` at
//! many instants leaves every file old or new, never torn, and the next
//! sync completes. Each test runs in its own mount namespace.

mod common;

use common::tier::*;
use common::*;
use mados_persistence::companion::sync::{Manifest, sync_tier};
use mados_persistence::util::overlayfs::{is_opaque, is_whiteout};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// Everything a user sees in the directory.
fn listing(p: &Path) -> Vec<String> {
    let mut out = vec![];
    fn walk(base: &Path, p: &Path, out: &mut Vec<String>) {
        let mut es: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        es.sort();
        for e in es {
            let m = fs::symlink_metadata(&e).unwrap();
            let rel = e.strip_prefix(base).unwrap().display().to_string();
            let x: Vec<String> = xattr::list(&e)
                .unwrap()
                .filter(|n| n.to_string_lossy().starts_with("user."))
                .map(|n| {
                    format!(
                        "{}={:?}",
                        n.to_string_lossy(),
                        xattr::get(&e, &n).unwrap().unwrap()
                    )
                })
                .collect();
            let meta = format!(
                "mode={:o} uid={} mtime={} {x:?}",
                m.mode(),
                m.uid(),
                m.mtime()
            );
            if m.is_dir() {
                out.push(format!("{rel}/ {meta}"));
                walk(base, &e, out);
            } else if m.file_type().is_symlink() {
                out.push(format!("{rel} -> {}", fs::read_link(&e).unwrap().display()));
            } else {
                let data = fs::read(&e).unwrap();
                out.push(format!(
                    "{rel} {meta} len={} crc={:08x} nlink={}",
                    data.len(),
                    crc32fast::hash(&data),
                    m.nlink()
                ));
            }
        }
    }
    walk(p, p, &mut out);
    out
}

#[test]
fn every_change_survives_sync_and_next_boot() {
    if !require_root("every_change_survives_sync_and_next_boot") {
        return;
    }
    let r = rig("tier-kinds");
    let v = &r.view;
    fs::write(v.join("new"), "created").unwrap();
    fs::write(v.join("edit-me"), "edited in RAM").unwrap();
    fs::remove_file(v.join("delete-me")).unwrap();
    fs::remove_dir_all(v.join("old-dir")).unwrap();
    fs::create_dir_all(v.join("old-dir")).unwrap(); // opaque now
    fs::write(v.join("old-dir/fresh"), "fresh").unwrap();
    fs::write(v.join("linked"), "two names").unwrap();
    fs::hard_link(v.join("linked"), v.join("linked-2")).unwrap();
    std::os::unix::fs::symlink("new", v.join("sym")).unwrap();
    // a name that is not UTF-8 (before util::safefs: never synced, while
    // the sync said all was durable)
    use std::os::unix::ffi::OsStrExt;
    let odd = v.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9"));
    fs::write(&odd, "odd name").unwrap();
    xattr::set(v.join("new"), "user.tag", b"kept").unwrap();
    fs::set_permissions(v.join("new"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(v.join("new"), Some(1234), Some(99)).unwrap();
    // sparse: 64 MiB with 4 KiB of data
    let f = fs::File::create(v.join("sparse")).unwrap();
    f.set_len(64 << 20).unwrap();
    nix::sys::uio::pwrite(&f, b"data", 32 << 20).unwrap();
    drop(f);
    let before = listing(v);
    let mut m = Manifest::default();
    let rep = sync_tier(&r.tier, &mut m).unwrap();
    assert!(rep.not_carried.is_empty(), "{:?}", rep.not_carried);
    assert!(
        rep.bytes < 1 << 20,
        "the sparse file's holes are not written: {} bytes",
        rep.bytes
    );
    // the stage holds overlay semantics: a whiteout and an opaque dir
    let stage = Path::new(&r.tier.stage);
    let wm = fs::symlink_metadata(stage.join("delete-me")).unwrap();
    assert!(is_whiteout(&stage.join("delete-me"), &wm));
    assert!(is_opaque(&stage.join("old-dir")));
    let gen_file = Path::new(&r.tier.base).join("generation.json");
    assert!(
        fs::read_to_string(&gen_file)
            .unwrap()
            .contains("\"generation\": 1")
    );
    // nothing changed: nothing written, not even the generation record
    let gen_before = fs::symlink_metadata(&gen_file).unwrap().ino();
    let again = sync_tier(&r.tier, &mut m).unwrap();
    assert_eq!(again.changed, 0, "{again:?}");
    assert_eq!(m.generation, 1);
    assert_eq!(
        fs::symlink_metadata(&gen_file).unwrap().ino(),
        gen_before,
        "the generation record was not rewritten"
    );
    reboot(&r);
    assert_eq!(listing(v), before, "the next boot sees what was synced");
    assert!(!v.join("old-dir/sub").exists(), "opaque dir carried");
    assert_eq!(fs::read_to_string(&odd).unwrap(), "odd name");
    assert_eq!(fs::read_to_string(v.join("keep")).unwrap(), "image keep");
    let sparse = fs::metadata(v.join("sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "still sparse after the fold"
    );
    fs::remove_dir_all(&r.d).ok();
}

#[test]
fn appends_and_renames_cost_what_changed() {
    if !require_root("appends_and_renames_cost_what_changed") {
        return;
    }
    let r = rig("tier-cost");
    let v = &r.view;
    let chunk = vec![b'x'; 1 << 20];
    let mut log = fs::File::create(v.join("big.log")).unwrap();
    for _ in 0..16 {
        log.write_all(&chunk).unwrap();
    }
    drop(log);
    fs::write(v.join("moved"), vec![b'm'; 4 << 20]).unwrap();
    let mut m = Manifest::default();
    let first = sync_tier(&r.tier, &mut m).unwrap();
    assert!(first.bytes >= 20 << 20, "{first:?}");
    // 1 MiB appended to a 16 MiB log, a 4 MiB file renamed
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(v.join("big.log"))
        .unwrap();
    log.write_all(&chunk).unwrap();
    drop(log);
    fs::rename(v.join("moved"), v.join("moved-here")).unwrap();
    let second = sync_tier(&r.tier, &mut m).unwrap();
    assert_eq!(second.appended, 1, "{second:?}");
    assert_eq!(second.renamed, 1, "{second:?}");
    assert_eq!(
        second.bytes,
        1 << 20,
        "only the tail is written: {second:?}"
    );
    // a rewrite in the middle is not an append
    nix::sys::uio::pwrite(
        fs::OpenOptions::new()
            .write(true)
            .open(v.join("big.log"))
            .unwrap(),
        b"Y",
        10,
    )
    .unwrap();
    let third = sync_tier(&r.tier, &mut m).unwrap();
    assert_eq!(third.appended, 0, "{third:?}");
    assert_eq!(third.bytes, 17 << 20, "{third:?}");
    let before = listing(v);
    reboot(&r);
    assert_eq!(listing(v), before);
    fs::remove_dir_all(&r.d).ok();
}

#[test]
fn a_sync_killed_anywhere_leaves_old_or_new_and_the_next_completes() {
    if !require_root("a_sync_killed_anywhere_leaves_old_or_new_and_the_next_completes") {
        return;
    }
    let r = rig("tier-kill");
    let v = &r.view;
    let run = r.d.join("run");
    fs::create_dir_all(&run).unwrap();
    let state = serde_json::json!({"version": 1, "mode": "persistent", "reason": null,
        "boot_device": null, "partition": null, "mounts": [], "warnings": [], "timings": [],
        "cmdline": "", "tiers": [r.tier]});
    fs::write(run.join("state.json"), state.to_string()).unwrap();
    let bin = env!("CARGO_BIN_EXE_mados-persistence");
    let sync = |kill_after: Option<u64>| -> bool {
        let mut c = Command::new(bin)
            .arg("sync")
            .env("MADOS_PERSISTENCE_RUN", &run)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if let Some(ms) = kill_after {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            let _ = c.kill(); // SIGKILL
        }
        c.wait().unwrap().success()
    };
    // version 1 of 40 files, synced
    let names: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
    let content = |n: &str, ver: u8| vec![ver; 200_000 + n.len() * 1000];
    for n in &names {
        fs::write(v.join(n), content(n, 1)).unwrap();
    }
    assert!(sync(None));
    let mut kills = 0;
    for (round, ms) in [2u64, 5, 10, 20, 40, 80].iter().enumerate() {
        let ver = round as u8 + 2;
        for n in &names {
            fs::write(v.join(n), content(n, ver)).unwrap();
        }
        if !sync(Some(*ms)) {
            kills += 1;
        }
        // every file in the stage is the last synced version or the new one
        for n in &names {
            let p = Path::new(&r.tier.stage).join(n);
            let got = fs::read(&p).unwrap_or_else(|e| panic!("{n} missing after a kill: {e}"));
            assert!(
                got == content(n, ver - 1) || got == content(n, ver),
                "{n} torn after a kill at {ms} ms"
            );
        }
        assert!(sync(None), "the next sync completes");
        for n in &names {
            let p = Path::new(&r.tier.stage).join(n);
            assert_eq!(fs::read(&p).unwrap(), content(n, ver), "{n}");
        }
    }
    assert!(
        kills >= 3,
        "only {kills} syncs were cut (too fast to test?)"
    );
    let before = listing(v);
    reboot(&r);
    assert_eq!(listing(v), before);
    fs::remove_dir_all(&r.d).ok();
}

/// The daemon's idle trigger: a write through the tier is seen by its
/// fanotify filesystem mark, also through another mount of the same
/// overlay (another namespace's copy); reads and writes to the upper
/// behind the overlay's back are not.
#[test]
fn writes_through_the_tier_are_seen_by_the_watch() {
    if !require_root("writes_through_the_tier_are_seen_by_the_watch") {
        return;
    }
    let r = rig("watch");
    let mut w =
        mados_persistence::companion::watch::Watch::new(&[r.view.as_path()], false).unwrap();
    assert!(!w.wrote(), "nothing written yet");
    let _ = fs::read(r.view.join("keep")).unwrap();
    assert!(!w.wrote(), "a read is not a write");
    // a rewrite in place of the same size: the tmpfs use does not change
    fs::write(r.view.join("edit-me"), "image versioN").unwrap();
    assert!(w.wrote(), "a write through the overlay");
    assert!(!w.wrote(), "drained");
    fs::write(Path::new(&r.tier.upper).join("behind"), "x").unwrap();
    assert!(!w.wrote(), "the upper is another filesystem");
    let other = r.d.join("other-mount");
    fs::create_dir_all(&other).unwrap();
    sh(&format!(
        "mount --bind {} {}",
        r.view.display(),
        other.display()
    ));
    fs::write(other.join("edit-me"), "image VersioN").unwrap();
    assert!(w.wrote(), "a write through another mount of the overlay");
    sh(&format!("umount {}", other.display()));
}

/// The loop device under the rig's partition: its `maj:min` and name.
fn partition_dev(r: &Rig) -> (String, String) {
    let pm = r.d.join("pm");
    // the test thread's own namespace (it unshared alone)
    let mi = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let line = mi
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(pm.to_str().unwrap()))
        .unwrap();
    let mm = line.split(' ').nth(2).unwrap().to_string();
    let src = line.split(" - ").nth(1).unwrap().split(' ').nth(1).unwrap();
    (mm, src.trim_start_matches("/dev/").to_string())
}

/// Bytes written to the partition's device so far, and the journal
/// commits of its filesystem (`/proc/fs/jbd2/<dev>-8/info`).
fn device_writes(r: &Rig) -> (u64, u64) {
    let (mm, name) = partition_dev(r);
    let stat = fs::read_to_string(format!("/sys/dev/block/{mm}/stat")).unwrap();
    let sectors: u64 = stat.split_whitespace().nth(6).unwrap().parse().unwrap();
    let info = fs::read_to_string(format!("/proc/fs/jbd2/{name}-8/info")).unwrap();
    let commits: u64 = info.split_whitespace().next().unwrap().parse().unwrap();
    (sectors * 512, commits)
}

#[test]
fn a_sync_of_small_files_costs_two_commits() {
    if !require_root("a_sync_of_small_files_costs_two_commits") {
        return;
    }
    let r = rig("tier-commits");
    let v = &r.view;
    for i in 0..500 {
        fs::write(v.join(format!("f{i}")), vec![b'a'; 4096]).unwrap();
    }
    let chunk = vec![b'x'; 1 << 20];
    fs::write(v.join("big.log"), chunk.repeat(16)).unwrap();
    let mut m = Manifest::default();
    sync_tier(&r.tier, &mut m).unwrap();
    sh("sync");
    for round in 0..4u8 {
        // 20 files rewritten in place, 1 MiB appended to the log
        for i in 0..20 {
            fs::write(v.join(format!("f{i}")), vec![b'b' + round; 4096]).unwrap();
        }
        let mut log = fs::OpenOptions::new()
            .append(true)
            .open(v.join("big.log"))
            .unwrap();
        log.write_all(&chunk).unwrap();
        drop(log);
        let (w0, c0) = device_writes(&r);
        let rep = sync_tier(&r.tier, &mut m).unwrap();
        let (w1, c1) = device_writes(&r);
        let changed = 20 * 4096 + (1u64 << 20);
        assert_eq!(rep.bytes, changed, "{rep:?}");
        eprintln!(
            "round {round}: {} bytes written for {changed} changed ({:.3}x), {} journal commits",
            w1 - w0,
            (w1 - w0) as f64 / changed as f64,
            c1 - c0
        );
        // the data with the next generation record, then the renames with
        // its switch: every fsync or write_atomic of its own was a commit
        // more (five before the batching)
        assert!(c1 - c0 <= 2, "{} journal commits for one sync", c1 - c0);
        assert!(w1 - w0 >= changed, "less written than changed?");
        assert!(
            (w1 - w0) * 2 <= changed * 3,
            "{} bytes written for {changed} changed",
            w1 - w0
        );
    }
    // an empty sync commits nothing and writes nothing
    let (w0, c0) = device_writes(&r);
    sync_tier(&r.tier, &mut m).unwrap();
    assert_eq!(device_writes(&r), (w0, c0));
    let before = listing(v);
    reboot(&r);
    assert_eq!(listing(v), before);
    fs::remove_dir_all(&r.d).ok();
}
