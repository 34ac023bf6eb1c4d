//! Root tests on loop devices: create the partition on a real archiso
//! image through the same code `boot` uses, then boot-layer it in a private
//! mount namespace (`unshare -m`). Needs root; CI runs them.

mod common;

use common::*;
use mados_persistence::disk::stick;
use mados_persistence::manage::plan;
use mados_persistence::settings::config::Settings;
use std::path::Path;

const GIB: u64 = 1 << 30;

#[test]
fn create_on_a_loop_device_then_layer_in_a_private_namespace() {
    if !require_root("create_on_a_loop_device_then_layer_in_a_private_namespace") {
        return;
    }
    let d = tmpdir("root-apply");
    let img = image("archiso", &d, None);
    let iso_len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(GIB)
        .unwrap();
    let before_iso = bytes(&img, 512, iso_len);
    let before_sfdisk = run("sfdisk", &["-d", img.to_str().unwrap()]);
    let lo = LoopDev::attach(&img);
    let disk = Path::new(&lo.0);

    let backup_dir = d.join("run-state");
    let created = stick::create_partition(disk, &Settings::default(), &backup_dir).expect("create");
    assert_eq!(created.number, 3);
    assert_eq!(created.node, Path::new(&format!("{}p3", lo.0)));
    assert!(backup_dir.join("table-backup.json").exists());
    drop(created);

    // the kernel knows the new partition; blkid sees the filesystem
    let label = run(
        "blkid",
        &["-o", "value", "-s", "LABEL", &format!("{}p3", lo.0)],
    );
    assert_eq!(label.trim(), "persistence");
    // re-plan: nothing to do
    let v = plan::plan_device(disk, &Settings::default()).unwrap();
    assert_eq!(v["result"]["action"], "use", "{v:#}");
    // sfdisk shows the new entry, the old ones unchanged
    let after_sfdisk = run("sfdisk", &["-d", img.to_str().unwrap()]);
    for line in before_sfdisk.lines().filter(|l| l.contains(" : start=")) {
        assert!(
            after_sfdisk.contains(line.split_once(':').unwrap().1),
            "{line} changed:\n{after_sfdisk}"
        );
    }
    assert!(after_sfdisk.contains("type=83"), "{after_sfdisk}");
    // every byte of the ISO (and its appended EFI partition) but the MBR sector is identical
    assert!(
        bytes(&img, 512, iso_len) == before_iso,
        "ISO/EFI bytes changed"
    );

    // boot-layer it in a private mount namespace on a fake live root
    let root = d.join("new_root");
    for dir in ["etc", "usr", "var", "opt", "home/live", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("home/live/.profile"), "hi").unwrap();
    let run_dir = d.join("run");
    let bin = env!("CARGO_BIN_EXE_mados-persistence");
    let script = format!(
        "set -e
        {bin} boot --root {r} --run {run} --cmdline 'mados.persistence.device={lo}p3'
        echo written > {r}/etc/from-test
        echo mine > {r}/home/live/note
        echo tiered > {r}/var/log/app.log
        mkdir -p {r}/var/log/journal && echo direct > {r}/var/log/journal/j
        grep -c ' {r}/' /proc/self/mountinfo
        MADOS_PERSISTENCE_RUN={run}/mados-persistence {bin} sync
        sync",
        r = root.display(),
        run = run_dir.display(),
        lo = lo.0
    );
    let out = in_namespace(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mode persistent"), "{stdout}");
    // etc usr var opt overlays + home bind + /tmp + /var/tmp tmpfs + the
    // RAM tier's overlay on /var/log + its journal bound from /var
    assert!(
        stdout.lines().any(|l| l.trim() == "9"),
        "mount count: {stdout}"
    );
    assert!(
        stdout.contains("/var/log: synced:") && stdout.contains("durable on the stick"),
        "{stdout}"
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run_dir.join("mados-persistence/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["mode"], "persistent");
    assert_eq!(state["tiers"][0]["dir"], "/var/log", "{state}");
    // the namespace is gone, nothing leaked into ours
    assert!(
        !root.join("etc/from-test").exists(),
        "overlay leaked out of the namespace"
    );
    // what was written went to the partition
    let mnt = d.join("check");
    std::fs::create_dir_all(&mnt).unwrap();
    let check = format!(
        "mount {lo}p3 {m} && cat {m}/overlays/etc/upper/from-test {m}/home/live/note {m}/home/live/.profile \
         {m}/tier/var-log/stage/app.log {m}/overlays/var/upper/log/journal/j; umount {m}",
        lo = lo.0,
        m = mnt.display()
    );
    let out = in_namespace(&check);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        // .profile was written without a newline
        "written\nmine\nhitiered\ndirect\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the next boot folds the sync into the tier's lower and shows it
    let again = format!(
        "set -e
        {bin} boot --root {r} --run {run} --cmdline 'mados.persistence.device={lo}p3' >/dev/null
        cat {r}/var/log/app.log {r}/var/log/journal/j
        ls {run}/mados/persistence/tier/var-log/stage | wc -l
        stat -c '%a %U' {run}/mados/persistence {run}/mados/tier",
        r = root.display(),
        run = run_dir.display(),
        lo = lo.0
    );
    let out = in_namespace(&again);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        // the partition and the tier's RAM are root's only
        "tiered\ndirect\n0\n700 root\n700 root\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(lo);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A 256 MiB ext4 filesystem labelled `persistence` on a loop device.
fn persistence_loop(d: &Path) -> LoopDev {
    let part = d.join("part.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-L",
            "persistence",
            "-F",
            part.to_str().unwrap(),
        ],
    );
    LoopDev::attach(&part)
}

#[test]
fn failed_layering_falls_back_to_ram_and_unmounts() {
    if !require_root("failed_layering_falls_back_to_ram_and_unmounts") {
        return;
    }
    let d = tmpdir("root-fallback");
    let lo = persistence_loop(&d);
    // /home is a file in this live root: the bind fails after the four
    // overlays were mounted, and they must be undone
    let root = d.join("new_root");
    for dir in ["etc", "usr", "var", "opt"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("home"), "not a directory").unwrap();
    let run_dir = d.join("run");
    let bin = env!("CARGO_BIN_EXE_mados-persistence");
    let script = format!(
        "{bin} boot --root {r} --run {run} --cmdline 'mados.persistence.device={lo}' && grep -c ' {r}/' /proc/self/mountinfo || true",
        r = root.display(),
        run = run_dir.display(),
        lo = lo.0
    );
    let out = in_namespace(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mode ram"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run_dir.join("mados-persistence/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["reason"]["code"], "mount_failed", "{state:#}");
    // only the RAM-mode tmpfs mounts remain (/tmp, /var/tmp): the overlays were undone
    let mounts: Vec<&str> = state["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["fstype"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["tmpfs", "tmpfs"], "{state:#}");
    assert!(
        stdout.lines().any(|l| l.trim() == "2"),
        "mounts left in the namespace: {stdout}"
    );
    drop(lo);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A persistence filesystem that is already mounted (elsewhere, or as
/// archiso's own cowspace) is never checked or mounted a second time: two
/// ext4 instances over the same blocks corrupt it.
#[test]
fn a_mounted_filesystem_is_never_mounted_twice() {
    if !require_root("a_mounted_filesystem_is_never_mounted_twice") {
        return;
    }
    let d = tmpdir("root-inuse");
    let lo = persistence_loop(&d);
    let root = d.join("new_root");
    for dir in ["etc", "usr", "var", "opt", "home"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_mados-persistence");
    let cases = [
        // mounted somewhere: named by our own parameter, still refused
        (
            "elsewhere",
            format!("mount {lo} {d}/elsewhere && ", lo = lo.0, d = d.display()),
            format!("mados.persistence.device={}", lo.0),
            "in_use",
        ),
        // archiso mounted it as its cowspace (cow_label= on the command line)
        (
            "cowspace",
            format!("mount {lo} /run/archiso/cowspace && ", lo = lo.0),
            "archisolabel=X cow_label=persistence".to_string(),
            "archiso_cow",
        ),
        // ... or the cowspace is a block device filesystem whatever the command line says
        (
            "cowspace-only",
            format!("mount {lo} /run/archiso/cowspace && ", lo = lo.0),
            format!("mados.persistence.device={}", lo.0),
            "archiso_cow",
        ),
    ];
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    for (name, pre, cmdline, code) in cases {
        let run_dir = d.join(format!("run-{name}"));
        let script = format!(
            "mount -t tmpfs none /run && mkdir -p /run/archiso/cowspace && \
             {pre} before=$(grep -c ' - ext4 ' /proc/self/mountinfo) && \
             {bin} boot --root {r} --run {run} --cmdline '{cmdline}' && \
             echo new-ext4-mounts $(( $(grep -c ' - ext4 ' /proc/self/mountinfo) - before ))",
            r = root.display(),
            run = run_dir.display(),
        );
        let out = in_namespace(&script);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("mode ram"),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("new-ext4-mounts 0"),
            "{name}: mounted a second time: {stdout}"
        );
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(run_dir.join("mados-persistence/state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(state["reason"]["code"], code, "{name}: {state:#}");
    }
    drop(lo);
    std::fs::remove_dir_all(&d).unwrap();
}
