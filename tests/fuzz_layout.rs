//! Hostile input: seeded mutations of real stick images (xorriso with
//! mkarchiso's options, its UEFI-only variant, grub-mkrescue's MBR+GPT+APM
//! layout as Fedora-like, a stick with a user partition, a 4Kn GPT disk)
//! driven through layout parsing, partition planning, applying the plan,
//! re-reading, and superblock probing.
//!
//! For every case, whatever the bytes say:
//! - nothing panics (this test runs with overflow checks);
//! - a plan's partition and writes stay inside the device;
//! - the partition lies after everything the raw bytes describe (every
//!   MBR/GPT entry, the GPT arrays and headers, the ISO volume), computed
//!   here independently in u128 from the bytes, not from `Layout`;
//! - writes touch only the table area (the first 32 KiB) and the GPT's new
//!   backup after the partition, never the ISO volume or an entry's data;
//! - after applying it, the table reads back valid with the new entry, and
//!   planning again finds no room before the new partition's end.
//!
//!
//! A second oracle, the real `sfdisk --json` (libfdisk) run on the case
//! written to a sparse image file: whenever the layout is accepted, it
//! reads the same table (dos/gpt/none) and the same partitions (start,
//! size) as `layout::kernel_reading`, what we take the kernel to use;
//! tables the two read differently must be refused (512-byte sectors
//! only: sfdisk reads a file with 512-byte sectors).
//!
//! Bounded here (`FUZZ_CASES`, default 400 per image and size in `cargo
//! test`; `FUZZ_SFDISK_CASES`, default 12 accepted layouts per image and
//! size, a process each); the long run is documented in bench/README.md:
//!   FUZZ_CASES=40000 FUZZ_SFDISK_CASES=40000 CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true \
//!     cargo test --release --test fuzz_layout -- --nocapture

mod common;

use common::*;
use mados_persistence::disk::layout::{self, TableKind};
use mados_persistence::disk::partplan::{self, PlanOptions};
use mados_persistence::disk::superblock;
use mados_persistence::disk::table;
use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A device of `size` bytes: the image's bytes, zeros after them, and the
/// sectors written since, without allocating the whole device.
#[derive(Clone)]
struct Dev<'a> {
    /// The (mutated) first MiB, then the image as made.
    head: &'a [u8],
    base: &'a [u8],
    size: u64,
    ss: u64,
    written: HashMap<u64, Vec<u8>>,
    pos: u64,
}

impl Dev<'_> {
    fn sector(&self, n: u64) -> Vec<u8> {
        if let Some(s) = self.written.get(&n) {
            return s.clone();
        }
        let mut s = vec![0u8; self.ss as usize];
        let off = (n * self.ss) as usize;
        let src = if off < self.head.len() {
            self.head
        } else {
            self.base
        };
        if off < src.len() {
            let end = (off + self.ss as usize).min(src.len());
            s[..end - off].copy_from_slice(&src[off..end]);
        }
        s
    }
    fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let mut c = self.clone();
        c.pos = off;
        let _ = c.read(&mut b).unwrap();
        b
    }
}

impl Read for Dev<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(self.pos)) as usize;
        let mut done = 0;
        while done < n {
            let at = self.pos + done as u64;
            let (sec, within) = (at / self.ss, (at % self.ss) as usize);
            let s = self.sector(sec);
            let k = (self.ss as usize - within).min(n - done);
            buf[done..done + k].copy_from_slice(&s[within..within + k]);
            done += k;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Dev<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.pos.checked_add(buf.len() as u64).unwrap();
        assert!(
            end <= self.size,
            "write at {}..{end} beyond the device",
            self.pos
        );
        let mut done = 0;
        while done < buf.len() {
            let at = self.pos + done as u64;
            let (sec, within) = (at / self.ss, (at % self.ss) as usize);
            let mut s = self.sector(sec);
            let k = (self.ss as usize - within).min(buf.len() - done);
            s[within..within + k].copy_from_slice(&buf[done..done + k]);
            self.written.insert(sec, s);
            done += k;
        }
        self.pos = end;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Dev<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
            SeekFrom::End(d) => self.size.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

fn le32(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[o..o + 4].try_into().unwrap()))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Values that break arithmetic, for a field of `width` bytes.
fn interesting(r: &mut Rng, width: usize, size: u64, ss: u64) -> u64 {
    let lbas = size / ss;
    let v = match r.below(14) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX - 1,
        4 => u64::from(u32::MAX),
        5 => 1 << 31,
        6 => lbas,
        7 => lbas - 1,
        8 => lbas + 1,
        9 => lbas / 2,
        10 => 2,
        11 => 33,
        12 => 64,
        _ => r.next(),
    };
    if width == 4 { v & 0xFFFF_FFFF } else { v }
}

/// Mutate the bytes that describe the layout: MBR entries, the GPT header
/// and its first entries, the ISO's primary volume descriptor, and now and
/// then any byte of the first 64 KiB. Half the time the GPT's checksums are
/// made right again, so the checks behind them are reached too.
fn mutate(img: &mut [u8], r: &mut Rng, size: u64, ss: u64) {
    let ssu = ss as usize;
    let fields: &[(usize, usize)] = &[
        (446 + 8, 4),
        (446 + 12, 4),
        (462 + 8, 4),
        (462 + 12, 4),
        (478 + 8, 4),
        (478 + 12, 4),
        (494 + 8, 4),
        (494 + 12, 4),
        (ssu + 12, 4),   // GPT header size
        (ssu + 24, 8),   // my LBA
        (ssu + 32, 8),   // alternate LBA
        (ssu + 40, 8),   // first usable
        (ssu + 48, 8),   // last usable
        (ssu + 72, 8),   // entries LBA
        (ssu + 80, 4),   // number of entries
        (ssu + 84, 4),   // entry size
        (32768 + 80, 4), // ISO volume space size
        (32768 + 128, 2),
    ];
    for _ in 0..1 + r.below(4) {
        match r.below(10) {
            0..=5 => {
                let (o, w) = fields[r.below(fields.len() as u64) as usize];
                let v = interesting(r, w, size, ss);
                img[o..o + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            6 | 7 => {
                // a GPT entry's first or last LBA, or its type
                let arr = (le64(img, ssu + 72) as usize).min(6) * ssu;
                let i = r.below(4) as usize;
                let o = arr.max(2 * ssu) + 128 * i + [0, 32, 40][r.below(3) as usize];
                if o + 8 <= img.len() {
                    let v = interesting(r, 8, size, ss);
                    img[o..o + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            8 => {
                img[446 + 16 * r.below(4) as usize + 4] =
                    [0, 0xEE, 0x83, 0x05, 0xEF][r.below(5) as usize]
            }
            _ => {
                let o = r.below(65536.min(img.len() as u64)) as usize;
                img[o] = r.next() as u8;
            }
        }
    }
    if r.below(2) == 0 && &img[ssu..ssu + 8] == b"EFI PART" {
        fix_gpt_crcs(img, ss);
    }
}

fn fix_gpt_crcs(img: &mut [u8], ss: u64) {
    let h = ss as usize;
    let hsize = le32(img, h + 12) as usize;
    let (lba, n, es) = (le64(img, h + 72), le32(img, h + 80), le32(img, h + 84));
    if let Some(len) = n.checked_mul(es).filter(|l| *l <= 1 << 20)
        && let Some(off) = lba.checked_mul(ss).filter(|o| o + len <= img.len() as u64)
    {
        let crc = crc32fast::hash(&img[off as usize..(off + len) as usize]);
        img[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
    }
    if (92..=h).contains(&hsize) {
        img[h + 16..h + 20].fill(0);
        let crc = crc32fast::hash(&img[h..h + hsize]);
        img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }
}

/// What the raw bytes say is on the device, as byte ranges (u128: nothing
/// wraps), computed without `Layout`: the oracle.
fn described(dev: &Dev, ss: u64) -> Vec<(u128, u128)> {
    let ss128 = u128::from(ss);
    let mut x = vec![];
    let s0 = dev.bytes(0, ss as usize);
    let status_ok = (0..4).all(|i| matches!(s0[446 + 16 * i], 0 | 0x80));
    if s0[510] == 0x55 && s0[511] == 0xAA && status_ok {
        for i in 0..4 {
            let e = &s0[446 + 16 * i..462 + 16 * i];
            let (start, n) = (
                u128::from(le32(e, 8) as u32),
                u128::from(le32(e, 12) as u32),
            );
            if n > 0 && e[4] != 0xEE {
                x.push((start * ss128, (start + n) * ss128));
            }
        }
    }
    let h = dev.bytes(ss, ss as usize);
    if &h[..8] == b"EFI PART" {
        let (alt, lba, n, es) = (le64(&h, 32), le64(&h, 72), le32(&h, 80), le32(&h, 84));
        let arr = u128::from(n * es).div_ceil(ss128);
        x.push((u128::from(lba) * ss128, (u128::from(lba) + arr) * ss128));
        let last = u128::from(dev.size / ss - 1);
        if u128::from(alt) < last {
            x.push((
                u128::from(alt).saturating_sub(arr) * ss128,
                (u128::from(alt) + 1) * ss128,
            ));
        }
        if es >= 128 && n * es <= 1 << 20 {
            let entries = dev.bytes(lba.saturating_mul(ss), (n * es) as usize);
            for e in entries.chunks_exact(es as usize) {
                if e[..16].iter().any(|&b| b != 0) {
                    x.push((
                        u128::from(le64(e, 32)) * ss128,
                        (u128::from(le64(e, 40)) + 1) * ss128,
                    ));
                }
            }
        }
    }
    let pvd = dev.bytes(32768, 2048);
    if pvd[0] == 1 && &pvd[1..6] == b"CD001" {
        let iso = u128::from(le32(&pvd, 80) as u32)
            * u128::from(u16::from_le_bytes([pvd[128], pvd[129]]));
        x.push((0, iso));
    }
    x
}

struct Stats {
    cases: u64,
    refused_layout: u64,
    refused_plan: u64,
    planned: u64,
    sfdisk_checked: u64,
}

/// The image file `sfdisk` reads: the image as made, grown (sparse) to
/// the device's size; each case's first MiB written over it.
struct Sfdisk {
    path: std::path::PathBuf,
    file: std::fs::File,
    left: u64,
}

impl Sfdisk {
    fn new(path: std::path::PathBuf, img: &[u8], size: u64, left: u64) -> Sfdisk {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all(&img[..img.len().min(size as usize)])
            .unwrap();
        file.set_len(size).unwrap();
        Sfdisk { path, file, left }
    }

    /// sfdisk's reading of the case: the label ("dos", "gpt", or "" when it
    /// finds none) and the (start, size) of the primary (dos) or all (gpt)
    /// partitions that hold sectors, sorted.
    fn read(&mut self, dev: &Dev) -> (String, Vec<(u64, u64)>) {
        self.file.seek(SeekFrom::Start(0)).unwrap();
        self.file.write_all(dev.head).unwrap();
        self.file.flush().unwrap();
        let path = self.path.to_str().unwrap();
        let o = std::process::Command::new("sfdisk")
            .args(["--json", path])
            .output()
            .expect("running sfdisk (package fdisk)");
        if !o.status.success() {
            return (String::new(), vec![]);
        }
        // fdisk's notes ("Invalid flag ... of EBR") come before the JSON
        let out = String::from_utf8_lossy(&o.stdout);
        let json = &out[out.find('{').unwrap_or(0)..];
        let v: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("sfdisk --json printed {out:?}: {e}"));
        let t = &v["partitiontable"];
        let label = t["label"].as_str().unwrap_or("?").to_string();
        let mut parts: Vec<(u64, u64)> = t["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                let n: u32 = p["node"].as_str().unwrap()[path.len()..]
                    .trim_start_matches('p')
                    .parse()
                    .unwrap();
                label != "dos" || n <= 4
            })
            .map(|p| (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()))
            .filter(|&(_, n)| n > 0)
            .collect();
        parts.sort_unstable();
        (label, parts)
    }
}

fn check_case(dev: &Dev, ss: u64, st: &mut Stats, sfdisk: Option<&mut Sfdisk>) {
    st.cases += 1;
    // probing as find_persistence does: never panics, whatever the bytes
    let _ = superblock::probe(&mut dev.clone());
    let mut d = dev.clone();
    let l = match layout::read_layout(&mut d, dev.size, ss, vec![]) {
        // read, but refused by disk::stick: the kernel and libfdisk differ
        Ok(l) if l.disagreement.is_none() => l,
        _ => {
            st.refused_layout += 1;
            return;
        }
    };
    // accepted: libfdisk reads what we take the kernel to read
    if let Some(sf) = sfdisk.filter(|sf| sf.left > 0) {
        sf.left -= 1;
        st.sfdisk_checked += 1;
        let k = layout::kernel_reading(&l);
        let label = match k.table {
            TableKind::Mbr => "dos",
            TableKind::Gpt => "gpt",
            TableKind::None => "",
        };
        assert_eq!(
            sf.read(dev),
            (label.to_string(), k.extents()),
            "sfdisk --json reads another table than the kernel reading ({k}) of an accepted layout"
        );
    }
    for (_, start, len) in l.table_entries() {
        let mut w = superblock::Window::new(&mut d, start, len);
        let _ = superblock::probe(&mut w);
    }
    let _ = partplan::plan_delete(&l, 1);
    let opts = PlanOptions::default();
    let p = match partplan::plan(&l, &opts) {
        Ok(p) => p,
        Err(_) => {
            st.refused_plan += 1;
            return;
        }
    };
    st.planned += 1;
    let (start, end) = (
        u128::from(p.start),
        u128::from(p.start) + u128::from(p.size),
    );
    assert!(
        end <= u128::from(dev.size),
        "partition beyond the device: {p:?}"
    );
    assert!(
        p.size >= opts.min_free,
        "partition below min_free: {}",
        p.size
    );
    for (s, e) in described(dev, ss) {
        assert!(
            e <= start || s >= end,
            "partition {start}..{end} overlaps {s}..{e} that the bytes describe"
        );
    }
    // writes: the table area (the first 32 KiB, or the primary GPT array
    // wherever its header puts it), or after the new partition (GPT backup)
    let h = dev.bytes(ss, ss as usize);
    let array = if &h[..8] == b"EFI PART" {
        let lba = u128::from(le64(&h, 72)) * u128::from(ss);
        (
            lba,
            lba + u128::from(le32(&h, 80)) * u128::from(le32(&h, 84)),
        )
    } else {
        (0, 0)
    };
    let protected: Vec<(u128, u128)> = described(dev, ss)
        .into_iter()
        .filter(|&(s, e)| (s, e) != (array.0, array.1.next_multiple_of(u128::from(ss))))
        .map(|(s, e)| (s.max(32768), e))
        .filter(|(s, e)| e > s)
        .collect();
    for w in &p.writes {
        let (ws, we) = (
            u128::from(w.offset),
            u128::from(w.offset) + w.data.len() as u128,
        );
        assert!(we <= u128::from(dev.size));
        let in_array = ws >= array.0 && we <= array.1.next_multiple_of(u128::from(ss));
        assert!(
            we <= 32768 || in_array || ws >= end,
            "write '{}' at {ws}..{we} outside the table area",
            w.what
        );
        for &(s, e) in &protected {
            assert!(
                we <= s || ws >= e,
                "write '{}' at {ws}..{we} overlaps data at {s}..{e}; the bytes describe {:?}; the layout saw ISO {:?}, GPT array at LBA {:?}",
                w.what,
                described(dev, ss),
                l.iso,
                l.gpt.as_ref().map(|g| (g.entries_lba, g.num_entries))
            );
        }
    }
    // apply, read back, plan again
    let mut after = dev.clone();
    table::apply(&mut after, &p.writes).unwrap();
    let mut a2 = after.clone();
    let l2 = layout::read_layout(&mut a2, dev.size, ss, vec![])
        .unwrap_or_else(|e| panic!("the table no longer reads after the plan: {e:#}"));
    assert_eq!(
        l2.disagreement, None,
        "after the plan the kernel and libfdisk read the tables differently"
    );
    assert_eq!(l2.table, p.table);
    assert!(
        l2.table_entries().contains(&(p.number, p.start, p.size)),
        "entry {} not found after applying: {:?}",
        p.number,
        l2.table_entries()
    );
    if l2.table == TableKind::Gpt {
        assert!(
            l2.gpt.as_ref().unwrap().valid(),
            "GPT checksums wrong after the plan"
        );
    }
    if let Ok(p2) = partplan::plan(&l2, &opts) {
        assert!(
            p2.start >= p.start + p.size,
            "a second plan overlaps the first: {p2:?}"
        );
    }
}

#[test]
fn hostile_layouts_never_misplan() {
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let sfdisk_cases: u64 = std::env::var("FUZZ_SFDISK_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let d = tmpdir("fuzz");
    let mut total = Stats {
        cases: 0,
        refused_layout: 0,
        refused_plan: 0,
        planned: 0,
        sfdisk_checked: 0,
    };
    for (layout_name, ss) in [
        ("archiso", 512),
        ("archiso-uefi", 512),
        ("grub", 512),
        ("userpart", 512),
        ("gpt4k", 4096),
    ] {
        let img = std::fs::read(image(layout_name, &d, None)).unwrap();
        let iso = img.len() as u64;
        for size in [iso, iso + 200 * MIB, 8 * GIB, 3 << 40] {
            let size = size / ss * ss;
            let mut st = Stats {
                cases: 0,
                refused_layout: 0,
                refused_plan: 0,
                planned: 0,
                sfdisk_checked: 0,
            };
            // sfdisk reads an image file with 512-byte sectors only
            let mut sf = (ss == 512)
                .then(|| Sfdisk::new(d.join("sfdisk.img"), &img, size, sfdisk_cases + 1));
            // the unmutated image plans (when there is room) and checks out
            let clean = Dev {
                head: &img,
                base: &img,
                size,
                ss,
                written: HashMap::new(),
                pos: 0,
            };
            check_case(&clean, ss, &mut st, sf.as_mut());
            let mut r = Rng(0x9E37_79B9_7F4A_7C15 ^ size ^ u64::from(layout_name.len() as u32));
            let mut buf = img[..img.len().min(1 << 20)].to_vec();
            let head = buf.len();
            for _ in 0..cases {
                buf.copy_from_slice(&img[..head]);
                mutate(&mut buf, &mut r, size, ss);
                let dev = Dev {
                    head: &buf,
                    base: &img,
                    size,
                    ss,
                    written: HashMap::new(),
                    pos: 0,
                };
                check_case(&dev, ss, &mut st, sf.as_mut());
            }
            eprintln!(
                "{layout_name:>12} {size:>14} bytes: {} cases, {} layouts refused, {} plans refused, {} planned and checked, {} read by sfdisk too",
                st.cases, st.refused_layout, st.refused_plan, st.planned, st.sfdisk_checked
            );
            if size > iso + 100 * MIB && size < 2 << 40 {
                assert!(
                    st.planned > 0,
                    "{layout_name}: no case was planned: the checks ran on nothing"
                );
            }
            total.cases += st.cases;
            total.refused_layout += st.refused_layout;
            total.refused_plan += st.refused_plan;
            total.planned += st.planned;
            total.sfdisk_checked += st.sfdisk_checked;
        }
    }
    eprintln!(
        "total: {} cases, {} layouts refused, {} plans refused, {} planned and checked, {} read by sfdisk too",
        total.cases, total.refused_layout, total.refused_plan, total.planned, total.sfdisk_checked
    );
    let _ = std::fs::remove_file(d.join("sfdisk.img"));
    assert!(total.sfdisk_checked > 0, "sfdisk checked no case");
    assert!(
        total.refused_layout > 0,
        "no mutation was refused: the mutator is not reaching the parser"
    );
}
