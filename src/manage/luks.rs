//! `passphrase` and `header-backup`: an encrypted persistence's key slots
//! and header after boot, on the boot stick or `--device`.

use super::{confirm, read_state, refuse, running_settings, target_device};
use crate::disk::blockdev::{self, Loop};
use crate::disk::cryptsetup::{self, Pbkdf};
use crate::disk::stick::{Existing, find_encrypted, open_device};
use crate::util::prompt::{Entry, ask_hidden, new_passphrase_loop};
use crate::util::secret::{MAX_PASSPHRASE, Secret};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The encrypted partition on the target device, reached: its node on a
/// block device (cryptsetup changes the header while it is in use), or a
/// loop device over an image's partition.
struct Volume {
    path: PathBuf,
    disk: PathBuf,
    e: Existing,
    _loop: Option<Loop>,
}

fn locate(device: Option<PathBuf>, verb: &str) -> Result<Volume> {
    let s = running_settings();
    let st = read_state();
    let disk = target_device(device, st.as_ref(), verb)?;
    let mut o = open_device(&disk, false)?;
    let Some(e) = find_encrypted(&mut o, &s.label) else {
        return refuse(format!(
            "{} has no encrypted persistence (a LUKS2 volume labelled '{}')",
            disk.display(),
            s.label
        ));
    };
    drop(o);
    let real = std::fs::canonicalize(&disk).unwrap_or_else(|_| disk.clone());
    let (path, lp) = if blockdev::is_block_device(&real) {
        (blockdev::partition_path(&real, e.number), None)
    } else {
        let lp = Loop::attach(&disk, e.start, e.size)?;
        (lp.path.clone(), Some(lp))
    };
    Ok(Volume {
        path,
        disk,
        e,
        _loop: lp,
    })
}

/// A passphrase from FILE or `-` (stdin).
fn from_file(p: &Path) -> Result<Secret> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(MAX_PASSPHRASE + 2);
    let limit = MAX_PASSPHRASE as u64 + 2;
    if p == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut buf)
            .context("reading a passphrase from stdin")?;
    } else {
        std::fs::File::open(p)
            .and_then(|f| f.take(limit).read_to_end(&mut buf))
            .with_context(|| format!("reading a passphrase from {}", p.display()))?;
    }
    Secret::from_file_bytes(buf)
}

fn tty() -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| {
            super::Refused(
                "no terminal to type the passphrases on; pass --old-passphrase-file and --new-passphrase-file"
                    .into(),
            )
            .into()
        })
}

/// The cost of the new key slot: the one the volume's first slot has (a
/// stick keeps the cost it was made with), else the default.
fn slot_cost(d: &cryptsetup::Dump) -> Pbkdf {
    d.keyslots
        .iter()
        .find(|k| k.kdf == "argon2id")
        .and_then(|k| {
            let p = Pbkdf {
                memory_kib: k.memory_kib?,
                iterations: k.iterations,
                parallel: k.cpus.unwrap_or(1).clamp(1, 16),
            };
            p.check().ok().map(|_| p)
        })
        .unwrap_or(cryptsetup::DEFAULT_PBKDF)
}

/// `passphrase`: change it, crash-safe (`cryptsetup::change_passphrase`).
pub fn passphrase(
    device: Option<PathBuf>,
    old_file: Option<PathBuf>,
    new_file: Option<PathBuf>,
) -> Result<()> {
    if old_file.as_deref() == Some(Path::new("-")) && new_file.as_deref() == Some(Path::new("-")) {
        return refuse("only one of the passphrases can come from stdin");
    }
    let v = locate(device, "change the passphrase of")?;
    let old = match &old_file {
        Some(f) => from_file(f)?,
        None => {
            let t = tty()?;
            let mut out = &t;
            match ask_hidden(&t, &mut out, "Current passphrase: ", None)? {
                Entry::Line(p) => p,
                _ => return refuse("no passphrase entered; nothing was changed"),
            }
        }
    };
    if !cryptsetup::test_passphrase(&v.path, &old)? {
        return refuse(format!(
            "the current passphrase does not open the encrypted persistence on {}; nothing was changed",
            v.disk.display()
        ));
    }
    let new = match &new_file {
        Some(f) => from_file(f)?,
        None => {
            let t = tty()?;
            let mut out = &t;
            let mut out2 = &t;
            new_passphrase_loop(
                3,
                |again| {
                    ask_hidden(
                        &t,
                        &mut out,
                        if again {
                            "The same new passphrase again: "
                        } else {
                            "New passphrase: "
                        },
                        None,
                    )
                },
                |msg| {
                    use std::io::Write;
                    let _ = writeln!(out2, "{msg}");
                },
            )
            .map_err(|why| super::Refused(format!("{why}; nothing was changed")))?
        }
    };
    let cost = slot_cost(&cryptsetup::dump(&v.path)?);
    cryptsetup::change_passphrase(&v.path, &old, &new, &cost)?;
    println!(
        "The passphrase of the encrypted persistence on {} (partition {}) is changed: the old one no longer \
         opens it. A header backup made before this still opens it with the OLD passphrase: destroy such \
         backups if the old passphrase may be known.",
        v.disk.display(),
        v.e.number
    );
    Ok(())
}

/// `header-backup FILE` (or `--restore FILE`).
pub fn header_backup(device: Option<PathBuf>, file: &Path, restore: bool, yes: bool) -> Result<()> {
    let v = locate(device, "back up the header of")?;
    if restore {
        println!(
            "This puts back the LUKS2 header from {} on partition {} of {}: the passphrases valid when the \
             backup was made open it again, and ones set since then no longer do.",
            file.display(),
            v.e.number,
            v.disk.display()
        );
        confirm("Restore it?", Some("restore"), yes)?;
        cryptsetup::header_restore(&v.path, file)?;
        println!("The header is restored.");
        return Ok(());
    }
    if file.exists() {
        return refuse(format!("{} exists; not overwritten", file.display()));
    }
    cryptsetup::header_backup(&v.path, file)?;
    std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("making {} readable by its owner only", file.display()))?;
    println!(
        "The LUKS2 header of partition {} is saved in {} (readable by you only).\n\
         Keep it as safe as the stick itself: with this file, a passphrase that is valid NOW opens the \
         stick forever, even after you change it (`mados-persistence passphrase`) or `remove` wipes the \
         stick's header. After a passphrase change because the old one leaked, destroy this backup.",
        v.e.number,
        file.display()
    );
    Ok(())
}
