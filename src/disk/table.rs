//! Applying a partition plan's sector writes, with a backup of every sector
//! they touch taken first, so that a failure (or `remove`) can put the table
//! back exactly as it was.

use crate::disk::layout::read_exact_at;
use crate::disk::partplan::Write as SectorWrite;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub what: String,
    pub offset: u64,
    /// The original bytes, hex-encoded.
    pub hex: String,
    /// What the change wrote there: a restore is safe only while the
    /// region still holds exactly this (nobody changed the table since).
    #[serde(default)]
    pub after_hex: String,
}

/// The original content of every sector a plan writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub device: String,
    pub device_size: u64,
    pub regions: Vec<Region>,
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex in backup");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex in backup"))
        .collect()
}

impl Region {
    pub fn new(what: String, offset: u64, old: &[u8], new: &[u8]) -> Region {
        Region {
            what,
            offset,
            hex: to_hex(old),
            after_hex: to_hex(new),
        }
    }
    /// The bytes before the change.
    pub fn data(&self) -> Result<Vec<u8>> {
        from_hex(&self.hex)
    }
    /// The bytes the change wrote.
    pub fn after(&self) -> Result<Vec<u8>> {
        from_hex(&self.after_hex)
    }
}

pub fn take_backup<R: Read + Seek>(
    r: &mut R,
    device: &str,
    device_size: u64,
    writes: &[SectorWrite],
) -> Result<Backup> {
    let regions = writes
        .iter()
        .map(|w| {
            let old = read_exact_at(r, w.offset, w.data.len()).with_context(|| {
                format!("reading {} at byte {} for the backup", w.what, w.offset)
            })?;
            Ok(Region {
                what: w.what.clone(),
                offset: w.offset,
                hex: to_hex(&old),
                after_hex: to_hex(&w.data),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Backup {
        device: device.into(),
        device_size,
        regions,
    })
}

fn write_at<W: Write + Seek>(w: &mut W, off: u64, data: &[u8], what: &str) -> Result<()> {
    w.seek(SeekFrom::Start(off))?;
    w.write_all(data)
        .with_context(|| format!("writing {what} at byte {off}"))
}

/// Write the plan's sectors in the plan's order (for a GPT: the backup
/// side, then the primary entries, then the primary header).
pub fn apply<W: Write + Seek>(w: &mut W, writes: &[SectorWrite]) -> Result<()> {
    apply_synced(w, writes, &mut |_| Ok(()))
}

/// `apply` with `sync` called after each write (an fsync of the device), so
/// that a power cut leaves the writes done in order: the kernel reads a
/// GPT only while its primary header and entries agree, so they go last.
pub fn apply_synced<W: Write + Seek>(
    w: &mut W,
    writes: &[SectorWrite],
    sync: &mut dyn FnMut(&mut W) -> Result<()>,
) -> Result<()> {
    for x in writes {
        write_at(w, x.offset, &x.data, &x.what)?;
        w.flush().context("flushing the partition table")?;
        sync(w).with_context(|| format!("syncing after {}", x.what))?;
    }
    Ok(())
}

/// Whether every sector of every region holds either its bytes before or
/// its bytes after the change: what a cut during the change leaves. Only
/// then is replaying the change safe.
pub fn torn_between<R: Read + Seek>(r: &mut R, b: &Backup, sector: u64) -> Result<bool> {
    for reg in &b.regions {
        let (old, new) = (reg.data()?, reg.after()?);
        if old.len() != new.len() {
            return Ok(false);
        }
        let now = read_exact_at(r, reg.offset, old.len())
            .with_context(|| format!("reading {} at byte {}", reg.what, reg.offset))?;
        let ss = (sector as usize).max(1);
        let ok = now
            .chunks(ss)
            .zip(old.chunks(ss).zip(new.chunks(ss)))
            .all(|(n, (o, w))| n == o || n == w);
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Write every region's "after" bytes (a creation's journal) again:
/// finishing a table write a power cut interrupted. Idempotent.
pub fn replay<W: Write + Seek>(
    w: &mut W,
    b: &Backup,
    sync: &mut dyn FnMut(&mut W) -> Result<()>,
) -> Result<()> {
    for r in &b.regions {
        write_at(w, r.offset, &r.after()?, &r.what)?;
        w.flush().context("flushing the partition table")?;
        sync(w).with_context(|| format!("syncing after {}", r.what))?;
    }
    Ok(())
}

/// Whether every region still holds what the change wrote.
pub fn unchanged_since<R: Read + Seek>(r: &mut R, b: &Backup) -> Result<bool> {
    for reg in &b.regions {
        if reg.after_hex.is_empty() {
            return Ok(false);
        }
        let now = read_exact_at(r, reg.offset, reg.after_hex.len() / 2)
            .with_context(|| format!("reading {} at byte {}", reg.what, reg.offset))?;
        if to_hex(&now) != reg.after_hex {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Put every region's original bytes back, in the backup's order (the
/// order they were written: primary header last), `sync` after each.
pub fn restore<W: Write + Seek>(
    w: &mut W,
    b: &Backup,
    sync: &mut dyn FnMut(&mut W) -> Result<()>,
) -> Result<()> {
    for r in &b.regions {
        write_at(w, r.offset, &r.data()?, &r.what)?;
        w.flush().context("flushing the restored partition table")?;
        sync(w).with_context(|| format!("syncing after {}", r.what))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn backup_apply_restore_round_trip() {
        let orig: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut dev = Cursor::new(orig.clone());
        let writes = vec![
            SectorWrite {
                what: "a".into(),
                offset: 512,
                len: 512,
                data: vec![1; 512],
            },
            SectorWrite {
                what: "b".into(),
                offset: 7680,
                len: 512,
                data: vec![2; 512],
            },
        ];
        let b = take_backup(&mut dev, "test", 8192, &writes).unwrap();
        let json = serde_json::to_string(&b).unwrap();
        apply(&mut dev, &writes).unwrap();
        assert_eq!(&dev.get_ref()[512..1024], &[1; 512][..]);
        assert_ne!(dev.get_ref(), &orig);
        let b2: Backup = serde_json::from_str(&json).unwrap();
        assert!(unchanged_since(&mut dev, &b2).unwrap());
        restore(&mut dev, &b2, &mut |_| Ok(())).unwrap();
        assert!(!unchanged_since(&mut dev, &b2).unwrap());
        assert_eq!(dev.get_ref(), &orig);
    }
}
