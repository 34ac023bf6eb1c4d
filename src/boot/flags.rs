//! Requests left on the persistence partition for the next boot, in
//! `.mados/` at its root: `disabled` ("once" or "always", from `disable`)
//! and `remove` (from `remove` while persistence was in use). `boot` reads
//! them right after mounting the partition, before anything is layered.

use crate::util::fsutil;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub const DIR: &str = ".mados";
pub const BACKUP: &str = "table-backup.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Disabled {
    Once,
    Always,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub disabled: Option<Disabled>,
    pub remove: bool,
}

fn path(pmount: &Path, name: &str) -> PathBuf {
    pmount.join(DIR).join(name)
}

/// The requests, read without following symlinks (the partition is
/// untrusted input). A `disabled` file that is not "once" means always.
pub fn read(pmount: &Path) -> Flags {
    let p = path(pmount, "disabled");
    let disabled = if fsutil::exists_nofollow(&p) {
        match fsutil::read_nofollow(&p, 4096) {
            Ok(b) if String::from_utf8_lossy(&b).trim() == "once" => Some(Disabled::Once),
            _ => Some(Disabled::Always),
        }
    } else {
        None
    };
    Flags {
        disabled,
        remove: fsutil::exists_nofollow(&path(pmount, "remove")),
    }
}

pub fn set_disabled(pmount: &Path, d: Disabled) -> Result<()> {
    let text = match d {
        Disabled::Once => "once\n",
        Disabled::Always => "always\n",
    };
    crate::util::fsutil::write_atomic(&path(pmount, "disabled"), text.as_bytes())
}

/// Clear `disabled` (and a pending `remove`); true if there was one.
pub fn clear(pmount: &Path) -> Result<bool> {
    let mut any = false;
    for f in ["disabled", "remove"] {
        let p = path(pmount, f);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            any = true;
        }
    }
    Ok(any)
}

pub fn clear_disabled_once(pmount: &Path) -> Result<()> {
    let p = path(pmount, "disabled");
    std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
}

pub fn set_remove(pmount: &Path) -> Result<()> {
    crate::util::fsutil::write_atomic(
        &path(pmount, "remove"),
        b"scheduled by `mados-persistence remove`\n",
    )
}

/// The table backup kept on the partition; a missing, oversized or
/// malformed one is `None` (with a warning), never a panic.
pub fn read_backup(pmount: &Path) -> Option<crate::disk::table::Backup> {
    let p = path(pmount, BACKUP);
    let b = match fsutil::read_nofollow(&p, 16 << 20) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("not reading {}: {e}", p.display());
            return None;
        }
    };
    serde_json::from_slice(&b)
        .map_err(|e| log::warn!("{} is malformed ({e}); not using it", p.display()))
        .ok()
}

pub fn write_backup(pmount: &Path, b: &crate::disk::table::Backup) -> Result<()> {
    crate::util::fsutil::write_atomic(
        &path(pmount, BACKUP),
        serde_json::to_string_pretty(b)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = std::env::temp_dir().join(format!("mados-flags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(read(&d), Flags::default());
        set_disabled(&d, Disabled::Once).unwrap();
        set_remove(&d).unwrap();
        assert_eq!(
            read(&d),
            Flags {
                disabled: Some(Disabled::Once),
                remove: true
            }
        );
        set_disabled(&d, Disabled::Always).unwrap();
        assert_eq!(read(&d).disabled, Some(Disabled::Always));
        assert!(clear(&d).unwrap());
        assert!(!clear(&d).unwrap());
        assert_eq!(read(&d), Flags::default());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
