//! Which ISO build the system overlays on the partition belong to
//! (`.mados/iso-build.json`: the ISO 9660 label and UUID), and what a boot
//! does when the stick now carries another build (it was re-flashed with a
//! newer release): with `on_iso_change = "set-aside"` (the default) the old
//! `overlays/` directory is renamed to `set-aside/<label>_<uuid>/overlays`
//! (never deleted) and fresh overlays start; the bind dirs (`/home`) stay.
//! With `keep`, the old overlays stay in use.
//!
//! Cut-safe: the rename is atomic and comes before the record is switched,
//! so a cut in between is finished by the next boot (the record still
//! names the old build, and there is nothing left to move).

use crate::settings::config::OnIsoChange;
use crate::util::fsutil;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const RECORD: &str = ".mados/iso-build.json";
pub const SET_ASIDE: &str = "set-aside";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoBuild {
    pub label: String,
    pub uuid: String,
}

/// What a boot did about an ISO change, for state.json and `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoChange {
    pub previous: IsoBuild,
    pub current: IsoBuild,
    /// `set-aside` or `keep`.
    pub policy: String,
    /// Where the old overlays went (absolute, under the partition's mount).
    pub set_aside: Option<String>,
}

/// The record on the partition; a missing or malformed one is `None`.
pub fn read(pm: &Path) -> Option<IsoBuild> {
    let b = fsutil::read_nofollow(&pm.join(RECORD), 64 << 10).ok()?;
    serde_json::from_slice(&b).ok()
}

fn write(pm: &Path, b: &IsoBuild) -> Result<()> {
    fsutil::write_atomic(&pm.join(RECORD), serde_json::to_string(b)?.as_bytes())
}

/// The record read by fd from the partition's root (for a set-aside
/// restore); missing or malformed is `None`.
pub fn read_at(root: &crate::util::safefs::Dir) -> Option<IsoBuild> {
    let d = root.dir(Path::new(".mados")).ok()?;
    let (f, st) = d.open_read("iso-build.json".as_ref(), None).ok()?;
    if st.st_size > 64 << 10 {
        return None;
    }
    serde_json::from_reader(std::io::Read::take(f, 64 << 10)).ok()
}

/// A directory name from a build: label characters kept where safe.
pub fn dir_name(b: &IsoBuild) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect()
    };
    format!("{}_{}", clean(&b.label), clean(&b.uuid))
}

/// Compare the record with the build booted now and act on a change.
/// Returns what was done when the build changed.
pub fn reconcile(pm: &Path, current: &IsoBuild, policy: OnIsoChange) -> Result<Option<IsoChange>> {
    let previous = match read(pm) {
        Some(p) if p == *current => return Ok(None),
        Some(p) => p,
        None => {
            // first boot with this record (or an older partition): this build owns the overlays
            write(pm, current)?;
            return Ok(None);
        }
    };
    let mut change = IsoChange {
        previous: previous.clone(),
        current: current.clone(),
        policy: match policy {
            OnIsoChange::SetAside => "set-aside",
            OnIsoChange::Keep => "keep",
        }
        .into(),
        set_aside: None,
    };
    if policy == OnIsoChange::SetAside {
        // by fd from the partition's root: a crafted stick's symlink at
        // `set-aside` (or below) leads nowhere else
        let root = crate::util::safefs::Dir::open(pm)?;
        let is_dir = |st: Option<crate::util::safefs::Stat>| {
            st.is_some_and(|st| crate::util::safefs::kind(&st) == crate::util::safefs::Kind::Dir)
        };
        if is_dir(root.lstat("overlays".as_ref())?) {
            let base = root
                .dir_create(Path::new(SET_ASIDE), 0o700)
                .with_context(|| format!("creating {}", pm.join(SET_ASIDE).display()))?;
            let name = free_name(&base, &dir_name(&previous))?;
            base.mkdir(name.as_ref(), 0o700)
                .with_context(|| format!("creating {SET_ASIDE}/{name}"))?;
            let dest = base.dir(Path::new(&name))?;
            // which build and when, for `set-aside list` and `restore`
            // (before the move: a cut leaves a dir without overlays, which
            // no restore takes)
            crate::boot::set_aside::write_meta(&dest, &previous)
                .with_context(|| format!("recording {SET_ASIDE}/{name}"))?;
            root.rename(
                "overlays".as_ref(),
                &dest,
                "overlays".as_ref(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .with_context(|| format!("moving the overlays to {SET_ASIDE}/{name}"))?;
            root.fsync().ok();
            dest.fsync().ok();
            change.set_aside = Some(
                pm.join(SET_ASIDE)
                    .join(&name)
                    .join("overlays")
                    .display()
                    .to_string(),
            );
        }
    }
    write(pm, current)?;
    Ok(Some(change))
}

/// What happened, in one sentence for the log, `status` and `enable`.
pub fn describe(ch: &IsoChange) -> String {
    format!(
        "the stick now carries ISO build {} ({}); the overlays were made on {} ({}): {}",
        ch.current.label,
        ch.current.uuid,
        ch.previous.label,
        ch.previous.uuid,
        match &ch.set_aside {
            Some(p) => format!(
                "they were set aside in {p} (nothing deleted; /home kept) and fresh overlays started"
            ),
            None if ch.policy == "keep" => "they are kept in use (on_iso_change = \"keep\")".into(),
            None => "there were none to set aside".into(),
        }
    )
}

/// `p`, or `p-2`, `p-3`, … whichever does not exist yet.
/// `name`, or `name-2`, `name-3`, … : the first not taken in `base`.
fn free_name(base: &crate::util::safefs::Dir, name: &str) -> Result<String> {
    for i in 1u32.. {
        let cand = if i == 1 {
            name.to_string()
        } else {
            format!("{name}-{i}")
        };
        if base.lstat(cand.as_ref())?.is_none() {
            return Ok(cand);
        }
    }
    unreachable!("a free name")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn build(label: &str, uuid: &str) -> IsoBuild {
        IsoBuild {
            label: label.into(),
            uuid: uuid.into(),
        }
    }

    #[test]
    fn set_aside_moves_overlays_keeps_home_and_records_the_new_build() {
        let pm = std::env::temp_dir().join(format!("mados-isobuild-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pm);
        std::fs::create_dir_all(pm.join("overlays/usr/upper")).unwrap();
        std::fs::write(pm.join("overlays/usr/upper/old-lib"), "r1").unwrap();
        std::fs::create_dir_all(pm.join("home")).unwrap();
        let r1 = build("MADOS_R1", "2026-01-01-00-00-00-00");
        let r2 = build("MADOS/R2", "2026-02-01-00-00-00-00");
        // first boot: recorded, nothing moved
        assert_eq!(reconcile(&pm, &r1, OnIsoChange::SetAside).unwrap(), None);
        assert_eq!(read(&pm), Some(r1.clone()));
        assert_eq!(reconcile(&pm, &r1, OnIsoChange::SetAside).unwrap(), None);
        // the stick now carries release 2
        let ch = reconcile(&pm, &r2, OnIsoChange::SetAside).unwrap().unwrap();
        assert_eq!(ch.previous, r1);
        let to = PathBuf::from(ch.set_aside.unwrap());
        assert!(to.ends_with("set-aside/MADOS_R1_2026-01-01-00-00-00-00/overlays"));
        assert_eq!(
            std::fs::read_to_string(to.join("usr/upper/old-lib")).unwrap(),
            "r1"
        );
        assert!(!pm.join("overlays").exists());
        assert!(pm.join("home").is_dir(), "bind dirs stay");
        assert_eq!(read(&pm), Some(r2.clone()));
        // back to release 1 with new overlays: a second set-aside, not a clash
        std::fs::create_dir_all(pm.join("overlays/etc")).unwrap();
        let ch = reconcile(&pm, &r1, OnIsoChange::SetAside).unwrap().unwrap();
        assert!(ch.set_aside.unwrap().contains("MADOS_R2_"));
        std::fs::create_dir_all(pm.join("overlays/etc")).unwrap();
        reconcile(&pm, &r2, OnIsoChange::SetAside).unwrap().unwrap();
        let ch = reconcile(&pm, &r1, OnIsoChange::SetAside).unwrap();
        assert_eq!(ch.unwrap().set_aside, None, "nothing left to move");
        // keep: nothing moves, the record follows
        std::fs::create_dir_all(pm.join("overlays/etc")).unwrap();
        let ch = reconcile(&pm, &r2, OnIsoChange::Keep).unwrap().unwrap();
        assert_eq!((ch.policy.as_str(), ch.set_aside), ("keep", None));
        assert!(pm.join("overlays/etc").is_dir());
        std::fs::remove_dir_all(&pm).unwrap();
    }

    #[test]
    fn a_crafted_set_aside_symlink_leads_nowhere() {
        let t = crate::util::testutil::tmp("isobuild-link");
        let (pm, outside) = (t.join("pm"), t.join("outside"));
        std::fs::create_dir_all(pm.join("overlays/etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, pm.join("set-aside")).unwrap();
        reconcile(&pm, &build("A", "1"), OnIsoChange::SetAside).unwrap();
        assert!(reconcile(&pm, &build("B", "2"), OnIsoChange::SetAside).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(pm.join("overlays/etc").is_dir(), "the overlays stay");
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_cut_between_move_and_record_is_finished_next_time() {
        let pm = std::env::temp_dir().join(format!("mados-isobuild-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pm);
        std::fs::create_dir_all(pm.join("set-aside/MADOS_R1_u1/overlays")).unwrap();
        let (r1, r2) = (build("MADOS_R1", "u1"), build("MADOS_R2", "u2"));
        write(&pm, &r1).unwrap(); // the move happened, the record did not switch
        let ch = reconcile(&pm, &r2, OnIsoChange::SetAside).unwrap().unwrap();
        assert_eq!(ch.set_aside, None);
        assert_eq!(read(&pm), Some(r2));
        assert!(pm.join("set-aside/MADOS_R1_u1/overlays").is_dir());
        // a record that is a symlink or garbage is no record
        std::fs::remove_file(pm.join(RECORD)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", pm.join(RECORD)).unwrap();
        assert_eq!(read(&pm), None);
        std::fs::remove_dir_all(&pm).unwrap();
    }
}
