//! Root tests of encrypted persistence: `disk::cryptsetup` against the real
//! cryptsetup on a loop device (the cost written, the label found in the
//! binary header without unlocking, right and wrong passphrases, a
//! crash-safe passphrase change, header backup, erase and restore), and
//! `enable --encrypt --device IMG`: with device-mapper in the kernel the
//! whole creation and the marker check (a random marker written into the
//! unlocked filesystem is not in the raw image; the same on a clear image
//! is, so the check can fail); without it, the failure leaves the image's
//! table and free space as they were (the whole path then runs in QEMU).

mod common;

use common::*;
use mados_persistence::disk::cryptsetup::{self, Pbkdf, Secret};
use mados_persistence::disk::luks;
use std::path::Path;
use std::process::{Command, Stdio};

/// Cheap enough for tests; the default's unlock is timed separately.
const TEST_COST: Pbkdf = Pbkdf {
    memory_kib: 65536,
    iterations: 4,
    parallel: 1,
};

fn secret(s: &str) -> Secret {
    Secret::new(s.as_bytes().to_vec()).unwrap()
}

fn has_device_mapper() -> bool {
    let kernel = std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"));
    assert_eq!(
        kernel,
        cryptsetup::device_mapper_available(),
        "device_mapper_available() disagrees with /proc/misc"
    );
    kernel
}

/// Does `needle` occur anywhere in the file (read in 1 MiB chunks that
/// overlap by the needle's length)?
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut carry: Vec<u8> = vec![];
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

#[test]
fn cryptsetup_module_on_a_loop_device() {
    if !require_root("cryptsetup_module_on_a_loop_device") {
        return;
    }
    let d = tmpdir("luks-module");
    let img = d.join("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let lo = LoopDev::attach(&img);
    let dev = Path::new(&lo.0);
    let old = secret("correct horse battery staple");
    cryptsetup::format(dev, &old, &TEST_COST).expect("luksFormat");
    // not labelled until its creation is finished
    let h = luks::probe(&mut std::fs::File::open(dev).unwrap())
        .unwrap()
        .expect("a LUKS2 header");
    assert_eq!(h.label, "");
    cryptsetup::set_label(dev).unwrap();

    // the label from the binary header, without unlocking, on the real bytes
    let h = luks::probe(&mut std::fs::File::open(dev).unwrap())
        .unwrap()
        .expect("a LUKS2 header");
    assert_eq!(h.label, "persistence");
    assert!(!h.secondary);
    // and from the secondary copy once the primary one is gone
    let mut copy = bytes(&img, 0, 1 << 20);
    copy[..4096].fill(0);
    let h2 = luks::probe(&mut std::io::Cursor::new(copy))
        .unwrap()
        .unwrap();
    assert!(h2.secondary && h2.label == "persistence" && h2.uuid == h.uuid);

    // the cost as asked, fixed (not benchmarked)
    let dump = cryptsetup::dump(dev).unwrap();
    assert_eq!(dump.keyslots.len(), 1);
    let k = &dump.keyslots[0];
    assert_eq!(k.kdf, "argon2id");
    assert_eq!(k.memory_kib, Some(65536));
    assert_eq!(k.iterations, 4);
    assert_eq!(k.cpus, Some(1));
    assert!(dump.cipher.starts_with("aes-xts"), "{dump:?}");
    let text = run("cryptsetup", &["luksDump", &lo.0]);
    assert!(text.contains("Label:         \tpersistence"), "{text}");

    assert!(cryptsetup::test_passphrase(dev, &old).unwrap());
    assert!(!cryptsetup::test_passphrase(dev, &secret("wrong")).unwrap());

    // the passphrase change: the new one works, the old one no more
    let new = secret("new passphrase");
    cryptsetup::change_passphrase(dev, &old, &new, &TEST_COST).unwrap();
    assert!(cryptsetup::test_passphrase(dev, &new).unwrap());
    assert!(!cryptsetup::test_passphrase(dev, &old).unwrap());
    assert_eq!(cryptsetup::dump(dev).unwrap().keyslots.len(), 1);
    // a wrong old passphrase changes nothing
    assert!(cryptsetup::change_passphrase(dev, &old, &secret("x"), &TEST_COST).is_err());
    assert!(cryptsetup::test_passphrase(dev, &new).unwrap());
    assert_eq!(cryptsetup::dump(dev).unwrap().keyslots.len(), 1);

    // header backup, erase (nothing opens it), restore (it opens again)
    let hb = d.join("header.bin");
    cryptsetup::header_backup(dev, &hb).unwrap();
    cryptsetup::erase(dev).unwrap();
    // no key slot left at all: cryptsetup says so (exit 1), not "wrong"
    let after = cryptsetup::test_passphrase(dev, &new);
    assert!(
        after
            .as_ref()
            .is_err_and(|e| e.to_string().contains("No usable keyslot")),
        "{after:?}"
    );
    assert!(cryptsetup::dump(dev).unwrap().keyslots.is_empty());
    cryptsetup::header_restore(dev, &hb).unwrap();
    assert!(cryptsetup::test_passphrase(dev, &new).unwrap());

    // the default cost: what an unlock takes here (logged for README)
    let t0 = std::time::Instant::now();
    cryptsetup::format(dev, &old, &cryptsetup::DEFAULT_PBKDF).unwrap();
    let fmt = t0.elapsed();
    let t0 = std::time::Instant::now();
    assert!(cryptsetup::test_passphrase(dev, &old).unwrap());
    eprintln!(
        "default cost (argon2id {} KiB, {} passes): luksFormat {:.2} s, unlock {:.2} s",
        cryptsetup::DEFAULT_PBKDF.memory_kib,
        cryptsetup::DEFAULT_PBKDF.iterations,
        fmt.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(lo);
    std::fs::remove_dir_all(&d).unwrap();
}

fn grown_image(d: &Path) -> std::path::PathBuf {
    let img = image("archiso", d, None);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    img
}

/// (start, size) of partition `n` from `sfdisk --json`.
fn partition(img: &Path, n: usize) -> (u64, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["--json", img.to_str().unwrap()])).unwrap();
    let p = &v["partitiontable"]["partitions"][n - 1];
    let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    (
        p["start"].as_u64().unwrap() * ss,
        p["size"].as_u64().unwrap() * ss,
    )
}

#[test]
fn enable_encrypt_on_an_image() {
    if !require_root("enable_encrypt_on_an_image") {
        return;
    }
    let d = tmpdir("luks-enable");
    let img = grown_image(&d);
    let p = img.to_str().unwrap();
    let pw = d.join("pw");
    std::fs::write(&pw, "marker test passphrase\n").unwrap();
    let table_before = run("sfdisk", &["-d", p]);
    let o = mp(&[
        "enable",
        "--device",
        p,
        "--yes",
        "--encrypt",
        "--passphrase-file",
        pw.to_str().unwrap(),
        "--pbkdf-test-cost",
        "65536:4",
    ]);
    let out = text(&o);
    assert!(
        !out.contains("marker test passphrase"),
        "the passphrase in the output: {out}"
    );
    if !has_device_mapper() {
        // this kernel cannot map the volume: refused before anything is
        // written (the table as before, no LUKS header in the free space)
        eprintln!("no device-mapper in this kernel: checking the refusal (QEMU runs the rest)");
        assert_eq!(o.status.code(), Some(3), "{out}");
        assert!(out.contains("no device-mapper"), "{out}");
        assert_eq!(run("sfdisk", &["-d", p]), table_before, "{out}");
        let plan: serde_json::Value =
            serde_json::from_str(&text(&mp(&["plan", "--device", p, "--json"]))).unwrap();
        assert_eq!(plan["result"]["action"], "create", "{plan}");
        let start = plan["result"]["plan"]["start"].as_u64().unwrap();
        let mut f = std::fs::File::open(&img).unwrap();
        let mut w = mados_persistence::disk::superblock::Window::new(&mut f, start, 64 << 20);
        assert_eq!(
            luks::probe(&mut w).unwrap(),
            None,
            "a LUKS header left behind"
        );
        std::fs::remove_dir_all(&d).unwrap();
        return;
    }
    assert!(o.status.success(), "{out}");
    assert!(out.contains("encrypted"), "{out}");
    let (start, size) = partition(&img, 3);
    let part = loop_part(p, start, size);
    let dump = cryptsetup::dump(Path::new(&part)).unwrap();
    assert_eq!(dump.keyslots[0].kdf, "argon2id");
    assert_eq!(dump.keyslots[0].memory_kib, Some(65536));
    assert_eq!(dump.keyslots[0].iterations, 4);
    assert!(run("cryptsetup", &["luksDump", &part]).contains("Label:         \tpersistence"));
    let marker = format!(
        "MADOS-MARKER-{:016x}{:016x}",
        Rng(std::process::id() as u64 * 7919).next(),
        Rng(0x5eed).next()
    );
    let script = format!(
        "set -e; printf '%s' 'marker test passphrase' | cryptsetup open --key-file - {part} luks-test-{pid}; \
         blkid -o value -s LABEL /dev/mapper/luks-test-{pid}; m=$(mktemp -d); \
         mount /dev/mapper/luks-test-{pid} $m; for i in $(seq 50); do echo {marker}; done > $m/marker; \
         sync; umount $m; cryptsetup close luks-test-{pid}",
        pid = std::process::id()
    );
    let o = in_namespace(&script);
    let _ = Command::new("losetup").args(["-d", &part]).status();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("persistence"),
        "{}",
        text(&o)
    );
    assert!(
        !file_contains(&img, marker.as_bytes()),
        "the marker is in the raw image in clear"
    );
    // the control: the same on a clear image finds it
    let clear = d.join("clear");
    std::fs::create_dir_all(&clear).unwrap();
    let cimg = grown_image(&clear);
    let o = mp(&["enable", "--device", cimg.to_str().unwrap(), "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let (cs, cz) = partition(&cimg, 3);
    let o = in_namespace(&format!(
        "set -e; l=$(losetup -f --show -o {cs} --sizelimit {cz} {img}); m=$(mktemp -d); mount $l $m; \
         for i in $(seq 50); do echo {marker}; done > $m/marker; sync; umount $m; losetup -d $l",
        img = cimg.display()
    ));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        file_contains(&cimg, marker.as_bytes()),
        "the check cannot fail: the marker is not found on a clear image"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// An image with an encrypted persistence made without device-mapper:
/// `enable` makes partition 3 (its claim and table backup), then a LUKS2
/// volume labelled `persistence` is formatted over it (no filesystem
/// inside: what the header commands and `remove` act on is the header).
fn encrypted_image(d: &Path, pass: &str) -> (std::path::PathBuf, String) {
    let img = grown_image(d);
    let p = img.to_str().unwrap().to_string();
    let before = run("sfdisk", &["-d", &p]);
    let o = mp(&["enable", "--device", &p, "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let (start, size) = partition(&img, 3);
    let part = loop_part(&p, start, size);
    let part = part.trim();
    cryptsetup::format(Path::new(part), &secret(pass), &TEST_COST).unwrap();
    cryptsetup::set_label(Path::new(part)).unwrap();
    run("losetup", &["-d", part]);
    (img, before)
}

fn opens(img: &Path, pass: &str) -> bool {
    let (start, size) = partition(img, 3);
    let part = loop_part(img.to_str().unwrap(), start, size);
    let r = cryptsetup::test_passphrase(Path::new(part.trim()), &secret(pass)).unwrap();
    run("losetup", &["-d", part.trim()]);
    r
}

#[test]
fn passphrase_header_backup_and_remove_on_an_encrypted_image() {
    if !require_root("passphrase_header_backup_and_remove_on_an_encrypted_image") {
        return;
    }
    let d = tmpdir("luks-cmds");
    let (img, table_before) = encrypted_image(&d, "first secret");
    let p = img.to_str().unwrap();
    let f = |name: &str, content: &str| {
        let path = d.join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (one, two, three, wrong) = (
        f("one", "first secret\n"),
        f("two", "second secret"),
        f("three", "third secret"),
        f("wrong", "not it"),
    );
    let plan: serde_json::Value =
        serde_json::from_str(&text(&mp(&["plan", "--device", p, "--json"]))).unwrap();
    assert_eq!(plan["result"]["action"], "use", "{plan}");
    assert_eq!(plan["result"]["encrypted"], true);
    let again = text(&mp(&["enable", "--device", p, "--yes"]));
    assert!(
        again.contains("already has encrypted persistence"),
        "{again}"
    );

    // a wrong current passphrase: refused, nothing changed
    let o = mp(&[
        "passphrase",
        "--device",
        p,
        "--old-passphrase-file",
        &wrong,
        "--new-passphrase-file",
        &two,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(opens(&img, "first secret") && !opens(&img, "second secret"));
    // changed: the new one opens it, the old one no more, the cost kept
    let o = mp(&[
        "passphrase",
        "--device",
        p,
        "--old-passphrase-file",
        &one,
        "--new-passphrase-file",
        &two,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for secret_text in ["first secret", "second secret"] {
        assert!(
            !text(&o).contains(secret_text),
            "a passphrase in the output: {}",
            text(&o)
        );
    }
    assert!(opens(&img, "second secret") && !opens(&img, "first secret"));

    // header backup: 0600, never over a file; restore brings back the
    // passphrase it was made with
    let hb = d.join("header.img");
    let hbs = hb.to_str().unwrap();
    let o = mp(&["header-backup", hbs, "--device", p]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("valid NOW opens the stick forever"),
        "{}",
        text(&o)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&hb).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        mp(&["header-backup", hbs, "--device", p]).status.code(),
        Some(3)
    );
    let o = mp(&[
        "passphrase",
        "--device",
        p,
        "--old-passphrase-file",
        &two,
        "--new-passphrase-file",
        &three,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(opens(&img, "third secret") && !opens(&img, "second secret"));
    let o = mp(&["header-backup", "--restore", hbs, "--device", p, "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(opens(&img, "second secret") && !opens(&img, "third secret"));

    // disable cannot leave its flag without unlocking it: refused
    let o = mp(&["disable", "--device", p]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("encrypted and not unlocked here"),
        "{}",
        text(&o)
    );
    // remove: the table as before enable, the whole LUKS2 header area
    // zero. Three more key slots first: the fourth lies across the first
    // MiB (a wipe of the first MiB only would leave part of it)
    let (start, size) = partition(&img, 3);
    let part = loop_part(p, start, size);
    let part = part.trim().to_string();
    let two_nl = f("two-exact", "second secret");
    for n in 0..3 {
        let k = f(&format!("k{n}"), &format!("extra {n}"));
        run(
            "cryptsetup",
            &[
                "luksAddKey",
                "--batch-mode",
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "65536",
                "--pbkdf-force-iterations",
                "4",
                "--key-file",
                &two_nl,
                "--new-keyfile",
                &k,
                &part,
            ],
        );
    }
    run("losetup", &["-d", &part]);
    let beyond = bytes(&img, start + (1 << 20), start + cryptsetup::HEADER_AREA);
    assert!(
        beyond.iter().any(|&b| b != 0),
        "no key slot data past the first MiB: the check below could not fail"
    );
    let o = mp(&["remove", "--device", p, "--yes"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("can no longer be decrypted"), "{out}");
    assert_eq!(run("sfdisk", &["-d", p]), table_before);
    let head = bytes(&img, start, start + cryptsetup::HEADER_AREA);
    assert!(
        head.iter().all(|&b| b == 0),
        "the LUKS2 header area is not wiped"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_encrypted_creation_cut_is_finished_encrypted_only() {
    if !require_root("an_encrypted_creation_cut_is_finished_encrypted_only") {
        return;
    }
    let d = tmpdir("luks-cut");
    let img = grown_image(&d);
    let p = img.to_str().unwrap();
    // a creation cut before mkfs: the claim and the table entry, nothing
    // in the partition; then what luksFormat leaves (our creation labels
    // the volume last, so a cut before leaves it unlabelled)
    let o = Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
        .args(["enable", "--device", p, "--yes"])
        .env("MADOS_PERSISTENCE_CUT", "mkfs")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let (start, size) = partition(&img, 3);
    let part = loop_part(p, start, size);
    cryptsetup::format(Path::new(part.trim()), &secret("never durable"), &TEST_COST).unwrap();
    run("losetup", &["-d", part.trim()]);
    let plan: serde_json::Value =
        serde_json::from_str(&text(&mp(&["plan", "--device", p, "--json"]))).unwrap();
    assert_eq!(plan["result"]["action"], "resume", "{plan}");
    // not finished as a clear one
    let o = mp(&["enable", "--device", p, "--yes"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("enable --encrypt"), "{}", text(&o));
    let h = luks::probe(&mut std::io::Cursor::new(bytes(
        &img,
        start,
        start + (1 << 20),
    )))
    .unwrap()
    .expect("the LUKS2 header is still there");
    assert_eq!(h.label, "");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_encrypted_persistence_whose_entry_is_gone_is_adopted_not_reformatted() {
    if !require_root("an_encrypted_persistence_whose_entry_is_gone_is_adopted_not_reformatted") {
        return;
    }
    let d = tmpdir("luks-adopt");
    let (img, _) = encrypted_image(&d, "kept secret");
    let p = img.to_str().unwrap();
    let (start, size) = partition(&img, 3);
    // the entry gone as after a re-flash with the same image (the end
    // copy of the claim names the volume)
    run("sfdisk", &["--quiet", "--delete", p, "3"]);
    let plan: serde_json::Value =
        serde_json::from_str(&text(&mp(&["plan", "--device", p, "--json"]))).unwrap();
    assert_eq!(plan["result"]["action"], "adopt", "{plan}");
    let header = bytes(&img, start, start + (1 << 20));
    // with --encrypt too: the volume keeps its own passphrase
    let o = mp(&[
        "enable",
        "--device",
        p,
        "--yes",
        "--encrypt",
        "--passphrase-file",
        "/dev/null",
    ]);
    let out = text(&o);
    if has_device_mapper() {
        assert!(o.status.success(), "{out}");
    } else {
        assert_eq!(o.status.code(), Some(3), "{out}");
        let o = mp(&["enable", "--device", p, "--yes"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("it is encrypted"), "{}", text(&o));
    }
    assert_eq!(partition(&img, 3), (start, size));
    assert!(
        bytes(&img, start, start + (1 << 20)) == header,
        "the volume's header changed"
    );
    assert!(opens(&img, "kept secret"));
    let plan: serde_json::Value =
        serde_json::from_str(&text(&mp(&["plan", "--device", p, "--json"]))).unwrap();
    assert_eq!(
        (
            plan["result"]["action"].as_str(),
            plan["result"]["encrypted"].as_bool()
        ),
        (Some("use"), Some(true))
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// A passphrase change killed anywhere (the command and its cryptsetup,
/// the whole process group, SIGKILL) leaves a passphrase that opens the
/// volume: the old one or the new one, never none. Not a power cut (the
/// page cache survives a kill), but every instant of the add, the check
/// and the removal: 8 instants spread over an uncut change's own time.
#[test]
fn a_passphrase_change_killed_anywhere_leaves_one_that_opens() {
    if !require_root("a_passphrase_change_killed_anywhere_leaves_one_that_opens") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let d = tmpdir("luks-pass-kill");
    let (img, _) = encrypted_image(&d, "old secret");
    let (one, two) = (d.join("one"), d.join("two"));
    std::fs::write(&one, "old secret").unwrap();
    std::fs::write(&two, "new secret").unwrap();
    let change = |img: &Path| {
        Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
            .args(["passphrase", "--device"])
            .arg(img)
            .arg("--old-passphrase-file")
            .arg(&one)
            .arg("--new-passphrase-file")
            .arg(&two)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let detach = |img: &Path| {
        let _ = Command::new("losetup")
            .args(["-j"])
            .arg(img)
            .output()
            .map(|o| {
                for l in String::from_utf8_lossy(&o.stdout).lines() {
                    if let Some(dev) = l.split(':').next() {
                        let _ = Command::new("losetup").args(["-d", dev]).status();
                    }
                }
            });
    };
    // the uncut change, timed
    let whole = d.join("whole.img");
    run(
        "cp",
        &[
            "--sparse=always",
            img.to_str().unwrap(),
            whole.to_str().unwrap(),
        ],
    );
    let t0 = std::time::Instant::now();
    assert!(change(&whole).wait().unwrap().success());
    let took = t0.elapsed();
    assert!(opens(&whole, "new secret") && !opens(&whole, "old secret"));
    let mut seen = (0, 0, 0); // old only, new only, both
    for i in 1..=8u32 {
        let cut = d.join(format!("cut{i}.img"));
        run(
            "cp",
            &[
                "--sparse=always",
                img.to_str().unwrap(),
                cut.to_str().unwrap(),
            ],
        );
        let mut child = change(&cut);
        std::thread::sleep(took * i / 9);
        let pg = nix::unistd::Pid::from_raw(-(child.id() as i32));
        let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        // (a cryptsetup still exiting holds the image: wait for the group)
        while nix::sys::signal::kill(pg, None).is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        detach(&cut);
        let (o, n) = (opens(&cut, "old secret"), opens(&cut, "new secret"));
        eprintln!(
            "killed at {:?} of {took:?}: old opens {o}, new opens {n}",
            took * i / 9
        );
        assert!(
            o || n,
            "killed at {:?}: no passphrase opens it",
            took * i / 9
        );
        match (o, n) {
            (true, false) => seen.0 += 1,
            (false, true) => seen.1 += 1,
            _ => seen.2 += 1,
        }
        std::fs::remove_file(&cut).unwrap();
    }
    eprintln!("old only {}, new only {}, both {}", seen.0, seen.1, seen.2);
    std::fs::remove_dir_all(&d).unwrap();
}
