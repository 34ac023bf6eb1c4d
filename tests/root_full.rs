//! Root test of a full persistence partition (issue 20, "Faults,
//! handled"): the partition on a loop device filled to its last block,
//! then the tier written. The sync fails naming the reason, what was
//! synced before stays whole in the stage (an append cut back, tmp
//! emptied), the files are still readable in the tier; once space is
//! freed the next sync saves everything, and it comes back whole at "the
//! next boot".

mod common;

use common::tier::*;
use common::*;
use mados_persistence::companion::sync::{Manifest, sync_tier};
use std::fs;
use std::io::Write;
use std::path::Path;

/// Length and CRC-32 of a file (an assertion on them prints two numbers).
fn sum(p: &Path) -> (usize, u32) {
    let b = fs::read(p).unwrap();
    (b.len(), crc32fast::hash(&b))
}

fn fill(pm: &Path) {
    // root may use the reserved blocks too: fill by what is free to root,
    // then byte by block until the filesystem refuses
    let v = nix::sys::statvfs::statvfs(pm).unwrap();
    let free = v.blocks_free() * v.fragment_size();
    sh(&format!(
        "fallocate -l {} {p}/filler-a 2>/dev/null; dd if=/dev/zero of={p}/filler-c bs=1M count=8 2>/dev/null; \
         dd if=/dev/zero of={p}/filler-b bs=4k 2>/dev/null; true",
        free.saturating_sub(32 << 20),
        p = pm.display()
    ));
    // (statfs still counts ext4's own reserve for metadata as free)
    let probe = pm.join("probe");
    let e = fs::write(&probe, vec![1u8; 4096])
        .and_then(|_| fs::File::open(&probe)?.sync_all())
        .unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC),
        "the partition is full to its last block"
    );
    fs::remove_file(&probe).ok();
}

#[test]
fn a_full_partition_keeps_everything_in_ram_and_loses_nothing() {
    if !require_root("a_full_partition_keeps_everything_in_ram_and_loses_nothing") {
        return;
    }
    let r = rig("tier-full");
    let v = &r.view;
    let pm = Path::new(&r.tier.base).parent().unwrap().parent().unwrap();
    let mut log = fs::File::create(v.join("app.log")).unwrap();
    log.write_all(&vec![b'a'; 1 << 20]).unwrap();
    drop(log);
    fs::write(v.join("small"), "synced before").unwrap();
    let mut m = Manifest::default();
    sync_tier(&r.tier, &mut m).unwrap();
    let synced_stage = sum(&Path::new(&r.tier.stage).join("app.log"));
    let generation = fs::read(Path::new(&r.tier.base).join("generation.json")).unwrap();
    fill(pm);
    // the tier is RAM: these writes succeed although the stick is full
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(v.join("app.log"))
        .unwrap();
    log.write_all(&vec![b'b'; 12 << 20]).unwrap();
    drop(log);
    fs::write(v.join("new.bin"), vec![b'n'; 12 << 20]).unwrap();
    fs::write(v.join("small"), "rewritten while full").unwrap();
    let before = m.clone();
    let e = sync_tier(&r.tier, &mut m).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.starts_with("the persistence partition is full (ENOSPC)"),
        "the reason first: {msg}"
    );
    assert!(msg.contains("stays in RAM"), "{msg}");
    assert_eq!(m.generation, before.generation, "the manifest is unchanged");
    // nothing synced earlier is lost or torn
    assert_eq!(
        sum(&Path::new(&r.tier.stage).join("app.log")),
        synced_stage,
        "the append was cut back to what was synced"
    );
    assert_eq!(
        fs::read(Path::new(&r.tier.stage).join("small")).unwrap(),
        b"synced before"
    );
    assert_eq!(
        fs::read(Path::new(&r.tier.base).join("generation.json")).unwrap(),
        generation
    );
    assert!(
        fs::read_dir(&r.tier.tmp).unwrap().next().is_none(),
        "tmp emptied"
    );
    assert!(!Path::new(&r.tier.base).join("generation.json.tmp").exists());
    // the files are still readable in the tier
    assert_eq!(fs::read(v.join("app.log")).unwrap().len(), 13 << 20);
    assert!(fs::read(v.join("new.bin")).unwrap() == vec![b'n'; 12 << 20]);
    // 8 MiB freed: the next try gets part of the way (an append in
    // place, whole copies in tmp) and fails; the same is left
    fs::remove_file(pm.join("filler-c")).unwrap();
    // (blocks freed by an unlink are free once the journal commits)
    sh("sync");
    let e = sync_tier(&r.tier, &mut m).unwrap_err();
    assert!(format!("{e:#}").contains("ENOSPC"), "{e:#}");
    assert_eq!(
        sum(&Path::new(&r.tier.stage).join("app.log")),
        synced_stage,
        "a partial append cut back"
    );
    assert!(
        fs::read_dir(&r.tier.tmp).unwrap().next().is_none(),
        "tmp emptied"
    );
    // space freed: the next sync saves it all
    fs::remove_file(pm.join("filler-a")).ok();
    fs::remove_file(pm.join("filler-b")).ok();
    let ok = sync_tier(&r.tier, &mut m).unwrap();
    assert!(ok.bytes >= 24 << 20, "{ok:?}");
    let seen: Vec<(String, (usize, u32))> = ["app.log", "new.bin", "small"]
        .iter()
        .map(|n| (n.to_string(), sum(&v.join(n))))
        .collect();
    reboot(&r);
    for (n, s) in seen {
        assert_eq!(sum(&v.join(&n)), s, "{n} after the reboot");
    }
    fs::remove_dir_all(&r.d).ok();
}
