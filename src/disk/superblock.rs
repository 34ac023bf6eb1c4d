//! Filesystem superblocks we need to recognise, read in Rust so the
//! initramfs needs neither libblkid nor blkid: iso9660 (label and the
//! creation-date UUID that archiso matches), ext2/3/4 and vfat.

use serde::Serialize;
use std::io::{self, Read, Seek, SeekFrom};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsoInfo {
    pub label: String,
    /// `YYYY-MM-DD-HH-MM-SS-CC` from the creation date, as udev/blkid and
    /// archiso's `archisosearchuuid=` spell it.
    pub uuid: String,
    /// Bytes the ISO 9660 filesystem spans.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ext4Info {
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub has_journal: bool,
    /// The "cleanly unmounted" bit of s_state.
    pub clean: bool,
    /// needs_recovery (s_feature_incompat RECOVER): the journal holds
    /// transactions not yet written in place. Set while a journalled ext4 is
    /// mounted read-write, cleared by a clean unmount (or a read-only
    /// remount): set before a mount, the last one did not end cleanly.
    pub needs_recovery: bool,
    /// s_block_group_nr: 0 for the primary superblock, else the group of a
    /// backup copy (found where the filesystem does not start).
    pub group: u16,
    /// What the filesystem has written in its life and the errors it
    /// recorded (for `status`'s health).
    pub wear: Ext4Wear,
}

/// The superblock's lifetime write counter and error record. The kernel
/// keeps them up to date in memory and writes them with the superblock;
/// e2fsck clears the error record when it repairs, so a boot reads them
/// before e2fsck. Values only shown, never used as offsets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Ext4Wear {
    /// s_kbytes_written: KiB written to the filesystem since mkfs.
    pub kbytes_written: u64,
    /// s_error_count: errors the kernel recorded since the last repair.
    pub error_count: u32,
    /// s_first_error_time, s_last_error_time (Unix s; 0: none).
    pub first_error_unix_s: u64,
    pub last_error_unix_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Fs {
    Iso9660(IsoInfo),
    Ext4(Ext4Info),
    Vfat {
        label: String,
    },
    /// A LUKS2 volume (its binary header: label and UUID, not unlocked).
    Luks2(crate::disk::luks::Luks2Header),
}

impl Fs {
    pub fn label(&self) -> &str {
        match self {
            Fs::Iso9660(i) => &i.label,
            Fs::Ext4(e) => &e.label,
            Fs::Vfat { label } => label,
            Fs::Luks2(h) => &h.label,
        }
    }
    pub fn uuid(&self) -> Option<&str> {
        match self {
            Fs::Iso9660(i) => Some(&i.uuid),
            Fs::Ext4(e) => Some(&e.uuid),
            Fs::Vfat { .. } => None,
            Fs::Luks2(h) => Some(&h.uuid),
        }
    }
}

fn read_at<R: Read + Seek>(r: &mut R, off: u64, buf: &mut [u8]) -> io::Result<bool> {
    r.seek(SeekFrom::Start(off))?;
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(true)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// The wear fields of a superblock (at least 1024 bytes, checked by the
/// caller; every offset below is under 1024).
fn ext4_wear(sb: &[u8]) -> Ext4Wear {
    let time = |lo: usize, hi: usize| u64::from(le32(sb, lo)) | u64::from(sb[hi]) << 32;
    Ext4Wear {
        kbytes_written: u64::from_le_bytes(sb[0x178..0x180].try_into().unwrap()),
        error_count: le32(sb, 0x194),
        first_error_unix_s: time(0x198, 0x278),
        last_error_unix_s: time(0x1CC, 0x279),
    }
}

/// The primary volume descriptor at 32 KiB.
pub fn parse_iso(pvd: &[u8]) -> Option<IsoInfo> {
    if pvd.len() < 2048 || pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    let blocks = u64::from(le32(pvd, 80));
    let bs = u64::from(le16(pvd, 128));
    // The UUID archiso searches by is the modification date; a volume whose
    // date is not digits still is a volume (the kernel mounts it), and its
    // size still counts: only the UUID is left empty.
    let d = &pvd[813..829];
    let s = |a: usize, b: usize| String::from_utf8_lossy(&d[a..b]).into_owned();
    let uuid = if d.iter().all(u8::is_ascii_digit) {
        format!(
            "{}-{}-{}-{}-{}-{}-{}",
            s(0, 4),
            s(4, 6),
            s(6, 8),
            s(8, 10),
            s(10, 12),
            s(12, 14),
            s(14, 16)
        )
    } else {
        String::new()
    };
    Some(IsoInfo {
        label: text(&pvd[40..72]),
        uuid,
        size: blocks * bs,
    })
}

fn uuid_string(u: &[u8]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The ext2/3/4 superblock (the 1024 bytes at offset 1024).
pub fn parse_ext4(sb: &[u8]) -> Option<Ext4Info> {
    if sb.len() < 1024 || le16(sb, 56) != 0xEF53 {
        return None;
    }
    // s_log_block_size: ext4 blocks are 1 KiB to 64 KiB; anything else is
    // not an ext4 superblock (and would overflow the shift).
    let log_block = le32(sb, 24);
    if log_block > 6 {
        return None;
    }
    let incompat = le32(sb, 96);
    let blocks_hi = if incompat & 0x80 != 0 {
        u64::from(le32(sb, 0x150))
    } else {
        0
    };
    let free_hi = if incompat & 0x80 != 0 {
        u64::from(le32(sb, 0x158))
    } else {
        0
    };
    Some(Ext4Info {
        label: text(&sb[120..136]),
        uuid: uuid_string(&sb[104..120]),
        block_size: 1024u64 << log_block,
        blocks: u64::from(le32(sb, 4)) | blocks_hi << 32,
        free_blocks: u64::from(le32(sb, 12)) | free_hi << 32,
        has_journal: le32(sb, 92) & 0x4 != 0,
        clean: le16(sb, 58) & 1 != 0,
        needs_recovery: incompat & 0x4 != 0,
        group: le16(sb, 90),
        wear: ext4_wear(sb),
    })
}

/// A FAT boot sector's volume label.
pub fn parse_vfat(bs: &[u8]) -> Option<String> {
    if bs.len() < 512 || bs[510] != 0x55 || bs[511] != 0xAA {
        return None;
    }
    let fat32 = le16(bs, 22) == 0;
    let (sig, lab, ty) = if fat32 { (66, 71, 82) } else { (38, 43, 54) };
    if !bs[ty..ty + 3].eq(b"FAT") {
        return None;
    }
    Some(if bs[sig] == 0x29 {
        text(&bs[lab..lab + 11])
    } else {
        String::new()
    })
}

/// Recognise whatever filesystem starts at the beginning of `r`.
pub fn probe<R: Read + Seek>(r: &mut R) -> io::Result<Option<Fs>> {
    let mut b = vec![0u8; 2048];
    if read_at(r, 1024, &mut b[..1024])?
        && let Some(e) = parse_ext4(&b[..1024])
    {
        return Ok(Some(Fs::Ext4(e)));
    }
    if read_at(r, 32768, &mut b)?
        && let Some(i) = parse_iso(&b)
    {
        return Ok(Some(Fs::Iso9660(i)));
    }
    if read_at(r, 0, &mut b[..512])?
        && let Some(label) = parse_vfat(&b[..512])
    {
        return Ok(Some(Fs::Vfat { label }));
    }
    // last: nothing recognised before changes what it was
    if let Some(h) = crate::disk::luks::probe(r)? {
        return Ok(Some(Fs::Luks2(h)));
    }
    Ok(None)
}

/// A window onto part of a device (a partition read through its disk).
pub struct Window<'a, R> {
    inner: &'a mut R,
    base: u64,
    len: u64,
    pos: u64,
}

impl<'a, R: Read + Seek> Window<'a, R> {
    pub fn new(inner: &'a mut R, base: u64, len: u64) -> Self {
        Window {
            inner,
            base,
            len,
            pos: 0,
        }
    }
}

impl<R: Read + Seek> Read for Window<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos) as usize;
        let n = buf.len().min(left);
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.base + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Read + Seek> Seek for Window<'_, R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
            SeekFrom::End(d) => self.len.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn synthetic_ext4() {
        let mut img = vec![0u8; 4096];
        let sb = &mut img[1024..2048];
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[4..8].copy_from_slice(&1000u32.to_le_bytes());
        sb[12..16].copy_from_slice(&400u32.to_le_bytes());
        sb[24..28].copy_from_slice(&2u32.to_le_bytes());
        sb[58..60].copy_from_slice(&1u16.to_le_bytes());
        sb[92..96].copy_from_slice(&4u32.to_le_bytes());
        sb[120..131].copy_from_slice(b"persistence");
        let fs = probe(&mut Cursor::new(img.clone())).unwrap().unwrap();
        let Fs::Ext4(e) = fs else {
            panic!("not ext4: {fs:?}")
        };
        assert_eq!(e.label, "persistence");
        assert_eq!((e.block_size, e.blocks, e.free_blocks), (4096, 1000, 400));
        assert!(e.has_journal && e.clean && !e.needs_recovery);
        assert_eq!(e.wear, Ext4Wear::default());
        // a journalled ext4 left mounted (a power cut, no unmount)
        img[1024 + 96..1024 + 100].copy_from_slice(&(0x4u32 | 0x40 | 0x80).to_le_bytes());
        let Some(Fs::Ext4(e)) = probe(&mut Cursor::new(img.clone())).unwrap() else {
            panic!("not ext4")
        };
        assert!(e.needs_recovery && e.clean);
        img[1024 + 96..1024 + 100].copy_from_slice(&0u32.to_le_bytes());
        // a hostile block size is not ext4, and no panic
        img[1024 + 24..1024 + 28].copy_from_slice(&200u32.to_le_bytes());
        assert_eq!(probe(&mut Cursor::new(img)).unwrap(), None);
    }

    #[test]
    fn wear_fields_are_read() {
        let mut sb = vec![0u8; 1024];
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x178..0x180].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        sb[0x194..0x198].copy_from_slice(&7u32.to_le_bytes());
        sb[0x198..0x19C].copy_from_slice(&1_700_000_000u32.to_le_bytes());
        sb[0x1CC..0x1D0].copy_from_slice(&u32::MAX.to_le_bytes());
        // the high bytes of the times (ext4 past 2038)
        sb[0x279] = 1;
        let w = parse_ext4(&sb).unwrap().wear;
        assert_eq!(w.kbytes_written, u64::MAX - 1);
        assert_eq!(w.error_count, 7);
        assert_eq!(w.first_error_unix_s, 1_700_000_000);
        assert_eq!(w.last_error_unix_s, (1u64 << 32) | u64::from(u32::MAX));
        // a short buffer is no superblock, not a panic
        assert_eq!(parse_ext4(&sb[..1023]), None);
    }

    #[test]
    fn a_volume_with_a_malformed_date_still_counts() {
        // found by the long fuzz run: its size must not vanish with its UUID
        let mut pvd = vec![0u8; 2048];
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[80..84].copy_from_slice(&65536u32.to_le_bytes());
        pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
        pvd[813..829].copy_from_slice(b"20261122225541xx");
        let i = parse_iso(&pvd).unwrap();
        assert_eq!((i.size, i.uuid.as_str()), (128 << 20, ""));
        pvd[813..829].copy_from_slice(b"2026112222554100");
        assert_eq!(parse_iso(&pvd).unwrap().uuid, "2026-11-22-22-55-41-00");
    }

    #[test]
    fn nothing_on_zeros() {
        assert_eq!(probe(&mut Cursor::new(vec![0u8; 65536])).unwrap(), None);
        assert_eq!(probe(&mut Cursor::new(vec![0u8; 100])).unwrap(), None);
    }
}
