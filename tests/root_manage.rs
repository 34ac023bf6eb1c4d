//! Root tests of `enable`, `disable`, `remove` on disk image files and loop
//! devices: re-plan is a no-op after enable, the ISO and EFI bytes are
//! unchanged after enable and remove, `sfdisk -d` after remove equals the
//! original, and the refusals exit with 3.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const GIB: u64 = 1 << 30;

fn ok(args: &[&str]) -> String {
    let o = mp(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "mados-persistence {args:?} failed: {text}"
    );
    text
}

fn refused(args: &[&str]) -> String {
    let o = mp(args);
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(3),
        "mados-persistence {args:?}: expected exit 3, got {:?}: {text}",
        o.status
    );
    text
}

fn plan_action(dev: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["plan", "--device", dev, "--json"])).unwrap();
    v["result"]["action"].as_str().unwrap().to_string()
}

/// The sector writes `enable` would make, from `plan --json`.
fn planned_writes(dev: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["plan", "--device", dev, "--json"])).unwrap();
    v["result"]["plan"]["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["offset"].as_u64().unwrap(), w["len"].as_u64().unwrap()))
        .collect()
}

/// Every byte of the original image outside the table writes is the same.
fn assert_iso_unchanged(img: &Path, orig: &[u8], writes: &[(u64, u64)], what: &str) {
    let now = bytes(img, 0, orig.len() as u64);
    for (i, (a, b)) in orig.iter().zip(&now).enumerate() {
        let i = i as u64;
        if a != b {
            assert!(
                writes.iter().any(|(o, l)| i >= *o && i < o + l),
                "{what}: byte {i} of the ISO changed"
            );
        }
    }
}

fn grown(layout: &str, dir: &Path) -> (std::path::PathBuf, u64) {
    let img = image(layout, dir, None);
    let iso_len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(GIB)
        .unwrap();
    (img, iso_len)
}

#[test]
fn enable_and_remove_on_image_files_restore_the_table_exactly() {
    if !require_root("enable_and_remove_on_image_files_restore_the_table_exactly") {
        return;
    }
    for layout in ["archiso", "grub", "archiso-uefi"] {
        let d = tmpdir(&format!("manage-img-{layout}"));
        let (img, iso_len) = grown(layout, &d);
        let p = img.to_str().unwrap();
        let before = run("sfdisk", &["-d", p]);
        let iso_before = bytes(&img, 0, iso_len);
        assert_eq!(plan_action(p), "create");
        let writes = planned_writes(p);
        let out = ok(&["enable", "--device", p, "--yes"]);
        assert!(out.contains("Persistence created"), "{out}");
        assert_eq!(
            plan_action(p),
            "use",
            "{layout}: re-plan after enable is not a no-op"
        );
        assert_iso_unchanged(&img, &iso_before, &writes, &format!("{layout}: enable"));
        let again = ok(&["enable", "--device", p, "--yes"]);
        assert!(again.contains("already has persistence"), "{again}");
        let out = ok(&["remove", "--device", p, "--yes"]);
        assert!(out.contains("restored from the backup"), "{layout}: {out}");
        assert_eq!(
            run("sfdisk", &["-d", p]),
            before,
            "{layout}: table after remove differs"
        );
        assert!(
            bytes(&img, 0, iso_len) == iso_before,
            "{layout}: ISO/EFI bytes not restored by remove"
        );
        assert_eq!(plan_action(p), "create");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn size_cap_disable_and_remove_without_backup_on_a_loop_device() {
    if !require_root("size_cap_disable_and_remove_without_backup_on_a_loop_device") {
        return;
    }
    let d = tmpdir("manage-loop");
    let (img, iso_len) = grown("archiso", &d);
    let before = run("sfdisk", &["-d", img.to_str().unwrap()]);
    let iso_before = bytes(&img, 512, iso_len);
    let lo = LoopDev::attach(&img);
    {
        let lo = lo.0.as_str();
        ok(&["enable", "--device", lo, "--size", "200M", "--yes"]);
        let node = format!("{lo}p3");
        assert_eq!(
            run("blkid", &["-o", "value", "-s", "LABEL", &node]).trim(),
            "persistence"
        );
        let bytes_ = run("blockdev", &["--getsize64", &node]);
        assert_eq!(bytes_.trim(), (200u64 << 20).to_string());
        ok(&["disable", "--device", lo, "--once"]);
        let mnt = d.join("m");
        std::fs::create_dir_all(&mnt).unwrap();
        let m = mnt.to_str().unwrap();
        let read = format!(
            "mount {node} {m} && cat {m}/.mados/disabled; rm -f {m}/.mados/table-backup.json; umount {m}"
        );
        let out = in_namespace(&read);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "once\n");
        let out = ok(&["enable", "--device", lo, "--yes"]);
        assert!(out.contains("was cleared"), "{out}");
        // with the backup on the filesystem gone, the claim in front of the
        // partition still has it: the table comes back exactly
        let out = ok(&["remove", "--device", lo, "--yes"]);
        assert!(out.contains("restored from the backup"), "{out}");
        assert!(!Path::new(&node).exists(), "the kernel still shows {node}");
        let table = |t: &str| {
            t.lines()
                .filter(|l| l.contains("start="))
                .map(|l| l.split_once(':').unwrap().1.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(table(&run("sfdisk", &["-d", lo])), table(&before));
        // with both backups gone (claim wiped too), remove deletes just the entry
        ok(&["enable", "--device", lo, "--size", "200M", "--yes"]);
        let start: u64 = run(
            "cat",
            &[&format!("/sys/block/{}/{}p3/start", &lo[5..], &lo[5..])],
        )
        .trim()
        .parse()
        .unwrap();
        let wipe = format!(
            "mount {node} {m} && rm -f {m}/.mados/table-backup.json && umount {m} && \
             dd if=/dev/zero of={lo} bs=512 seek={} count=2048 conv=notrunc status=none",
            start - 2048
        );
        assert!(in_namespace(&wipe).status.success());
        let out = ok(&["remove", "--device", lo, "--yes"]);
        assert!(out.contains("table entry deleted"), "{out}");
        assert!(!Path::new(&node).exists(), "the kernel still shows {node}");
    }
    drop(lo);
    assert_eq!(run("sfdisk", &["-d", img.to_str().unwrap()]), before);
    assert!(bytes(&img, 512, iso_len) == iso_before);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn refusals_exit_3_and_change_nothing() {
    if !require_root("refusals_exit_3_and_change_nothing") {
        return;
    }
    let d = tmpdir("manage-refuse");
    let plain = image("plain", &d, Some(GIB));
    let p = plain.to_str().unwrap();
    let sum = std::fs::read(&plain).unwrap();
    let e = refused(&["enable", "--device", p, "--yes"]);
    assert!(e.contains("no partition table"), "{e}");
    let (img, _) = grown("archiso", &d);
    let i = img.to_str().unwrap();
    let e = refused(&["enable", "--device", i]);
    assert!(e.contains("pass --yes"), "{e}");
    let e = refused(&["disable", "--device", i]);
    assert!(e.contains("no persistence partition"), "{e}");
    ok(&["enable", "--device", i, "--yes"]);
    let e = refused(&["remove", "--device", i]);
    assert!(e.contains("pass --yes"), "{e}");
    assert_eq!(plan_action(i), "use", "a refused remove changed the image");
    assert!(std::fs::read(&plain).unwrap() == sum);
    // usage errors exit 2
    assert_eq!(mp(&["enable", "--size", "50%"]).status.code(), Some(2));
    std::fs::remove_dir_all(&d).unwrap();
}

/// The claim's magic, at the offsets where its end copy may lie.
fn end_copies(img: &Path) -> Vec<u64> {
    let size = std::fs::metadata(img).unwrap().len();
    mados_persistence::disk::claim::Claim::end_candidates(size, 512)
        .into_iter()
        .filter(|&at| bytes(img, at, at + 16) == b"MADOS-PERSIST-CL")
        .collect()
}

/// Every partition's start and size in bytes, from `sfdisk --json`.
fn partitions(img: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&run("sfdisk", &["--json", img])).unwrap();
    let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    v["partitiontable"]["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["start"].as_u64().unwrap() * ss,
                        p["size"].as_u64().unwrap() * ss,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_reflash_much_smaller_finds_the_old_filesystem_by_its_end_copy() {
    if !require_root("a_reflash_much_smaller_finds_the_old_filesystem_by_its_end_copy") {
        return;
    }
    for layout in ["archiso", "archiso-uefi"] {
        let d = tmpdir(&format!("manage-far-{layout}"));
        // release 1: an image of 1.1 GiB; release 2: a few MiB
        let tree = d.join("tree1");
        std::fs::create_dir_all(tree.join("arch/x86_64")).unwrap();
        std::fs::File::create(tree.join("arch/x86_64/airootfs.sfs"))
            .unwrap()
            .set_len(1100 << 20)
            .unwrap();
        let img = d.join("stick.img");
        let st = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/mkimage"
        ))
        .args([layout, img.to_str().unwrap(), tree.to_str().unwrap()])
        .env("MKIMAGE_LABEL", "MADOS_R1")
        .status()
        .unwrap();
        assert!(st.success());
        std::fs::remove_dir_all(&tree).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(4 * GIB)
            .unwrap();
        let p = img.to_str().unwrap();
        let out = ok(&["enable", "--device", p, "--yes"]);
        assert!(out.contains("Persistence created"), "{out}");
        // ours: the last partition
        let (start, size) = partitions(p).into_iter().max().unwrap();
        assert_eq!(
            end_copies(&img),
            vec![start + size - (1 << 20)],
            "{layout}: the end copy"
        );
        // the filesystem's UUID: a new mkfs would change it
        let sb_uuid = start + 1024 + 0x68;
        let uuid = bytes(&img, sb_uuid, sb_uuid + 16);
        // release 2, written over it with dd
        let r2 = d.join("r2.img");
        let st = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/mkimage"
        ))
        .args([layout, r2.to_str().unwrap()])
        .env("MKIMAGE_LABEL", "MADOS_R2")
        .status()
        .unwrap();
        assert!(st.success());
        let r2_len = std::fs::metadata(&r2).unwrap().len();
        assert!(
            start > r2_len + GIB + (4 << 20),
            "{layout}: the old filesystem must lie past the 1 GiB scan"
        );
        run(
            "dd",
            &[
                &format!("if={}", r2.display()),
                &format!("of={p}"),
                "conv=notrunc",
                "status=none",
            ],
        );
        assert!(
            partitions(p).iter().all(|&(s, _)| s != start),
            "{layout}: the dd left the entry"
        );
        // the dry run says what enable will do
        assert_eq!(plan_action(p), "adopt", "{layout}");
        let text = ok(&["plan", "--device", p]);
        assert!(
            text.contains(&format!(
                "filesystem left by an earlier release is at byte {start}"
            )) && text.contains("never formatting it"),
            "{layout}: {text}"
        );
        let out = ok(&["enable", "--device", p, "--yes"]);
        assert!(out.contains("restored (its data kept)"), "{layout}: {out}");
        assert!(
            partitions(p).contains(&(start, size)),
            "{layout}: entry not put back"
        );
        assert_eq!(
            bytes(&img, sb_uuid, sb_uuid + 16),
            uuid,
            "{layout}: reformatted"
        );
        assert_eq!(plan_action(p), "use");
        // remove wipes both copies of the claim
        ok(&["remove", "--device", p, "--yes"]);
        assert_eq!(
            end_copies(&img),
            Vec::<u64>::new(),
            "{layout}: end copy left by remove"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
