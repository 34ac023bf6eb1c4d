//! Reading a stick's partition tables into one model, and the isohybrid
//! gaps in them. Works on any `Read + Seek` (an image file, a block device,
//! a `Cursor` in tests).
//!
//! MBR and GPT are parsed here rather than with `mbrman`/`gpt`: those crates
//! normalise what they read (mbrman treats archiso's type-0 entry, which the
//! kernel shows as `sda1`, as unused and rewrites the whole sector; gpt
//! refuses or "repairs" a GPT whose backup header sits at the end of the ISO
//! instead of the device). We must see those entries exactly as the kernel
//! and firmware do and change no byte but the one entry we add.

use crate::disk::superblock::{self, IsoInfo};
use serde::Serialize;
use std::io::{self, Read, Seek, SeekFrom};

pub const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";

/// A partition the running kernel knows (from sysfs), in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelPart {
    pub name: String,
    pub number: u32,
    pub start: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MbrEntry {
    /// 1-based, as the kernel numbers it.
    pub number: u32,
    pub bootable: bool,
    #[serde(rename = "type")]
    pub kind: u8,
    pub start_lba: u64,
    pub sectors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mbr {
    pub entries: Vec<MbrEntry>,
    /// The whole first logical sector.
    #[serde(skip)]
    pub raw: Vec<u8>,
}

impl Mbr {
    pub fn has_protective(&self) -> bool {
        self.entries.iter().any(|e| e.kind == 0xEE)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GptEntry {
    pub number: u32,
    pub type_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gpt {
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entry_size: u32,
    pub header_crc_ok: bool,
    pub entries_crc_ok: bool,
    pub entries: Vec<GptEntry>,
    /// The whole sector of the primary header, and the sectors holding the
    /// entry array (the array itself is the first `entries_bytes()`).
    #[serde(skip)]
    pub header_sector: Vec<u8>,
    #[serde(skip)]
    pub entries_raw: Vec<u8>,
}

impl Gpt {
    pub fn header_size(&self) -> usize {
        le32(&self.header_sector, 12) as usize
    }
    pub fn entries_bytes(&self) -> u64 {
        u64::from(self.num_entries) * u64::from(self.entry_size)
    }
    pub fn valid(&self) -> bool {
        self.header_crc_ok && self.entries_crc_ok
    }
}

/// The table that firmware and the kernel actually use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// An MBR without a protective (0xEE) entry: archiso, isohybrid. A GPT
    /// next to it, if any, is ignored by firmware, the kernel and libfdisk
    /// alike (all three want an 0xEE entry before they look for a GPT).
    Mbr,
    /// A GPT behind a protective or hybrid MBR.
    Gpt,
    /// No partition table: a plain ISO 9660 image.
    None,
}

/// An extent of the device that holds something that was written to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub what: String,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub size: u64,
    pub sector_size: u64,
    pub table: TableKind,
    pub mbr: Option<Mbr>,
    pub gpt: Option<Gpt>,
    pub apm: bool,
    pub iso: Option<IsoInfo>,
    pub kernel: Vec<KernelPart>,
    /// Isohybrid gaps and other things a partitioning tool could get wrong.
    pub findings: Vec<String>,
    /// The first logical sector as read, whether or not it parsed as an
    /// MBR (the kernel's and libfdisk's rules read it differently).
    #[serde(skip)]
    pub sector0: Vec<u8>,
    /// The partitions of a GPT header at the device's last LBA that
    /// libfdisk would take, read only when libfdisk takes the MBR as
    /// protective and rejects the primary header (`gpt_probe_label`).
    #[serde(skip)]
    pub libfdisk_backup: Option<Vec<ReadPart>>,
    /// Why the kernel and libfdisk read these tables differently
    /// (`disagreement`), if they do. Not an error of `read_layout`: our
    /// own creation cut mid-write leaves such tables, and resuming it from
    /// its claim is what mends them; `disk::stick` refuses everything else.
    #[serde(skip)]
    pub disagreement: Option<String>,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// GUID bytes (mixed-endian on disk) as the usual upper-case string.
pub fn guid_string(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

pub fn read_exact_at<R: Read + Seek>(r: &mut R, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    r.seek(SeekFrom::Start(off))?;
    r.read_exact(&mut b)?;
    Ok(b)
}

pub fn parse_mbr(sector: &[u8]) -> Option<Mbr> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
        return None;
    }
    let mut entries = Vec::new();
    for i in 0..4 {
        let e = &sector[446 + 16 * i..462 + 16 * i];
        let (kind, start, size) = (e[4], le32(e, 8), le32(e, 12));
        // The kernel skips only entries of size 0; a type-0 entry with a
        // size is a partition to it (archiso's sda1).
        if size == 0 {
            continue;
        }
        entries.push(MbrEntry {
            number: i as u32 + 1,
            bootable: e[0] == 0x80,
            kind,
            start_lba: u64::from(start),
            sectors: u64::from(size),
        });
    }
    // A FAT or ISO boot sector also ends in 55 AA; an MBR has sane entries.
    let bad_status = (0..4).any(|i| !matches!(sector[446 + 16 * i], 0 | 0x80));
    if bad_status {
        return None;
    }
    Some(Mbr {
        entries,
        raw: sector.to_vec(),
    })
}

/// The primary GPT at LBA 1. `Ok(None)`: no GPT signature there. A header
/// with the signature whose fields the kernel would reject, or that points
/// outside a device of `size` bytes, is an `Invalid` error: such a table is
/// refused, never planned around.
pub fn parse_gpt<R: Read + Seek>(r: &mut R, ss: u64, size: u64) -> Result<Option<Gpt>, Invalid> {
    let Ok(hs) = read_exact_at(r, ss, ss as usize) else {
        return Ok(None);
    };
    if &hs[..8] != GPT_SIGNATURE {
        return Ok(None);
    }
    let bad = |why: String| Err(Invalid(format!("the GPT header at LBA 1 {why}")));
    let header_size = le32(&hs, 12) as usize;
    if !(92..=ss as usize).contains(&header_size) {
        return bad(format!("has a header size of {header_size} bytes"));
    }
    // Same checks as the kernel's is_gpt_valid(), plus every LBA within
    // the device: after these, `lba * ss` cannot overflow.
    let last = size / ss - 1;
    let my_lba = le64(&hs, 24);
    if my_lba != 1 {
        return bad(format!("says it is at LBA {my_lba}"));
    }
    let mut h = hs[..header_size].to_vec();
    let stored_crc = le32(&h, 16);
    h[16..20].fill(0);
    let header_crc_ok = crc32fast::hash(&h) == stored_crc;
    let entries_lba = le64(&hs, 72);
    let num_entries = le32(&hs, 80);
    let entry_size = le32(&hs, 84);
    let (alternate_lba, first_usable, last_usable) = (le64(&hs, 32), le64(&hs, 40), le64(&hs, 48));
    if entry_size != 128 {
        return bad(format!(
            "has {entry_size}-byte entries (the kernel takes only 128)"
        ));
    }
    if num_entries == 0 || u64::from(num_entries) * 128 > 1 << 20 {
        return bad(format!("has {num_entries} entries"));
    }
    let bytes = num_entries as usize * 128;
    let arr = (bytes as u64).div_ceil(ss);
    if entries_lba < 2 || entries_lba.checked_add(arr).is_none_or(|e| e > last + 1) {
        return bad(format!(
            "puts its entries at LBA {entries_lba}, outside the device (last LBA {last})"
        ));
    }
    if first_usable > last_usable || last_usable > last {
        return bad(format!(
            "has a usable range {first_usable}..={last_usable} outside the device (last LBA {last})"
        ));
    }
    if alternate_lba > last || alternate_lba <= last_usable || alternate_lba < arr + 2 {
        return bad(format!(
            "puts its backup at LBA {alternate_lba} (usable up to {last_usable}, last LBA {last})"
        ));
    }
    let raw = read_exact_at(r, entries_lba * ss, (arr * ss) as usize)
        .map_err(|e| Invalid(format!("reading the GPT entries at LBA {entries_lba}: {e}")))?;
    let entries_crc_ok = crc32fast::hash(&raw[..bytes]) == le32(&hs, 88);
    let mut entries = Vec::new();
    for (i, e) in raw[..bytes].chunks_exact(128).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first_lba, last_lba) = (le64(e, 32), le64(e, 40));
        if first_lba > last_lba || last_lba > last {
            return Err(Invalid(format!(
                "GPT entry {} covers LBA {first_lba}..={last_lba}, outside the device (last LBA {last})",
                i + 1
            )));
        }
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        entries.push(GptEntry {
            number: i as u32 + 1,
            type_guid: guid_string(&e[..16]),
            first_lba,
            last_lba,
            name: String::from_utf16_lossy(&name),
        });
    }
    Ok(Some(Gpt {
        alternate_lba,
        first_usable,
        last_usable,
        entries_lba,
        num_entries,
        entry_size,
        header_crc_ok,
        entries_crc_ok,
        entries,
        header_sector: hs,
        entries_raw: raw,
    }))
}

/// For image files: 4096 if a GPT header sits at 4096 and none at 512.
pub fn guess_sector_size<R: Read + Seek>(r: &mut R) -> io::Result<u64> {
    let at = |r: &mut R, off| {
        read_exact_at(r, off, 8)
            .map(|b| &b[..] == GPT_SIGNATURE)
            .unwrap_or(false)
    };
    Ok(if !at(r, 512) && at(r, 4096) {
        4096
    } else {
        512
    })
}

/// Apple partition map (xorriso's `-isohybrid-apm-hfsplus`, grub-mkrescue).
fn has_apm<R: Read + Seek>(r: &mut R) -> bool {
    let ddm = read_exact_at(r, 0, 2)
        .map(|b| &b[..] == b"ER")
        .unwrap_or(false);
    ddm && [512u64, 2048].iter().any(|&o| {
        read_exact_at(r, o, 2)
            .map(|b| &b[..] == b"PM")
            .unwrap_or(false)
    })
}

/// Why a device's tables are not planned around: what the kernel would
/// reject, or a value pointing outside the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("untrusted partition table: {0}")]
pub struct Invalid(pub String);

/// A partition as one reader of the tables lists it, in logical sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReadPart {
    pub number: u32,
    pub start_lba: u64,
    pub sectors: u64,
}

/// What one reader of the tables (the Linux kernel, libfdisk) makes of a
/// device: the table it takes and the partitions it lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reading {
    pub table: TableKind,
    /// A GPT taken from the backup header at the device's last LBA.
    pub from_backup: bool,
    pub parts: Vec<ReadPart>,
}

impl Reading {
    fn none() -> Reading {
        Reading {
            table: TableKind::None,
            from_backup: false,
            parts: vec![],
        }
    }
    /// (start, sectors) of the partitions that hold sectors, in order (an
    /// MBR entry of size 0 that libfdisk lists claims no space).
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut x: Vec<(u64, u64)> = self
            .parts
            .iter()
            .filter(|p| p.sectors > 0)
            .map(|p| (p.start_lba, p.sectors))
            .collect();
        x.sort_unstable();
        x
    }
    /// The same table, and the same space in partitions.
    pub fn agrees_with(&self, o: &Reading) -> bool {
        self.table == o.table && self.extents() == o.extents()
    }
}

impl std::fmt::Display for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.table {
            TableKind::None => return write!(f, "no partition table"),
            TableKind::Mbr => write!(f, "an MBR")?,
            TableKind::Gpt if self.from_backup => {
                write!(f, "a GPT (from its backup header at the last LBA)")?
            }
            TableKind::Gpt => write!(f, "a GPT")?,
        }
        let parts: Vec<&ReadPart> = self.parts.iter().filter(|p| p.sectors > 0).collect();
        if parts.is_empty() {
            return write!(f, " with no partitions");
        }
        write!(f, " with partition")?;
        if parts.len() > 1 {
            write!(f, "s")?;
        }
        for (i, p) in parts.iter().take(8).enumerate() {
            write!(
                f,
                "{} {} at sectors {}..{}",
                if i == 0 { "" } else { "," },
                p.number,
                p.start_lba,
                p.start_lba.saturating_add(p.sectors)
            )?;
        }
        if parts.len() > 8 {
            write!(f, " and {} more", parts.len() - 8)?;
        }
        Ok(())
    }
}

/// The AIX label magic at the start of sector 0 (libfdisk's dos.c skips
/// such a disk).
const AIX_MAGIC: [u8; 4] = [0xC9, 0xC2, 0xD4, 0xC1];

fn has_magic(s: &[u8]) -> bool {
    s.len() >= 512 && s[510] == 0x55 && s[511] == 0xAA
}

/// Raw MBR slot `i` (0-based): status, type, start LBA, sectors, the 16 bytes.
fn slot(s: &[u8], i: usize) -> (u8, u8, u64, u64, &[u8]) {
    let e = &s[446 + 16 * i..462 + 16 * i];
    (e[0], e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)), e)
}

/// libfdisk's `valid_pmbr` (libfdisk/src/gpt.c): the signature, and the
/// first entry of type 0xEE starts at LBA 1 (other types next to it make
/// it hybrid, which counts the same).
fn libfdisk_pmbr(s: &[u8]) -> bool {
    has_magic(s)
        && (0..4)
            .map(|i| slot(s, i))
            .find(|e| e.1 == 0xEE)
            .is_some_and(|e| e.2 == 1)
}

/// libfdisk's `gpt_read_header` on the primary header, beyond the checks
/// `parse_gpt` already makes (size, LBA, usable range, 128-byte entries):
/// both checksums, and `gpt_check_lba_sanity`'s "the header lies outside
/// the usable range", which the kernel does not check.
fn libfdisk_primary_ok(g: &Gpt) -> bool {
    g.valid() && !(g.first_usable < 1 && 1 < g.last_usable)
}

/// The entries libfdisk lists (`gpt_get_partition`: a type GUID, or a
/// non-zero first LBA; a start past the end is a size of 0).
fn libfdisk_gpt_parts(arr: &[u8], entry_size: usize) -> Vec<ReadPart> {
    arr.chunks_exact(entry_size)
        .enumerate()
        .filter_map(|(i, e)| {
            let (first, last) = (le64(e, 32), le64(e, 40));
            let used = e[..16].iter().any(|&b| b != 0) || first != 0;
            used.then(|| ReadPart {
                number: i as u32 + 1,
                start_lba: first,
                sectors: if first > last {
                    0
                } else {
                    (last - first).saturating_add(1)
                },
            })
        })
        .collect()
}

/// A GPT header at `lba` as libfdisk's `gpt_read_header` takes it
/// (signature, header size 92..=sector, header checksum, the array read
/// whole and its checksum, `gpt_check_lba_sanity`, my LBA), and the
/// entries it lists. Arrays above 1 MiB are not read here (then `None`).
fn libfdisk_gpt_at<R: Read + Seek>(
    r: &mut R,
    lba: u64,
    ss: u64,
    size: u64,
) -> Option<Vec<ReadPart>> {
    let last = size / ss - 1;
    let h = read_exact_at(r, lba.checked_mul(ss)?, ss as usize).ok()?;
    if &h[..8] != GPT_SIGNATURE {
        return None;
    }
    let hsz = le32(&h, 12) as usize;
    if !(92..=ss as usize).contains(&hsz) {
        return None;
    }
    let mut hc = h[..hsz].to_vec();
    hc[16..20].fill(0);
    if crc32fast::hash(&hc) != le32(&h, 16) {
        return None;
    }
    let (n, es) = (u64::from(le32(&h, 80)), u64::from(le32(&h, 84)));
    let bytes = n.checked_mul(es).filter(|&b| b > 0 && b <= 1 << 20)?;
    if es < 128 {
        return None;
    }
    let off = le64(&h, 72)
        .checked_mul(ss)
        .filter(|o| o.checked_add(bytes).is_some_and(|e| e <= size))?;
    let ents = read_exact_at(r, off, bytes as usize).ok()?;
    if crc32fast::hash(&ents) != le32(&h, 88) {
        return None;
    }
    let (fu, lu) = (le64(&h, 40), le64(&h, 48));
    if lu < fu || fu > last || lu > last || (fu < 1 && 1 < lu) || le64(&h, 24) != lba {
        return None;
    }
    Some(libfdisk_gpt_parts(&ents, es as usize))
}

/// What the Linux kernel reads (without `gpt` on its command line), from
/// block/partitions: `efi_partition` runs before `msdos_partition`
/// (core.c). efi.c `is_pmbr_valid`: the signature and an entry of type
/// 0xEE starting at LBA 1 (protective, or hybrid with other types: both
/// count); then `find_valid_gpt`: the primary header and its array must be
/// valid (`is_gpt_valid`; the backup is not tried without `gpt`);
/// `is_pte_valid`: entries with a type, within the device. msdos.c
/// `msdos_partition`: a status byte other than 0 or 0x80 is no table (a FAT
/// boot sector at most); any 0xEE entry is left to efi (no table); else
/// every entry with a size, type 0 included. (Its AIX check also needs an
/// LVM record in sector 7, not read here: an AIX magic is read as an MBR.)
pub fn kernel_reading(l: &Layout) -> Reading {
    let s = &l.sector0;
    if !has_magic(s) {
        return Reading::none();
    }
    if (0..4).any(|i| slot(s, i).1 == 0xEE && slot(s, i).2 == 1) {
        return match &l.gpt {
            Some(g) if g.valid() => Reading {
                table: TableKind::Gpt,
                from_backup: false,
                parts: g
                    .entries
                    .iter()
                    .map(|e| ReadPart {
                        number: e.number,
                        start_lba: e.first_lba,
                        sectors: e.last_lba - e.first_lba + 1,
                    })
                    .collect(),
            },
            _ => Reading::none(),
        };
    }
    let bad_status = (0..4).any(|i| !matches!(slot(s, i).0, 0 | 0x80));
    if bad_status || (0..4).any(|i| slot(s, i).1 == 0xEE) {
        return Reading::none();
    }
    Reading {
        table: TableKind::Mbr,
        from_backup: false,
        parts: (0..4)
            .map(|i| (i, slot(s, i)))
            .filter(|(_, e)| e.3 != 0)
            .map(|(i, e)| ReadPart {
                number: i as u32 + 1,
                start_lba: e.2,
                sectors: e.3,
            })
            .collect(),
    }
}

/// What libfdisk (fdisk, sfdisk, cfdisk) reads: the GPT label is probed
/// before the DOS one. gpt.c `gpt_probe_label`: `valid_pmbr` (the first
/// 0xEE entry starts at LBA 1; status bytes are not looked at), then the
/// primary header (`gpt_read_header`), else the backup at the last LBA;
/// dos.c `dos_probe_label`: the signature and no AIX magic, nothing else;
/// it lists every entry that is not all zeros (`dos_get_partition`), a
/// size of 0 or type 0 included.
pub fn libfdisk_reading(l: &Layout) -> Reading {
    let s = &l.sector0;
    if !has_magic(s) {
        return Reading::none();
    }
    if libfdisk_pmbr(s) {
        if let Some(g) = &l.gpt
            && libfdisk_primary_ok(g)
        {
            return Reading {
                table: TableKind::Gpt,
                from_backup: false,
                parts: libfdisk_gpt_parts(&g.entries_raw[..g.entries_bytes() as usize], 128),
            };
        }
        if let Some(parts) = &l.libfdisk_backup {
            return Reading {
                table: TableKind::Gpt,
                from_backup: true,
                parts: parts.clone(),
            };
        }
    }
    if s[..4] == AIX_MAGIC {
        return Reading::none();
    }
    Reading {
        table: TableKind::Mbr,
        from_backup: false,
        parts: (0..4)
            .map(|i| (i, slot(s, i)))
            .filter(|(_, e)| e.4.iter().any(|&b| b != 0))
            .map(|(i, e)| ReadPart {
                number: i as u32 + 1,
                start_lba: e.2,
                sectors: e.3,
            })
            .collect(),
    }
}

/// Why a device is refused when the kernel and libfdisk read its tables
/// differently: a partitioning tool would then show other partitions than
/// the running system uses (a new partition as free space, to be written
/// over). `None` when they agree.
pub fn disagreement(l: &Layout) -> Option<String> {
    let (k, f) = (kernel_reading(l), libfdisk_reading(l));
    (!k.agrees_with(&f)).then(|| {
        format!(
            "the kernel and libfdisk read the tables differently: the kernel reads {k}; \
             libfdisk (fdisk, sfdisk, cfdisk) reads {f}; a partitioning tool would not see \
             the partitions the running system uses"
        )
    })
}

/// Read the tables of a device of `size` bytes into a `Layout`, validated:
/// every table value lies within the device, so nothing derived from a
/// `Layout` can overflow. An I/O error or an `Invalid` table is an error.
pub fn read_layout<R: Read + Seek>(
    r: &mut R,
    size: u64,
    sector_size: u64,
    kernel: Vec<KernelPart>,
) -> anyhow::Result<Layout> {
    if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(Invalid(format!("sector size {sector_size}")).into());
    }
    if size < 64 * sector_size {
        return Err(Invalid(format!("the device is only {size} bytes")).into());
    }
    let sector0 = read_exact_at(r, 0, sector_size as usize)?;
    let mbr = parse_mbr(&sector0);
    let gpt = parse_gpt(r, sector_size, size)?;
    let apm = has_apm(r);
    let iso = read_exact_at(r, 32768, 2048)
        .ok()
        .and_then(|b| superblock::parse_iso(&b));
    let sectors = size / sector_size;
    if let Some(m) = &mbr {
        for e in &m.entries {
            if e.kind == 0xEE && e.start_lba != 1 {
                // the kernel then reads neither a GPT nor this MBR
                return Err(Invalid(format!(
                    "MBR entry {} is a GPT protective entry at LBA {} (it must start at LBA 1)",
                    e.number, e.start_lba
                ))
                .into());
            }
            // a protective entry may say "the whole disk" (0xFFFFFFFF)
            if e.kind != 0xEE && e.start_lba + e.sectors > sectors {
                return Err(Invalid(format!(
                    "MBR entry {} covers sectors {}..{}, beyond the device's {sectors}",
                    e.number,
                    e.start_lba,
                    e.start_lba + e.sectors
                ))
                .into());
            }
        }
    }
    for k in &kernel {
        if k.start.checked_add(k.size).is_none_or(|e| e > size) {
            return Err(Invalid(format!(
                "the kernel's partition {} ends beyond the device",
                k.name
            ))
            .into());
        }
    }
    if let Some(i) = &iso
        && i.size > size
    {
        return Err(Invalid(format!(
            "the ISO 9660 volume '{}' says it is {} bytes, more than the device's {size}",
            i.label, i.size
        ))
        .into());
    }
    if let Some(g) = &gpt {
        // A plan rewrites a sector of the primary entry array: it must hold
        // nothing else (no ISO volume past its 32 KiB system area, no
        // partition's data).
        let ss = sector_size;
        let (a0, a1) = (
            g.entries_lba * ss,
            (g.entries_lba + g.entries_bytes().div_ceil(ss)) * ss,
        );
        let overlaps = |s: u64, e: u64| a0 < e && s < a1;
        let iso_data = iso.as_ref().is_some_and(|i| overlaps(32768, i.size));
        let entry = mbr
            .iter()
            .flat_map(|m| &m.entries)
            .filter(|e| e.kind != 0xEE)
            .map(|e| (e.start_lba * ss, (e.start_lba + e.sectors) * ss))
            .chain(
                g.entries
                    .iter()
                    .map(|e| (e.first_lba * ss, (e.last_lba + 1) * ss)),
            )
            // an entry starting in the table area (isohybrid's from LBA 0)
            // still holds data past the 32 KiB system area
            .find(|&(s, e)| overlaps(if s >= 2 * ss { s } else { s.max(32768) }, e));
        if iso_data || entry.is_some() {
            return Err(Invalid(format!(
                "the GPT entry array (bytes {a0}..{a1}) overlaps {}",
                if iso_data {
                    "the ISO 9660 volume"
                } else {
                    "a partition"
                }
            ))
            .into());
        }
    }
    let table = match (&mbr, &gpt) {
        (Some(m), Some(_)) if m.has_protective() => TableKind::Gpt,
        (Some(m), _) if !m.entries.is_empty() && !m.has_protective() => TableKind::Mbr,
        _ => TableKind::None,
    };
    // libfdisk falls back to the backup at the last LBA when it takes the
    // MBR as protective but not the primary header
    let libfdisk_backup =
        if libfdisk_pmbr(&sector0) && !gpt.as_ref().is_some_and(libfdisk_primary_ok) {
            libfdisk_gpt_at(r, sectors - 1, sector_size, size)
        } else {
            None
        };
    let mut l = Layout {
        size,
        sector_size,
        table,
        mbr,
        gpt,
        apm,
        iso,
        kernel,
        findings: vec![],
        sector0,
        libfdisk_backup,
        disagreement: None,
    };
    l.disagreement = disagreement(&l);
    l.findings = findings(&l);
    Ok(l)
}

fn findings(l: &Layout) -> Vec<String> {
    let ss = l.sector_size;
    let mut f = Vec::new();
    if let Some(m) = &l.mbr {
        for e in m
            .entries
            .iter()
            .filter(|e| e.kind == 0 && l.table == TableKind::Mbr)
        {
            f.push(format!(
                "MBR entry {} has type 0x00 but covers sectors {}..{}: the kernel shows it as a \
                 partition, parted and similar tools report it as free space (isohybrid gap)",
                e.number,
                e.start_lba,
                e.start_lba + e.sectors
            ));
        }
    }
    if let Some(g) = &l.gpt {
        if !g.valid() {
            f.push("the GPT's checksums do not match: it is not used".into());
        }
        if l.table == TableKind::Mbr {
            f.push("a GPT is present but the MBR has no protective entry: firmware, the kernel and libfdisk use the MBR".into());
        }
        let last = l.size / ss - 1;
        if g.alternate_lba != last {
            f.push(format!(
                "GPT backup header at LBA {} is not at the device's end (LBA {last})",
                g.alternate_lba
            ));
        }
        if let Some(iso) = &l.iso {
            for e in &g.entries {
                let (s, end) = (e.first_lba * ss, (e.last_lba + 1) * ss);
                if s < iso.size && end > 0 && !(s == 32768 && e.type_guid.starts_with("EBD0A0A2")) {
                    f.push(format!(
                        "GPT entry {} '{}' (bytes {s}..{end}) overlaps the ISO 9660 filesystem (0..{})",
                        e.number, e.name, iso.size
                    ));
                }
            }
        }
    }
    let tables = [l.mbr.is_some(), l.gpt.is_some(), l.apm]
        .iter()
        .filter(|&&b| b)
        .count();
    if tables > 1 {
        f.push(format!(
            "several partition tables at once: MBR={} GPT={} APM={}",
            l.mbr.is_some(),
            l.gpt.is_some(),
            l.apm
        ));
    }
    for k in &l.kernel {
        if !l
            .table_entries()
            .iter()
            .any(|(n, s, _)| *n == k.number && *s == k.start)
        {
            f.push(format!(
                "kernel partition {} (number {}, bytes {}..{}) is not in the {:?} table",
                k.name,
                k.number,
                k.start,
                k.start + k.size,
                l.table
            ));
        }
    }
    f
}

impl Layout {
    /// (number, start, size) in bytes of the entries of the table in use.
    pub fn table_entries(&self) -> Vec<(u32, u64, u64)> {
        let ss = self.sector_size;
        match self.table {
            TableKind::Mbr => self
                .mbr
                .iter()
                .flat_map(|m| &m.entries)
                .map(|e| (e.number, e.start_lba * ss, e.sectors * ss))
                .collect(),
            TableKind::Gpt => self
                .gpt
                .iter()
                .flat_map(|g| &g.entries)
                .map(|e| {
                    (
                        e.number,
                        e.first_lba * ss,
                        (e.last_lba + 1 - e.first_lba) * ss,
                    )
                })
                .collect(),
            TableKind::None => vec![],
        }
    }

    /// Every region of the device that holds what was written to it: the
    /// ISO filesystem, every entry of every table, both GPT headers and
    /// arrays, every kernel node. Nothing may be placed below their end.
    /// (`read_layout` bounds every value by the device; the saturating
    /// arithmetic is a second guard and errs towards "in use".)
    pub fn extents(&self) -> Vec<Extent> {
        let ss = self.sector_size;
        let mut x = vec![Extent {
            what: "partition table sectors".into(),
            start: 0,
            end: 2 * ss,
        }];
        if let Some(iso) = &self.iso {
            x.push(Extent {
                what: format!("ISO 9660 filesystem '{}'", iso.label),
                start: 0,
                end: iso.size,
            });
        }
        if let Some(m) = &self.mbr {
            for e in &m.entries {
                let (start, end) = if e.kind == 0xEE {
                    // A protective entry says "GPT here", not "data here".
                    (0, 0)
                } else {
                    (
                        e.start_lba * ss,
                        (e.start_lba + e.sectors).saturating_mul(ss),
                    )
                };
                x.push(Extent {
                    what: format!("MBR entry {} (type 0x{:02x})", e.number, e.kind),
                    start,
                    end,
                });
            }
        }
        if let Some(g) = &self.gpt {
            let arr = g.entries_bytes().div_ceil(ss);
            x.push(Extent {
                what: "primary GPT entries".into(),
                start: g.entries_lba.saturating_mul(ss),
                end: g.entries_lba.saturating_add(arr).saturating_mul(ss),
            });
            // A backup at the device's last LBA is rewritten in place by a
            // plan; anywhere else (the ISO's end) it is data to keep.
            let last = self.size / ss - 1;
            if g.alternate_lba > 1 && g.alternate_lba < last {
                x.push(Extent {
                    what: "GPT backup header and entries".into(),
                    start: (g.alternate_lba.saturating_sub(arr)) * ss,
                    end: g.alternate_lba.saturating_add(1).saturating_mul(ss),
                });
            }
            for e in &g.entries {
                x.push(Extent {
                    what: format!("GPT entry {} '{}'", e.number, e.name),
                    start: e.first_lba.saturating_mul(ss),
                    end: e.last_lba.saturating_add(1).saturating_mul(ss),
                });
            }
        }
        for k in &self.kernel {
            x.push(Extent {
                what: format!("kernel partition {}", k.name),
                start: k.start,
                end: k.start.saturating_add(k.size),
            });
        }
        x.retain(|e| e.end > e.start);
        x
    }

    /// The first byte after everything that was written to the stick.
    pub fn used_end(&self) -> u64 {
        self.extents().iter().map(|e| e.end).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_rendering() {
        let esp = [
            0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
            0xC9, 0x3B,
        ];
        assert_eq!(guid_string(&esp), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    }

    #[test]
    fn mbr_keeps_type_zero_entries_with_a_size() {
        let mut s = vec![0u8; 512];
        s[510] = 0x55;
        s[511] = 0xAA;
        s[446] = 0x80;
        s[446 + 8..446 + 12].copy_from_slice(&64u32.to_le_bytes());
        s[446 + 12..446 + 16].copy_from_slice(&6080u32.to_le_bytes());
        let m = parse_mbr(&s).unwrap();
        assert_eq!(m.entries.len(), 1);
        assert_eq!(m.entries[0].kind, 0);
        assert!(m.entries[0].bootable);
        s[446 + 16] = 0x29; // a FAT boot sector's byte, not a status
        assert!(parse_mbr(&s).is_none());
    }

    /// A 64 MiB device: `mbr` as (status, type, start, sectors) slots, and a
    /// GPT (primary and backup, 128 entries) with `parts` as (type, first,
    /// last) when `first_usable` is given.
    /// A GPT entry: type, first LBA, last LBA.
    type Entry = ([u8; 16], u64, u64);

    fn device(mbr: &[(u8, u8, u32, u32)], gpt: Option<(u64, &[Entry])>) -> Vec<u8> {
        let n = 131072u64;
        let mut d = vec![0u8; (n * 512) as usize];
        d[510] = 0x55;
        d[511] = 0xAA;
        for (i, &(st, t, start, len)) in mbr.iter().enumerate() {
            let o = 446 + 16 * i;
            d[o] = st;
            d[o + 4] = t;
            d[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
            d[o + 12..o + 16].copy_from_slice(&len.to_le_bytes());
        }
        if let Some((fu, parts)) = gpt {
            let mut arr = vec![0u8; 128 * 128];
            for (i, (t, a, b)) in parts.iter().enumerate() {
                let e = &mut arr[128 * i..128 * (i + 1)];
                e[..16].copy_from_slice(t);
                e[16..32].fill(i as u8 + 1);
                e[32..40].copy_from_slice(&a.to_le_bytes());
                e[40..48].copy_from_slice(&b.to_le_bytes());
            }
            let crc = crc32fast::hash(&arr);
            for (my, alt, at) in [(1, n - 1, 2), (n - 1, 1, n - 33)] {
                let mut h = vec![0u8; 92];
                h[..8].copy_from_slice(GPT_SIGNATURE);
                h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
                h[12..16].copy_from_slice(&92u32.to_le_bytes());
                for (o, v) in [(24, my), (32, alt), (40, fu), (48, n - 34), (72, at)] {
                    h[o..o + 8].copy_from_slice(&v.to_le_bytes());
                }
                h[56..72].fill(0x11);
                h[80..84].copy_from_slice(&128u32.to_le_bytes());
                h[84..88].copy_from_slice(&128u32.to_le_bytes());
                h[88..92].copy_from_slice(&crc.to_le_bytes());
                let hc = crc32fast::hash(&h);
                h[16..20].copy_from_slice(&hc.to_le_bytes());
                let o = (my * 512) as usize;
                d[o..o + 92].copy_from_slice(&h);
                let o = (at * 512) as usize;
                d[o..o + arr.len()].copy_from_slice(&arr);
            }
        }
        d
    }

    fn read(d: Vec<u8>) -> anyhow::Result<Layout> {
        let size = d.len() as u64;
        read_layout(&mut io::Cursor::new(d), size, 512, vec![])
    }

    const LINUX: [u8; 16] = [
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ];

    #[test]
    fn mbr_without_0xee_and_a_valid_gpt_is_the_mbr_to_both() {
        // archiso's layout: libfdisk's valid_pmbr wants an 0xEE entry
        // before it looks for a GPT, as the kernel does
        let l = read(device(
            &[(0x80, 0x00, 64, 6080), (0, 0xEF, 6144, 16384)],
            Some((34, &[(LINUX, 40000, 50000)])),
        ))
        .unwrap();
        assert_eq!(l.table, TableKind::Mbr);
        let (k, f) = (kernel_reading(&l), libfdisk_reading(&l));
        assert_eq!(k.table, TableKind::Mbr);
        assert!(k.agrees_with(&f), "{k} / {f}");
        assert_eq!(k.extents(), vec![(64, 6080), (6144, 16384)]);
    }

    #[test]
    fn protective_mbr_and_gpt_is_the_gpt() {
        let l = read(device(
            &[(0, 0xEE, 1, 131071)],
            Some((34, &[(LINUX, 2048, 4095)])),
        ))
        .unwrap();
        assert_eq!(l.table, TableKind::Gpt);
        assert_eq!(kernel_reading(&l), libfdisk_reading(&l));
        assert_eq!(kernel_reading(&l).extents(), vec![(2048, 2048)]);
    }

    #[test]
    fn hybrid_mbr_is_the_gpt_to_both() {
        // 0xEE at LBA 1 next to a FAT entry: is_pmbr_valid and valid_pmbr
        // both say hybrid, and both then read the GPT
        let l = read(device(
            &[(0x80, 0x0C, 2048, 2048), (0, 0xEE, 1, 2047)],
            Some((34, &[(LINUX, 2048, 4095)])),
        ))
        .unwrap();
        assert_eq!(l.table, TableKind::Gpt);
        assert!(kernel_reading(&l).agrees_with(&libfdisk_reading(&l)));
    }

    #[test]
    fn plain_mbr_without_gpt_is_accepted() {
        let l = read(device(&[(0, 0x83, 2048, 2048)], None)).unwrap();
        assert_eq!(l.table, TableKind::Mbr);
        assert!(kernel_reading(&l).agrees_with(&libfdisk_reading(&l)));
    }

    /// Read, but the kernel and libfdisk disagree: why (`disk::stick`
    /// refuses it unless it resumes its own creation).
    fn refusal(d: Vec<u8>) -> String {
        let l = read(d).unwrap();
        l.disagreement.expect("a disagreement")
    }

    #[test]
    fn a_bad_status_byte_is_no_table_to_the_kernel_but_an_mbr_to_libfdisk() {
        let msg = refusal(device(&[(0x12, 0x83, 2048, 2048)], None));
        assert!(msg.contains("the kernel reads no partition table"), "{msg}");
        assert!(
            msg.contains("libfdisk (fdisk, sfdisk, cfdisk) reads an MBR with partition 1 at sectors 2048..4096"),
            "{msg}"
        );
    }

    #[test]
    fn a_gpt_whose_usable_range_covers_its_header_is_refused() {
        // the kernel takes it; libfdisk's gpt_check_lba_sanity does not,
        // and reads the MBR with its 0xEE entry instead
        let msg = refusal(device(
            &[(0, 0xEE, 1, 131071)],
            Some((0, &[(LINUX, 2048, 4095)])),
        ));
        assert!(
            msg.contains("the kernel reads a GPT with partition 1 at sectors 2048..4096"),
            "{msg}"
        );
        assert!(msg.contains("libfdisk (fdisk, sfdisk, cfdisk) reads an MBR with partition 1 at sectors 1..131072"), "{msg}");
    }

    #[test]
    fn a_gpt_entry_without_type_but_with_a_start_is_refused() {
        // libfdisk lists it, the kernel's is_pte_valid skips it: its
        // space would be free to us and taken to fdisk
        let msg = refusal(device(
            &[(0, 0xEE, 1, 131071)],
            Some((34, &[(LINUX, 2048, 4095), ([0; 16], 8192, 9000)])),
        ));
        assert!(msg.contains("2 at sectors 8192..9001"), "{msg}");
    }

    #[test]
    fn a_corrupt_primary_gpt_is_no_table_to_the_kernel_and_the_backup_to_libfdisk() {
        let mut d = device(&[(0, 0xEE, 1, 131071)], Some((34, &[(LINUX, 2048, 4095)])));
        d[512 + 16] ^= 1; // the primary header's checksum
        let msg = refusal(d);
        assert!(msg.contains("the kernel reads no partition table"), "{msg}");
        assert!(
            msg.contains("reads a GPT (from its backup header at the last LBA) with partition 1"),
            "{msg}"
        );
    }
}
