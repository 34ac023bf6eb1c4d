//! The RAM tier rig of the root tests: an ext4 "partition" on a loop
//! device mounted as `boot` mounts it, a tmpfs "RAM", the tier overlay on
//! `view` over a fake live image, in the calling thread's own private mount
//! namespace.

use super::{private_mounts, tmpdir};
use mados_persistence::boot::tier::{OVERLAY_OPTIONS, Tier};
use mados_persistence::util::overlayfs::{FoldOptions, fold};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Rig {
    pub d: PathBuf,
    pub view: PathBuf,
    pub image: PathBuf,
    pub tier: Tier,
}

pub fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
    assert!(st.success(), "{cmd}");
}

/// A private mount namespace for this thread, an ext4 "partition" (mounted
/// with the options `boot` uses) and a
/// tmpfs "RAM", and the tier overlay mounted on `view`.
pub fn rig(tag: &str) -> Rig {
    private_mounts();
    let d = tmpdir(tag);
    let pm = d.join("pm");
    let ram = d.join("ram");
    let image = d.join("image");
    for p in [&pm, &ram, &image, &d.join("view")] {
        fs::create_dir_all(p).unwrap();
    }
    sh(&format!(
        "truncate -s 256M {0}/part.img && mkfs.ext4 -q -F -b 4096 {0}/part.img && mount -o loop,noatime,commit=60 {0}/part.img {1} && mount -t tmpfs -o size=128M ram {2}",
        d.display(),
        pm.display(),
        ram.display()
    ));
    // what the live image has in the dir
    fs::create_dir_all(image.join("old-dir/sub")).unwrap();
    fs::write(image.join("old-dir/sub/a"), "image a").unwrap();
    fs::write(image.join("keep"), "image keep").unwrap();
    fs::write(image.join("edit-me"), "image version").unwrap();
    fs::write(image.join("delete-me"), "image").unwrap();
    let base = pm.join("tier/t");
    let tier = Tier {
        dir: "/t".into(),
        base: base.display().to_string(),
        lower: base.join("lower").display().to_string(),
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

pub fn mount_view(r: &Rig) {
    for p in [&r.tier.lower, &r.tier.stage, &r.tier.upper, &r.tier.work] {
        fs::create_dir_all(p).unwrap();
    }
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={},{OVERLAY_OPTIONS}",
        r.tier.lower,
        r.image.display(),
        r.tier.upper,
        r.tier.work
    );
    sh(&format!(
        "mount -t overlay -o {opts} tier {}",
        r.view.display()
    ));
}

/// "Reboot": unmount, drop the RAM upper and tmp, fold the stage into the
/// lower (as boot does), mount again with an empty upper.
pub fn reboot(r: &Rig) {
    sh(&format!("umount {}", r.view.display()));
    fs::remove_dir_all(&r.tier.upper).unwrap();
    fs::remove_dir_all(&r.tier.work).unwrap();
    // as boot does: a cut sync's leftovers in tmp go
    let _ = fs::remove_dir_all(&r.tier.tmp);
    fold(
        Path::new(&r.tier.stage),
        Path::new(&r.tier.lower),
        &FoldOptions {
            keep_whiteouts: true,
            skip: &[],
        },
    )
    .unwrap();
    mount_view(r);
}
