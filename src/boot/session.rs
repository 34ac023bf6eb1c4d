//! A RAM session saved by `enable`, put in place all or nothing.
//!
//! `enable` in a RAM session copies the session's changes into a staging
//! dir on the new partition (`.mados/session/`, laid out like the
//! partition: `overlays/<dir>/upper`, `home`), makes it durable, and only
//! then writes the `complete` mark. `finish` (run by `enable` right after,
//! and by every boot before it layers) folds a complete staging dir into
//! place, an overlay upper over what is there with its whiteouts kept, a
//! bind dir as plain files (`util::overlayfs::fold`: one rename or removal
//! a step, idempotent), then removes it. A staging dir without the mark is
//! what a cut during the copy left: it is removed, and the boot goes on as
//! if `enable` had only created the partition (it never said "saved").

use crate::util::fsutil;
use crate::util::overlayfs::{self, FoldOptions, fold};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub const STAGING: &str = ".mados/session";
const COMPLETE: &str = "complete";

pub fn staging(pm: &Path) -> PathBuf {
    pm.join(STAGING)
}

/// Make the copy in the staging dir durable, then mark it complete (the
/// mark is written only after everything it vouches for is on the stick,
/// whatever the data mode: `data=writeback` does not order file data
/// before a later fsync's commit).
pub fn mark_complete(pm: &Path) -> Result<()> {
    let f = std::fs::File::open(pm).with_context(|| format!("opening {}", pm.display()))?;
    nix::unistd::syncfs(&f).context("syncing the partition")?;
    crate::disk::stick::cut_point("session-copied");
    fsutil::write_atomic(&staging(pm).join(COMPLETE), b"complete\n")?;
    nix::unistd::syncfs(&f).context("syncing the partition")
}

/// What `finish` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    Nothing,
    /// A complete save was put in place.
    Placed,
    /// An incomplete save (cut during the copy) was removed.
    Discarded,
}

/// Put a complete saved session in place, or drop an incomplete one.
/// Offline: nothing on the partition may be mounted as an overlay layer.
pub fn finish(pm: &Path) -> Result<Finished> {
    let st = staging(pm);
    let meta = match std::fs::symlink_metadata(&st) {
        Err(_) => return Ok(Finished::Nothing),
        Ok(m) => m,
    };
    if !meta.is_dir() || !fsutil::exists_nofollow(&st.join(COMPLETE)) {
        overlayfs::remove_all(&st)?;
        overlayfs::fsync_dir(st.parent().unwrap_or(pm))?;
        return Ok(Finished::Discarded);
    }
    let overlays = st.join("overlays");
    if overlays.is_dir() {
        for e in std::fs::read_dir(&overlays)
            .with_context(|| format!("listing {}", overlays.display()))?
        {
            let name = e?.file_name();
            let src = overlays.join(&name).join("upper");
            if !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let dst = pm.join("overlays").join(&name).join("upper");
            fold(
                &src,
                &dst,
                &FoldOptions {
                    keep_whiteouts: true,
                    skip: &[],
                },
            )
            .with_context(|| format!("placing the saved {}", dst.display()))?;
        }
    }
    for e in std::fs::read_dir(&st).with_context(|| format!("listing {}", st.display()))? {
        let name = e?.file_name();
        if name == "overlays" || name == COMPLETE {
            continue;
        }
        let src = st.join(&name);
        if !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        fold(
            &src,
            &pm.join(&name),
            &FoldOptions {
                keep_whiteouts: false,
                skip: &[],
            },
        )
        .with_context(|| format!("placing the saved {}", name.to_string_lossy()))?;
    }
    // everything is in place (each fold fsynced what it changed); the mark
    // goes with the rest
    overlayfs::remove_all(&st)?;
    overlayfs::fsync_dir(st.parent().unwrap_or(pm))?;
    Ok(Finished::Placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    use crate::util::testutil::is_root;

    fn tmp(name: &str) -> PathBuf {
        crate::util::testutil::tmp(&format!("session-{name}"))
    }

    /// A partition with an older upper and home, and a staged save.
    fn scene(pm: &Path) {
        fs::create_dir_all(pm.join("overlays/etc/upper/keep")).unwrap();
        fs::write(pm.join("overlays/etc/upper/old"), "old").unwrap();
        fs::write(pm.join("overlays/etc/upper/keep/a"), "a").unwrap();
        fs::create_dir_all(pm.join("home/live")).unwrap();
        fs::write(pm.join("home/live/x"), "old x").unwrap();
        let st = staging(pm);
        fs::create_dir_all(st.join("overlays/etc/upper/keep")).unwrap();
        fs::create_dir_all(st.join("overlays/usr/upper/bin")).unwrap();
        fs::write(st.join("overlays/etc/upper/old"), "new").unwrap();
        fs::write(st.join("overlays/etc/upper/keep/b"), "b").unwrap();
        fs::write(st.join("overlays/usr/upper/bin/tool"), "tool").unwrap();
        overlayfs::make_whiteout(&st.join("overlays/etc/upper/gone")).unwrap();
        fs::create_dir_all(st.join("home/live")).unwrap();
        fs::write(st.join("home/live/x"), "new x").unwrap();
    }

    #[test]
    fn a_complete_save_is_placed_and_an_incomplete_one_dropped() {
        if !is_root() {
            eprintln!("skipped: whiteouts need root");
            return;
        }
        let pm = tmp("complete");
        assert_eq!(finish(&pm).unwrap(), Finished::Nothing);
        scene(&pm);
        // a cut during the copy: no mark
        assert_eq!(finish(&pm).unwrap(), Finished::Discarded);
        assert!(!staging(&pm).exists());
        assert_eq!(
            fs::read_to_string(pm.join("overlays/etc/upper/old")).unwrap(),
            "old"
        );
        assert!(!pm.join("overlays/usr").exists());
        scene(&pm);
        mark_complete(&pm).unwrap();
        assert_eq!(finish(&pm).unwrap(), Finished::Placed);
        assert!(!staging(&pm).exists());
        let up = pm.join("overlays/etc/upper");
        assert_eq!(fs::read_to_string(up.join("old")).unwrap(), "new");
        assert_eq!(fs::read_to_string(up.join("keep/a")).unwrap(), "a");
        assert_eq!(fs::read_to_string(up.join("keep/b")).unwrap(), "b");
        let w = fs::symlink_metadata(up.join("gone")).unwrap();
        assert!(
            overlayfs::is_whiteout(&up.join("gone"), &w),
            "the whiteout is kept"
        );
        assert_eq!(
            fs::read_to_string(pm.join("overlays/usr/upper/bin/tool")).unwrap(),
            "tool"
        );
        assert_eq!(fs::read_to_string(pm.join("home/live/x")).unwrap(), "new x");
        assert_eq!(finish(&pm).unwrap(), Finished::Nothing);
        fs::remove_dir_all(&pm).unwrap();
    }

    #[test]
    fn a_placement_cut_halfway_is_finished_by_the_next_run() {
        if !is_root() {
            eprintln!("skipped: whiteouts need root");
            return;
        }
        let pm = tmp("halfway");
        scene(&pm);
        mark_complete(&pm).unwrap();
        // as a cut after the first fold: /etc in place, the rest not yet
        fold(
            &staging(&pm).join("overlays/etc/upper"),
            &pm.join("overlays/etc/upper"),
            &FoldOptions {
                keep_whiteouts: true,
                skip: &[],
            },
        )
        .unwrap();
        assert_eq!(finish(&pm).unwrap(), Finished::Placed);
        assert_eq!(
            fs::read_to_string(pm.join("overlays/etc/upper/old")).unwrap(),
            "new"
        );
        assert_eq!(
            fs::read_to_string(pm.join("overlays/usr/upper/bin/tool")).unwrap(),
            "tool"
        );
        assert_eq!(fs::read_to_string(pm.join("home/live/x")).unwrap(), "new x");
        fs::remove_dir_all(&pm).unwrap();
    }
}
