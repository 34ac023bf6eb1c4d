//! Where a new persistence partition goes, and the exact sector writes that
//! create it. Pure: takes a `Layout`, returns a plan; `table` applies it.

use crate::disk::layout::{Gpt, KernelPart, Layout, TableKind};
use crate::settings::size::{MIB, human};
use serde::Serialize;

/// GPT type for "Linux filesystem data".
pub const LINUX_FS_GUID: [u8; 16] = [
    0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4,
];

#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Less room than this: no partition.
    pub min_free: u64,
    pub max_size: Option<u64>,
    pub align: u64,
    /// The new GPT entry's unique GUID (random in real runs).
    pub guid: [u8; 16],
    /// The GPT partition name.
    pub name: String,
    /// Free bytes kept between what is on the stick and the partition
    /// (for the claim, `disk::claim`).
    pub reserve: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            min_free: 100 * MIB,
            max_size: None,
            align: MIB,
            guid: [0x42; 16],
            name: "persistence".into(),
            reserve: 0,
        }
    }
}

/// A sector-granular write: the full new content of whole sectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Write {
    pub what: String,
    pub offset: u64,
    #[serde(skip)]
    pub data: Vec<u8>,
    pub len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartPlan {
    pub table: TableKind,
    pub number: u32,
    /// Byte offset and length of the new partition.
    pub start: u64,
    pub size: u64,
    /// The first byte after everything already on the stick.
    pub used_end: u64,
    pub writes: Vec<Write>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum Refusal {
    #[error("the device has no partition table (a plain ISO 9660 image): refusing to write one")]
    NoTable,
    #[error("the GPT's checksums are wrong: refusing to change a table we cannot trust")]
    GptInvalid,
    #[error("no free entry in the {table:?} table")]
    NoFreeSlot { table: TableKind },
    #[error("only {free_h} free after the ISO (at byte {used_end}); at least {min_h} is needed")]
    TooSmall {
        free: u64,
        free_h: String,
        min_h: String,
        used_end: u64,
    },
    #[error("the MBR cannot address the free space after {start_h} (2 TiB limit)")]
    BeyondMbr { start_h: String },
    #[error(
        "partition {number} was started by an earlier run, but the table changed since: not finishing it"
    )]
    TableChanged { number: u32 },
    #[error("bytes {start}..{end} are not within the free room {lo}..{hi}")]
    Outside {
        start: u64,
        end: u64,
        lo: u64,
        hi: u64,
    },
}

/// `v` rounded up to a multiple of `a`; `None` past u64.
fn align_up(v: u64, a: u64) -> Option<u64> {
    v.div_ceil(a).checked_mul(a)
}

fn number_taken(kernel: &[KernelPart], n: u32) -> bool {
    kernel.iter().any(|k| k.number == n)
}

/// Where a new partition may go: the aligned first byte after everything
/// on the stick (and `reserve`), and the aligned last byte the table in use
/// can describe. Refused when the room is below `min_free`.
pub fn bounds(l: &Layout, o: &PlanOptions) -> Result<(u64, u64), Refusal> {
    let ss = l.sector_size;
    let used_end = l.used_end();
    let too_small = |free: u64| Refusal::TooSmall {
        free,
        free_h: human(free),
        min_h: human(o.min_free),
        used_end,
    };
    let align = align_up(o.align.max(ss), ss).ok_or_else(|| too_small(0))?;
    let mut start = used_end
        .checked_add(o.reserve)
        .and_then(|v| align_up(v, align))
        .ok_or_else(|| too_small(0))?;
    // The end: what the table in use can describe, rounded down.
    let mut end = match (&l.table, &l.gpt) {
        // a GPT needs its backup array and header at the device's end
        (TableKind::Gpt, Some(g)) => {
            let tail = (g.entries_bytes().div_ceil(ss) + 1) * ss;
            // sfdisk and the kernel's peers want entries in the usable range
            start = start.max(align_up(g.first_usable * ss, align).ok_or_else(|| too_small(0))?);
            l.size.saturating_sub(tail)
        }
        // an MBR entry addresses at most 2^32 - 1 sectors (2 TiB)
        (TableKind::Mbr, _) => {
            let max = u64::from(u32::MAX) * ss;
            if start >= max {
                return Err(Refusal::BeyondMbr {
                    start_h: human(start),
                });
            }
            l.size.min(max)
        }
        _ => l.size,
    } / align
        * align;
    if let Some(cap) = o.max_size {
        end = end.min(start.saturating_add(cap / align * align));
    }
    if end <= start || end - start < o.min_free {
        return Err(too_small(end.saturating_sub(start)));
    }
    if l.table == TableKind::None {
        return Err(Refusal::NoTable);
    }
    Ok((start, end))
}

/// The new partition in all the room `bounds` gives.
pub fn plan(l: &Layout, o: &PlanOptions) -> Result<PartPlan, Refusal> {
    let (start, end) = bounds(l, o)?;
    place(l, o, start, end)
}

/// A partition at exactly `start`, `size` bytes (putting back the entry of
/// a filesystem found in the free space): refused unless it lies within
/// `bounds`.
pub fn plan_at(l: &Layout, o: &PlanOptions, start: u64, size: u64) -> Result<PartPlan, Refusal> {
    let (lo, hi) = bounds(l, o)?;
    let ss = l.sector_size;
    let end = start.saturating_add(size);
    if start < lo || end > hi || !start.is_multiple_of(ss) || !size.is_multiple_of(ss) || size == 0
    {
        return Err(Refusal::Outside { start, end, lo, hi });
    }
    place(l, o, start, end)
}

fn place(l: &Layout, o: &PlanOptions, start: u64, end: u64) -> Result<PartPlan, Refusal> {
    let used_end = l.used_end();
    match l.table {
        TableKind::None => Err(Refusal::NoTable),
        TableKind::Mbr => plan_mbr(l, o, start, end, used_end),
        TableKind::Gpt => plan_gpt(l, o, start, end, used_end),
    }
}

fn chs_none() -> [u8; 3] {
    // "beyond CHS": what sfdisk and fdisk write for LBA-only entries
    [0xFE, 0xFF, 0xFF]
}

fn plan_mbr(
    l: &Layout,
    _o: &PlanOptions,
    start: u64,
    end: u64,
    used_end: u64,
) -> Result<PartPlan, Refusal> {
    let ss = l.sector_size;
    let mbr = l.mbr.as_ref().expect("MBR table kind has an MBR");
    let slot = (0..4usize)
        .find(|&i| {
            let raw = &mbr.raw[446 + 16 * i..462 + 16 * i];
            raw.iter().all(|&b| b == 0) && !number_taken(&l.kernel, i as u32 + 1)
        })
        .ok_or(Refusal::NoFreeSlot {
            table: TableKind::Mbr,
        })?;
    // the whole first logical sector, changed in one entry only
    let mut sector = mbr.raw.clone();
    let e = &mut sector[446 + 16 * slot..462 + 16 * slot];
    e[0] = 0;
    e[1..4].copy_from_slice(&chs_none());
    e[4] = 0x83;
    e[5..8].copy_from_slice(&chs_none());
    e[8..12].copy_from_slice(&((start / ss) as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(((end - start) / ss) as u32).to_le_bytes());
    Ok(PartPlan {
        table: TableKind::Mbr,
        number: slot as u32 + 1,
        start,
        size: end - start,
        used_end,
        writes: vec![Write {
            what: format!("MBR (entry {})", slot + 1),
            offset: 0,
            len: sector.len(),
            data: sector,
        }],
    })
}

fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

fn plan_gpt(
    l: &Layout,
    o: &PlanOptions,
    start: u64,
    end: u64,
    used_end: u64,
) -> Result<PartPlan, Refusal> {
    let ss = l.sector_size;
    let g = l.gpt.as_ref().expect("GPT table kind has a GPT");
    if !g.valid() {
        return Err(Refusal::GptInvalid);
    }
    let es = g.entry_size as usize;
    let slot = (0..g.num_entries as usize)
        .find(|&i| {
            g.entries_raw[i * es..i * es + 16].iter().all(|&b| b == 0)
                && !number_taken(&l.kernel, i as u32 + 1)
        })
        .ok_or(Refusal::NoFreeSlot {
            table: TableKind::Gpt,
        })?;
    let mut entries = g.entries_raw.clone();
    let e = &mut entries[slot * es..(slot + 1) * es];
    e.fill(0);
    e[..16].copy_from_slice(&LINUX_FS_GUID);
    e[16..32].copy_from_slice(&o.guid);
    put_u64(e, 32, start / ss);
    put_u64(e, 40, end / ss - 1);
    for (i, c) in o.name.encode_utf16().take(36).enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    let last = l.size / ss - 1;
    let writes = gpt_writes(l, g, &entries, slot, last, "at the device's end");
    Ok(PartPlan {
        table: TableKind::Gpt,
        number: slot as u32 + 1,
        start,
        size: end - start,
        used_end,
        writes,
    })
}

/// The sector writes for a GPT whose entry array is now `entries` (entry
/// `slot` changed), with the backup header at `alt`: primary header, the
/// one primary entry sector that changed, backup array, backup header.
fn gpt_writes(
    l: &Layout,
    g: &Gpt,
    entries: &[u8],
    slot: usize,
    alt: u64,
    where_: &str,
) -> Vec<Write> {
    let ss = l.sector_size;
    let es = g.entry_size as usize;
    let arr_sectors = g.entries_bytes().div_ceil(ss);
    let backup_entries_lba = alt - arr_sectors;
    let entries_crc = crc32fast::hash(&entries[..g.entries_bytes() as usize]);
    let hsize = g.header_size();
    let header = |my: u64, other: u64, entries_lba: u64| {
        let mut s = if my == 1 {
            g.header_sector.clone()
        } else {
            vec![0u8; ss as usize]
        };
        if my != 1 {
            s[..hsize].copy_from_slice(&g.header_sector[..hsize]);
        }
        put_u64(&mut s, 24, my);
        put_u64(&mut s, 32, other);
        put_u64(&mut s, 48, backup_entries_lba - 1); // last usable LBA
        put_u64(&mut s, 72, entries_lba);
        put_u32(&mut s, 88, entries_crc);
        put_u32(&mut s, 16, 0);
        let crc = crc32fast::hash(&s[..hsize]);
        put_u32(&mut s, 16, crc);
        s
    };
    // The backup array: the entries, zero-padded to whole sectors.
    let mut backup = entries[..g.entries_bytes() as usize].to_vec();
    backup.resize((arr_sectors * ss) as usize, 0);
    // The primary: only the one sector holding the changed entry.
    let sec = (slot * es) / ss as usize * ss as usize;
    // In the order they are written: the backup side first, then the
    // primary entries, the primary header last (the kernel reads the GPT
    // only while the primary header's checksum of the entries holds).
    vec![
        Write {
            what: format!("backup GPT entries {where_}"),
            offset: backup_entries_lba * ss,
            len: backup.len(),
            data: backup,
        },
        Write {
            what: format!("backup GPT header {where_}"),
            offset: alt * ss,
            len: ss as usize,
            data: header(alt, 1, backup_entries_lba),
        },
        Write {
            what: format!("primary GPT entries (entry {})", slot + 1),
            offset: g.entries_lba * ss + sec as u64,
            len: ss as usize,
            data: entries[sec..sec + ss as usize].to_vec(),
        },
        Write {
            what: "primary GPT header".into(),
            offset: ss,
            len: ss as usize,
            data: header(1, alt, g.entries_lba),
        },
    ]
}

/// The writes that delete partition `number` from the table in use, and
/// nothing else (when no creation backup can be restored).
pub fn plan_delete(l: &Layout, number: u32) -> Result<Vec<Write>, String> {
    let idx = number
        .checked_sub(1)
        .ok_or("partition numbers start at 1")? as usize;
    match l.table {
        TableKind::Mbr => {
            let m = l.mbr.as_ref().expect("MBR table kind has an MBR");
            if idx >= 4 || !m.entries.iter().any(|e| e.number == number) {
                return Err(format!("the MBR has no entry {number}"));
            }
            let mut sector = m.raw.clone();
            sector[446 + 16 * idx..462 + 16 * idx].fill(0);
            Ok(vec![Write {
                what: format!("MBR (entry {number})"),
                offset: 0,
                len: sector.len(),
                data: sector,
            }])
        }
        TableKind::Gpt => {
            let g = l.gpt.as_ref().expect("GPT table kind has a GPT");
            if !g.valid() {
                return Err("the GPT's checksums are wrong".into());
            }
            if !g.entries.iter().any(|e| e.number == number) {
                return Err(format!("the GPT has no entry {number}"));
            }
            let es = g.entry_size as usize;
            let mut entries = g.entries_raw.clone();
            entries[idx * es..(idx + 1) * es].fill(0);
            let alt = g.alternate_lba.min(l.size / l.sector_size - 1);
            Ok(gpt_writes(l, g, &entries, idx, alt, "in place"))
        }
        TableKind::None => Err("the device has no partition table".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::layout::{Layout, Mbr, MbrEntry};

    /// An MBR stick of `size` bytes whose one entry ends at `used` bytes.
    fn mbr_stick(size: u64, used: u64) -> Layout {
        let mut raw = vec![0u8; 512];
        raw[510] = 0x55;
        raw[511] = 0xAA;
        raw[446 + 4] = 0x83;
        raw[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        raw[446 + 12..446 + 16].copy_from_slice(&((used / 512 - 2048) as u32).to_le_bytes());
        Layout {
            size,
            sector_size: 512,
            table: TableKind::Mbr,
            mbr: Some(Mbr {
                entries: vec![MbrEntry {
                    number: 1,
                    bootable: false,
                    kind: 0x83,
                    start_lba: 2048,
                    sectors: used / 512 - 2048,
                }],
                raw: raw.clone(),
            }),
            gpt: None,
            apm: false,
            iso: None,
            kernel: vec![],
            findings: vec![],
            sector0: raw.clone(),
            libfdisk_backup: None,
            disagreement: None,
        }
    }

    #[test]
    fn the_mbr_limit_comes_before_the_min_free_check() {
        const TIB: u64 = 1 << 40;
        let o = PlanOptions::default();
        // 3 TiB stick, data up to 1 MiB below the 2 TiB an MBR can address:
        // there is room on the stick, but not where an MBR entry can reach.
        let l = mbr_stick(3 * TIB, 2 * TIB - 2 * MIB);
        match plan(&l, &o) {
            Err(Refusal::TooSmall { free, .. }) => assert!(free < o.min_free),
            other => panic!("expected too little room below 2 TiB, got {other:?}"),
        }
        // with 1 GiB below the limit, the partition ends at the limit
        let l = mbr_stick(3 * TIB, 2 * TIB - 1024 * MIB);
        let p = plan(&l, &o).unwrap();
        assert!(p.start + p.size <= u64::from(u32::MAX) * 512);
        assert!(p.size >= o.min_free && p.size < 1024 * MIB);
        // at or past the limit: refused as such
        let l = mbr_stick(3 * TIB, 2 * TIB + 4 * MIB);
        assert!(matches!(plan(&l, &o), Err(Refusal::BeyondMbr { .. })));
    }
}
