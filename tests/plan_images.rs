//! Partition planning on the real bytes of images made at test time by
//! xorriso (mkarchiso's exact options), grub-mkrescue, a plain ISO, a stick
//! with a user partition, and a 4096-byte-sector GPT disk.

mod common;

use common::*;
use mados_persistence::disk::layout::{self, Layout, TableKind};
use mados_persistence::disk::partplan::{self, PlanOptions, Refusal};
use mados_persistence::disk::table;
use std::fs::{File, OpenOptions};
use std::path::Path;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn read(path: &Path, ss: Option<u64>) -> Layout {
    let mut f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let ss = ss.unwrap_or_else(|| layout::guess_sector_size(&mut f).unwrap());
    layout::read_layout(&mut f, size, ss, vec![]).unwrap()
}

/// Apply the plan to the image; return (original, changed) contents.
fn apply(path: &Path, plan: &partplan::PartPlan) -> (Vec<u8>, Vec<u8>) {
    let before = std::fs::read(path).unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let b = table::take_backup(&mut f, "img", before.len() as u64, &plan.writes).unwrap();
    table::apply(&mut f, &plan.writes).unwrap();
    drop(f);
    let after = std::fs::read(path).unwrap();
    // the backup holds exactly the bytes that were there
    for r in &b.regions {
        let o = r.offset as usize;
        assert_eq!(r.data().unwrap(), before[o..o + r.data().unwrap().len()]);
    }
    (before, after)
}

/// Every byte outside the plan's writes is unchanged.
fn assert_only_writes_changed(before: &[u8], after: &[u8], plan: &partplan::PartPlan) {
    assert_eq!(before.len(), after.len());
    let in_write = |i: u64| {
        plan.writes
            .iter()
            .any(|w| i >= w.offset && i < w.offset + w.data.len() as u64)
    };
    let mut i = 0usize;
    while i < before.len() {
        // compare 4 KiB at a time, byte by byte only where they differ
        let end = (i + 4096).min(before.len());
        if before[i..end] != after[i..end] {
            for j in i..end {
                assert!(
                    before[j] == after[j] || in_write(j as u64),
                    "byte {j} changed outside the planned writes"
                );
            }
        }
        i = end;
    }
}

fn sfdisk_dump(path: &Path) -> String {
    run("sfdisk", &["-d", path.to_str().unwrap()])
}

#[test]
fn archiso_layout_gets_mbr_entry_3_after_the_backup_gpt() {
    let d = tmpdir("plan-archiso");
    let img = image("archiso", &d, None);
    let iso_len = std::fs::metadata(&img).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(GIB)
        .unwrap();
    let l = read(&img, None);
    assert_eq!(l.table, TableKind::Mbr);
    let iso = l.iso.as_ref().expect("ISO 9660 found");
    assert_eq!(iso.label, "MADOS_TEST");
    let f = l.findings.join("\n");
    assert!(f.contains("type 0x00"), "type-0 entry not reported: {f}");
    assert!(f.contains("no protective entry"), "{f}");
    assert!(f.contains("not at the device's end"), "{f}");
    // the GPT backup header sits at the ISO's last sector: used_end is the ISO's length
    assert_eq!(l.used_end(), iso_len);

    let plan = partplan::plan(&l, &PlanOptions::default()).unwrap();
    assert_eq!(plan.number, 3);
    assert_eq!(plan.start, iso_len.div_ceil(MIB) * MIB);
    assert_eq!(plan.start + plan.size, GIB);
    assert_eq!(plan.writes.len(), 1);
    let (before, after) = apply(&img, &plan);
    assert_only_writes_changed(&before, &after, &plan);
    // MBR boot code and entries 1-2 are identical; only entry 3's 16 bytes differ
    assert_eq!(before[..446 + 32], after[..446 + 32]);
    assert_eq!(before[446 + 48..], after[446 + 48..]);
    let dump = sfdisk_dump(&img);
    let start = plan.start / 512;
    assert!(
        dump.contains(&format!(
            "start={start:>12}, size={:>12}, type=83",
            plan.size / 512
        )),
        "sfdisk does not show the new entry:\n{dump}"
    );
    // and the ISO still reads
    let l2 = read(&img, None);
    assert_eq!(l2.iso, l.iso);
    assert_eq!(l2.mbr.unwrap().entries.len(), 3);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn archiso_uefi_only_layout_gets_a_gpt_entry_and_moved_backup() {
    let d = tmpdir("plan-archiso-uefi");
    let img = image("archiso-uefi", &d, None);
    let iso_len = std::fs::metadata(&img).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(GIB)
        .unwrap();
    let l = read(&img, None);
    assert_eq!(l.table, TableKind::Gpt);
    let plan = partplan::plan(&l, &PlanOptions::default()).unwrap();
    assert_eq!(plan.number, 4, "entries 1-3 are ISO9660, Appended2, Gap1");
    assert!(plan.start >= iso_len);
    let (before, after) = apply(&img, &plan);
    assert_only_writes_changed(&before, &after, &plan);
    assert_eq!(
        before[..512],
        after[..512],
        "protective/hybrid MBR kept exactly"
    );
    let l2 = read(&img, None);
    let g = l2.gpt.as_ref().unwrap();
    assert!(g.valid(), "new GPT checksums");
    assert_eq!(g.alternate_lba, GIB / 512 - 1);
    assert!(
        l2.findings
            .iter()
            .all(|f| !f.contains("not at the device's end")),
        "{:?}",
        l2.findings
    );
    // sfdisk reads it without complaint and sees the partition
    let dump = sfdisk_dump(&img);
    assert!(
        dump.contains(&format!("start={:>12}", plan.start / 512)),
        "{dump}"
    );
    assert!(dump.contains("name=\"persistence\""), "{dump}");
    let verify = run("sfdisk", &["--verify", img.to_str().unwrap()]);
    assert!(verify.contains("No errors detected"), "{verify}");
    // deleting just our entry (no backup) leaves a valid GPT with the original three
    let writes = partplan::plan_delete(&l2, plan.number).unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    table::apply(&mut f, &writes).unwrap();
    drop(f);
    let l3 = read(&img, None);
    let g3 = l3.gpt.as_ref().unwrap();
    assert!(g3.valid(), "GPT after deleting the entry");
    assert_eq!(g3.entries.len(), 3);
    assert_eq!(
        l3.gpt.as_ref().unwrap().entries,
        l.gpt.as_ref().unwrap().entries
    );
    assert!(
        partplan::plan_delete(&l3, plan.number).is_err(),
        "deleting twice must fail"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn grub_mkrescue_layout_moves_the_backup_gpt_and_keeps_gaps() {
    let d = tmpdir("plan-grub");
    let img = image("grub", &d, None);
    let iso_len = std::fs::metadata(&img).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(GIB)
        .unwrap();
    let l = read(&img, None);
    assert_eq!(l.table, TableKind::Gpt);
    let f = l.findings.join("\n");
    assert!(
        f.contains("overlaps the ISO 9660"),
        "Gap0/EFI inside the ISO not reported: {f}"
    );
    assert!(
        f.contains("MBR=true GPT=true APM=true"),
        "MBR, GPT and APM at once: {f}"
    );
    let plan = partplan::plan(&l, &PlanOptions::default()).unwrap();
    assert!(plan.start >= iso_len, "{} < {iso_len}", plan.start);
    let last_entry = l
        .gpt
        .as_ref()
        .unwrap()
        .entries
        .iter()
        .map(|e| e.number)
        .max()
        .unwrap();
    assert_eq!(plan.number, last_entry + 1);
    let (before, after) = apply(&img, &plan);
    assert_only_writes_changed(&before, &after, &plan);
    let l2 = read(&img, None);
    assert!(l2.gpt.as_ref().unwrap().valid());
    let dump = sfdisk_dump(&img);
    assert!(dump.contains("name=\"persistence\""), "{dump}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn plain_iso_is_refused() {
    let d = tmpdir("plan-plain");
    let img = image("plain", &d, Some(GIB));
    let l = read(&img, None);
    assert_eq!(l.table, TableKind::None);
    assert_eq!(
        partplan::plan(&l, &PlanOptions::default()).unwrap_err(),
        Refusal::NoTable
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn user_partition_is_never_touched() {
    let d = tmpdir("plan-userpart");
    let img = image("userpart", &d, None);
    let l = read(&img, None);
    let user = l
        .mbr
        .as_ref()
        .unwrap()
        .entries
        .iter()
        .find(|e| e.number == 3)
        .unwrap()
        .clone();
    let user_end = (user.start_lba + user.sectors) * 512;
    let plan = partplan::plan(&l, &PlanOptions::default()).unwrap();
    assert_eq!(plan.number, 4);
    assert!(plan.start >= user_end);
    let (before, after) = apply(&img, &plan);
    assert_only_writes_changed(&before, &after, &plan);
    // with the user's partition at the end there is no room left
    let small = tmpdir("plan-userpart-full");
    let img2 = image("userpart", &small, None);
    let f = OpenOptions::new().write(true).open(&img2).unwrap();
    f.set_len(user_end + 50 * MIB).unwrap();
    let l2 = read(&img2, None);
    match partplan::plan(&l2, &PlanOptions::default()) {
        Err(Refusal::TooSmall { .. }) => {}
        other => panic!("expected TooSmall, got {other:?}"),
    }
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&small).unwrap();
}

#[test]
fn too_little_room_is_refused_and_the_cap_is_honoured() {
    let d = tmpdir("plan-small");
    let img = image("archiso", &d, None);
    let iso_len = std::fs::metadata(&img).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(iso_len + 80 * MIB)
        .unwrap();
    let l = read(&img, None);
    let err = partplan::plan(&l, &PlanOptions::default()).unwrap_err();
    assert!(err.to_string().contains("at least 100M"), "{err}");
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 * GIB)
        .unwrap();
    let l = read(&img, None);
    let o = PlanOptions {
        max_size: Some(GIB),
        ..Default::default()
    };
    let plan = partplan::plan(&l, &o).unwrap();
    assert_eq!(plan.size, GIB);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn four_k_sector_gpt() {
    if !require_root("four_k_sector_gpt") {
        return;
    }
    let d = tmpdir("plan-4k");
    let img = image("gpt4k", &d, None);
    let l = read(&img, None);
    assert_eq!(l.sector_size, 4096);
    assert_eq!(l.table, TableKind::Gpt);
    let plan = partplan::plan(&l, &PlanOptions::default()).unwrap();
    assert_eq!(plan.number, 3);
    assert_eq!(plan.start % MIB, 0);
    // ESP is 2048 4K-sectors from LBA 1024: ends at 12 MiB
    assert_eq!(plan.start, 12 * MIB);
    assert!(
        plan.writes
            .iter()
            .all(|w| w.offset % 4096 == 0 && w.data.len() % 4096 == 0)
    );
    let (before, after) = apply(&img, &plan);
    assert_only_writes_changed(&before, &after, &plan);
    let l2 = read(&img, None);
    assert!(l2.gpt.as_ref().unwrap().valid());
    assert_eq!(l2.gpt.as_ref().unwrap().entries.len(), 3);
    std::fs::remove_dir_all(&d).unwrap();
}

/// The crafted table from the field: a GPT entry whose last LBA is near
/// 2^64 (checksums made right) used to make `used_end` wrap to 0, and
/// `enable --device` then formatted the whole stick. Now the table is
/// refused, `enable` exits 3, and not a byte of the image changes.
#[test]
fn crafted_gpt_entry_beyond_the_device_is_refused_not_planned_around() {
    let d = tmpdir("plan-crafted");
    for name in ["archiso", "archiso-uefi"] {
        let img = image(name, &d, Some(GIB));
        let mut bytes = std::fs::read(&img).unwrap();
        let lba = u64::from_le_bytes(bytes[512 + 72..512 + 80].try_into().unwrap()) as usize;
        let e = lba * 512; // entry 1
        bytes[e + 40..e + 48].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        let n = u32::from_le_bytes(bytes[512 + 80..512 + 84].try_into().unwrap()) as usize;
        let crc = crc32fast::hash(&bytes[e..e + n * 128]);
        bytes[512 + 88..512 + 92].copy_from_slice(&crc.to_le_bytes());
        bytes[512 + 16..512 + 20].fill(0);
        let hsize = u32::from_le_bytes(bytes[512 + 12..512 + 16].try_into().unwrap()) as usize;
        let crc = crc32fast::hash(&bytes[512..512 + hsize]);
        bytes[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&img, &bytes).unwrap();

        let mut f = File::open(&img).unwrap();
        let err = layout::read_layout(&mut f, GIB, 512, vec![]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("outside the device"), "{name}: {msg}");

        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
            .args(["enable", "--device", img.to_str().unwrap(), "--yes"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(3),
            "{name}: enable did not refuse: {stderr}"
        );
        assert!(
            stderr.contains("GPT entry 1"),
            "{name}: refusal does not say why: {stderr}"
        );
        assert!(
            std::fs::read(&img).unwrap() == bytes,
            "{name}: the image changed"
        );
        let plan = std::process::Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
            .args(["plan", "--device", img.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(plan.status.code(), Some(3), "{name}: plan did not refuse");
    }
    std::fs::remove_dir_all(&d).unwrap();
}
