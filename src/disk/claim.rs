//! The claim: `CLAIM_LEN` (1 MiB) written in the free space right before a
//! persistence partition we create, before the table changes. It names the
//! partition (number, start, size) and carries the old and new bytes of
//! every table sector the creation writes (the table backup and its
//! journal). It lies outside the partition, so mkfs never touches it, and a
//! `dd` of a release no larger than the old one leaves it in place.
//!
//! A later boot uses it to recognise a partition as ours: to finish a
//! creation a power cut interrupted (re-apply the table, run mkfs), to put
//! the entry of a re-flashed stick back exactly, and (`remove`) to restore
//! the table even when the filesystem no longer mounts.
//!
//! A second copy goes in the partition's last MiB, which the filesystem
//! leaves out, once mkfs has run: a re-flash with a release much smaller
//! than the one before leaves the old filesystem far after the new image's
//! end, past where a scan looks, but the device's end is found in one read
//! (`end_candidates`).
//!
//! The format is ours and small, so it is written by hand: a magic, a
//! version, a CRC32 over everything after it, then fixed-width fields. Every
//! length is checked against the buffer before use; anything malformed
//! decodes to `None`.

use crate::disk::table::{Backup, Region};

/// One MiB: a partition's alignment, and room for a GPT's old and new
/// entry arrays up to about 3,500 entries (xorriso writes 248, most tools
/// 128). A table whose sectors do not fit is not changed.
pub const CLAIM_LEN: u64 = 1 << 20;
/// What the filesystem leaves out at the partition's end: room for the
/// claim's second copy (`Claim::end_offset`).
pub const FS_RESERVE: u64 = CLAIM_LEN;
const MAGIC: &[u8; 16] = b"MADOS-PERSIST-CL";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub number: u32,
    /// The partition's first byte and length.
    pub start: u64,
    pub size: u64,
    /// The table sectors: their bytes before (`hex`) and after
    /// (`after_hex`) the creation.
    pub backup: Backup,
}

impl Claim {
    /// Where the claim for a partition starting at `start` lies.
    pub fn offset_for(start: u64) -> Option<u64> {
        start.checked_sub(CLAIM_LEN)
    }

    /// Where its second copy lies: the partition's last MiB, which the
    /// filesystem leaves out (`FS_RESERVE`). A `dd` of a release writes
    /// from byte 0 and ends long before the device does, so this copy
    /// outlives any re-flash that leaves the filesystem itself intact.
    pub fn end_offset(&self) -> Option<u64> {
        self.start.checked_add(self.size)?.checked_sub(CLAIM_LEN)
    }

    /// Where a partition we made may end on a device of `device_size`
    /// bytes with `sector_size`-byte sectors, so where its end copy may lie
    /// (`disk::partplan::bounds`): at the device's end rounded down to a
    /// MiB, or a MiB earlier when a GPT's backup (less than a MiB) needs
    /// the room at the end, or at what an MBR entry can reach (2^32 - 1
    /// sectors). A partition capped by `max_size` ends elsewhere and is
    /// found by the front claim and the scan only.
    pub fn end_candidates(device_size: u64, sector_size: u64) -> Vec<u64> {
        const MIB: u64 = 1 << 20;
        let down = |b: u64| b / MIB * MIB;
        let mbr_reach = u64::from(u32::MAX).saturating_mul(sector_size);
        let mut v: Vec<u64> = [
            down(device_size),
            down(device_size).saturating_sub(MIB),
            down(mbr_reach.min(device_size)),
        ]
        .into_iter()
        .filter_map(|end| end.checked_sub(CLAIM_LEN))
        .filter(|&at| at > 0)
        .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut b = Vec::with_capacity(CLAIM_LEN as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&[0u8; 4]); // crc, filled in below
        b.extend_from_slice(&self.number.to_le_bytes());
        b.extend_from_slice(&self.start.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.backup.device_size.to_le_bytes());
        let regions = &self.backup.regions;
        b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        for r in regions {
            let old = r.data().map_err(|e| e.to_string())?;
            let new = r.after().map_err(|e| e.to_string())?;
            if old.len() != new.len() {
                return Err(format!("region at {} changes length", r.offset));
            }
            let what = r.what.as_bytes();
            b.extend_from_slice(&r.offset.to_le_bytes());
            b.extend_from_slice(&(old.len() as u32).to_le_bytes());
            b.extend_from_slice(&(what.len() as u16).to_le_bytes());
            b.extend_from_slice(what);
            b.extend_from_slice(&old);
            b.extend_from_slice(&new);
        }
        if b.len() as u64 > CLAIM_LEN {
            return Err(format!(
                "the claim needs {} bytes, more than {CLAIM_LEN}",
                b.len()
            ));
        }
        let len = b.len();
        b.resize(CLAIM_LEN as usize, 0);
        let crc = crc32fast::hash(&b[24..]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        debug_assert!(len <= b.len());
        Ok(b)
    }

    /// `None` for anything that is not a whole, intact claim.
    /// Whether every region lies where a table sector of this creation can
    /// lie: the first 32 KiB (MBR, primary GPT; the ISO 9660 system area),
    /// or the last MiB of the device after the partition (the GPT backup).
    /// A claim is on-disk input: one whose regions point anywhere else is
    /// never replayed or restored.
    pub fn regions_safe(&self, device_size: u64) -> bool {
        let part_end = self.start.saturating_add(self.size);
        let tail = device_size.saturating_sub((1 << 20) + 4096).max(part_end);
        self.backup.device_size == device_size
            && self.backup.regions.iter().all(|r| {
                let len = (r.hex.len() / 2) as u64;
                let Some(end) = r.offset.checked_add(len) else {
                    return false;
                };
                len > 0 && (end <= 32768 || (r.offset >= tail && end <= device_size))
            })
    }

    /// Whether `b` starts like a claim (to read the whole only then).
    pub fn looks_like(b: &[u8]) -> bool {
        b.get(..16) == Some(MAGIC)
    }

    pub fn decode(b: &[u8], device: &str) -> Option<Claim> {
        if b.len() != CLAIM_LEN as usize || &b[..16] != MAGIC {
            return None;
        }
        let mut r = Reader { b, at: 16 };
        if r.u32()? != VERSION {
            return None;
        }
        let crc = r.u32()?;
        if crc32fast::hash(&b[24..]) != crc {
            return None;
        }
        let number = r.u32()?;
        let start = r.u64()?;
        let size = r.u64()?;
        let device_size = r.u64()?;
        let n = r.u32()?;
        if n > 64 {
            return None;
        }
        let mut regions = Vec::new();
        for _ in 0..n {
            let offset = r.u64()?;
            let len = r.u32()? as usize;
            let wlen = usize::from(r.u16()?);
            let what = String::from_utf8_lossy(r.take(wlen)?).into_owned();
            let old = r.take(len)?;
            let new = r.take(len)?;
            regions.push(Region::new(what, offset, old, new));
        }
        start.checked_add(size).filter(|&e| e <= device_size)?;
        Some(Claim {
            number,
            start,
            size,
            backup: Backup {
                device: device.into(),
                device_size,
                regions,
            },
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_copy_is_looked_for_where_a_partition_of_ours_may_end() {
        const M: u64 = 1 << 20;
        const G: u64 = 1 << 30;
        // MBR: at the device's end; GPT: a MiB before it for the backup
        assert_eq!(
            Claim::end_candidates(8 * G, 512),
            [8 * G - 2 * M, 8 * G - M]
        );
        // a size that is not whole MiBs: rounded down first
        assert_eq!(
            Claim::end_candidates(8 * G + 300 * 1024, 512),
            [8 * G - 2 * M, 8 * G - M]
        );
        // past an MBR's reach on 512-byte sectors (2^32 - 1 of them)
        let reach = (u64::from(u32::MAX) * 512) / M * M;
        assert_eq!(
            Claim::end_candidates(3 << 40, 512),
            [reach - M, (3 << 40) - 2 * M, (3 << 40) - M]
        );
        // 4096-byte sectors reach 16 TiB: nothing more
        assert_eq!(
            Claim::end_candidates(3 << 40, 4096),
            [(3 << 40) - 2 * M, (3 << 40) - M]
        );
        // a device smaller than a claim has none
        assert!(Claim::end_candidates(M, 512).is_empty());
    }

    fn sample() -> Claim {
        Claim {
            number: 3,
            start: 64 << 20,
            size: 1 << 30,
            backup: Backup {
                device: "/dev/sda".into(),
                device_size: 8 << 30,
                regions: vec![
                    Region::new("MBR (entry 3)".into(), 0, &[1u8; 512], &[2u8; 512]),
                    Region::new(
                        "backup GPT entries".into(),
                        4096,
                        &[0u8; 16384],
                        &[7u8; 16384],
                    ),
                ],
            },
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let b = c.encode().unwrap();
        assert_eq!(b.len() as u64, CLAIM_LEN);
        assert!(Claim::decode(&b, "/dev/sda") == Some(c.clone()));
        assert!(c.regions_safe(8 << 30));
    }

    #[test]
    fn regions_outside_the_table_areas_are_unsafe() {
        let mut c = sample();
        assert!(!c.regions_safe(4 << 30), "device size differs");
        // a region in the ISO volume (past the 32 KiB system area)
        c.backup.regions[1] = Region::new("x".into(), 40960, &[0u8; 512], &[1u8; 512]);
        assert!(!c.regions_safe(8 << 30));
        // one at the device's end, after the partition: the GPT backup
        let end = (8u64 << 30) - 512;
        c.backup.regions[1] = Region::new("x".into(), end, &[0u8; 512], &[1u8; 512]);
        assert!(c.regions_safe(8 << 30));
        // ... but not inside the partition it names
        c.size = 8 << 30;
        c.start = 0;
        assert!(!c.regions_safe(8 << 30));
    }

    #[test]
    fn damaged_or_truncated_is_none_never_a_panic() {
        let b = sample().encode().unwrap();
        for i in [0usize, 17, 21, 30, 70, 1000, 40000] {
            let mut x = b.clone();
            x[i] ^= 0x40;
            assert!(Claim::decode(&x, "d").is_none(), "byte {i} flipped");
        }
        assert!(Claim::decode(&b[..1000], "d").is_none());
        assert!(Claim::decode(&vec![0u8; CLAIM_LEN as usize], "d").is_none());
        // a hostile length with a right checksum
        let mut x = b.clone();
        x[64..68].copy_from_slice(&u32::MAX.to_le_bytes()); // region 1's length
        let crc = crc32fast::hash(&x[24..]);
        x[20..24].copy_from_slice(&crc.to_le_bytes());
        assert!(Claim::decode(&x, "d").is_none());
    }

    #[test]
    fn too_large_is_refused() {
        let mut c = sample();
        c.backup.regions[1] = Region::new("big".into(), 0, &[0u8; 600000], &[1u8; 600000]);
        assert!(c.encode().is_err());
    }
}
