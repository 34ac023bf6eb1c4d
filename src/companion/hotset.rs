//! The hot set kept across boots (pure): which files were hot, with their
//! identity and the ranges that were in RAM, saved on the partition by the
//! daemon and read ahead at the next boot (`companion::prefetch`); and
//! whether that read-ahead helped, boot after boot.
//!
//! The file (`companion/hotset.json` on the partition) is input from disk:
//! `parse` takes it as untrusted (a size cap, a cap on entries and ranges,
//! each entry checked: an absolute path without `..`, ranges inside the
//! size with checked arithmetic; a bad entry is dropped, not the set).
//!
//! Whether it helped: at the first open of a hot-set file in a boot, the
//! daemon times a read of that file's hot ranges (`Measure`). A boot that
//! read ahead is compared with the last boot that did not; with none yet,
//! with what the read-ahead itself took to read the same files from the
//! stick (what the first use would have waited for). It helped when it
//! saved at least half of that time and 20 ms in all. Two boots in a row
//! without help turn it off (as systemd-readahead and ureadahead were
//! retired when disks became fast); it is tried again `RETRY_AFTER` boots
//! later.

use serde::{Deserialize, Serialize};

/// Where on the partition (relative to its mount point).
pub const HOTSET_FILE: &str = "companion/hotset.json";
pub const VERSION: u32 = 1;
/// The most of the file that is read.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
pub const MAX_FILES: usize = 20_000;
pub const MAX_RANGES: usize = 64;
pub const MAX_DIRS: usize = 2000;
const MAX_PATH: usize = 4096;
/// Resident runs closer than this are one range (the kernel's readahead
/// would read the gap anyway).
const GAP: u64 = 128 << 10;
/// Boots the read-ahead stays off once it did not help.
pub const RETRY_AFTER: u32 = 20;
/// Boots in a row without help that turn it off.
pub const MISSES_OFF: u32 = 2;
/// It must save at least this much time in a boot to count as a help.
pub const MIN_SAVED_US: u64 = 20_000;

/// One hot file: its path, its identity when saved, and its hot ranges
/// (offset, length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HotFile {
    pub path: String,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub heat: f64,
    pub ranges: Vec<(u64, u64)>,
}

impl HotFile {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().fold(0u64, |a, r| a.saturating_add(r.1))
    }

    /// Why this entry (read from disk) cannot be used.
    fn invalid(&self) -> Option<&'static str> {
        let p = &self.path;
        if !p.starts_with('/') || p.len() > MAX_PATH || p.contains('\0') {
            return Some("not an absolute path");
        }
        if p.split('/').any(|c| c == ".." || c == ".") {
            return Some("a path with . or ..");
        }
        if !self.heat.is_finite() || self.heat < 0.0 {
            return Some("a bad heat");
        }
        if self.ranges.is_empty() || self.ranges.len() > MAX_RANGES {
            return Some("no ranges or too many");
        }
        let mut end = 0u64;
        for &(off, len) in &self.ranges {
            match off.checked_add(len) {
                Some(e) if len > 0 && off >= end && e <= self.size => end = e,
                _ => return Some("a range outside the file or out of order"),
            }
        }
        None
    }
}

/// What the first uses of hot-set files cost in one boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// Whether this boot read the hot set ahead.
    pub prefetched: bool,
    /// Hot-set files used (opened) this boot, counted at their first use.
    pub files: u64,
    pub bytes: u64,
    /// Of `bytes`, what was in RAM at the first use.
    pub resident_bytes: u64,
    /// The time a read of their hot ranges took at their first use.
    pub first_use_us: u64,
    /// For a boot that read ahead: what the read-ahead took to read the
    /// same files from the stick.
    pub cold_us: u64,
    /// The read-ahead: files and bytes read, its time, and whether it was
    /// cut short by its time budget.
    pub read_files: u64,
    pub read_bytes: u64,
    pub read_us: u64,
    pub skipped: u64,
    pub cut: bool,
}

/// The read-ahead's record across boots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The boot this set was last saved in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// That boot's measure so far.
    pub last: Measure,
    /// The last boot that did not read ahead and used hot-set files.
    pub without: Option<Measure>,
    /// The verdict on the last boot that read ahead.
    pub verdict: Option<String>,
    /// Boots in a row that read ahead without help.
    pub misses: u32,
    /// Why it is off, and for how many more boots.
    pub off: Option<String>,
    pub off_boots: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HotSet {
    pub version: u32,
    pub saved_unix_ms: u64,
    pub files: Vec<HotFile>,
    pub history: History,
    /// Write heat per directory (`writeheat`), carried to the next boot.
    #[serde(default)]
    pub dirs: Vec<(String, f64)>,
}

/// Parse the saved set (untrusted). Returns it and how many entries were
/// dropped as malformed.
pub fn parse(bytes: &[u8]) -> Result<(HotSet, usize), String> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{} bytes: larger than the cap", bytes.len()));
    }
    let mut h: HotSet = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if h.version != VERSION {
        return Err(format!(
            "version {} (this build reads {VERSION})",
            h.version
        ));
    }
    let n = h.files.len();
    h.files.truncate(MAX_FILES);
    h.files.retain(|f| f.invalid().is_none());
    let d = h.dirs.len();
    h.dirs.truncate(MAX_DIRS);
    h.dirs.retain(|(p, heat)| {
        p.starts_with('/')
            && p.len() <= MAX_PATH
            && !p.contains('\0')
            && !p.split('/').any(|c| c == ".." || c == ".")
            && heat.is_finite()
            && *heat >= 0.0
    });
    let n = n + d - h.dirs.len();
    let dropped = n - h.files.len();
    Ok((h, dropped))
}

/// The hot ranges of a file from which of its pages are resident (one
/// flag a page of `page` bytes): runs closer than `GAP` merged, then the
/// closest merged until at most `MAX_RANGES`. Nothing resident: the whole
/// file (it was opened, and what it read is not known).
pub fn ranges_from_residency(resident: &[bool], page: u64, size: u64) -> Vec<(u64, u64)> {
    let mut b = Ranges::default();
    let mut i = 0usize;
    while i < resident.len() {
        if !resident[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < resident.len() && resident[i] {
            i += 1;
        }
        let off = start as u64 * page;
        let end = (i as u64 * page).min(size);
        if off >= end {
            break;
        }
        b.push(off, end);
    }
    b.finish(size)
}

/// The hot ranges built as the resident runs come, in file order, in
/// bounded memory whatever the file's size: at most `MAX_RANGES + 1` runs
/// are held (the pair with the smallest gap merged as soon as there are
/// more, which keeps the same ranges as merging at the end).
#[derive(Debug, Default, Clone)]
pub struct Ranges {
    runs: Vec<(u64, u64)>,
}

impl Ranges {
    /// A resident run `[off, end)`, after those pushed before.
    pub fn push(&mut self, off: u64, end: u64) {
        if end <= off {
            return;
        }
        match self.runs.last_mut() {
            Some(last) if off.saturating_sub(last.0 + last.1) <= GAP => {
                last.1 = end.max(last.0 + last.1) - last.0
            }
            _ => self.runs.push((off, end - off)),
        }
        if self.runs.len() > MAX_RANGES {
            // merge the pair with the smallest gap
            let r = &mut self.runs;
            let k = (1..r.len())
                .min_by_key(|&k| r[k].0 - (r[k - 1].0 + r[k - 1].1))
                .unwrap_or(1);
            let end = r[k].0 + r[k].1;
            r[k - 1].1 = end - r[k - 1].0;
            r.remove(k);
        }
    }

    /// The ranges of a file of `size` bytes (nothing resident: all of it).
    pub fn finish(mut self, size: u64) -> Vec<(u64, u64)> {
        if self.runs.is_empty() && size > 0 {
            self.runs.push((0, size));
        }
        self.runs
    }
}

/// What to save: the hottest first, as many as fit in `budget` bytes and
/// `max_files`.
pub fn choose(mut hottest: Vec<HotFile>, max_files: usize, budget: u64) -> Vec<HotFile> {
    hottest.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.path.cmp(&b.path)));
    let mut used = 0u64;
    let mut out = vec![];
    for f in hottest {
        if out.len() >= max_files {
            break;
        }
        let b = f.bytes();
        if used.saturating_add(b) > budget || f.invalid().is_some() {
            continue;
        }
        used += b;
        out.push(f);
    }
    out
}

/// The read-ahead's order (indexes into `files`): the hottest that fit
/// the budget, then in stick order: files whose filesystem gives no
/// physical place (the squashfs in the ISO, at the start of the stick) by
/// path, taken as close to the order mksquashfs writes them (not checked
/// against the image's tables), then the rest by
/// their first block on the partition (`physical`, from FIEMAP).
pub fn order(files: &[HotFile], physical: &[Option<u64>], budget: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..files.len()).collect();
    idx.sort_by(|&a, &b| files[b].heat.total_cmp(&files[a].heat));
    let mut used = 0u64;
    idx.retain(|&i| {
        let b = files[i].bytes();
        let fits = used.saturating_add(b) <= budget;
        if fits {
            used += b;
        }
        fits
    });
    idx.sort_by(|&a, &b| {
        let key = |i: usize| (physical.get(i).copied().flatten(), &files[i].path);
        let (pa, na) = key(a);
        let (pb, nb) = key(b);
        // None (no physical place) sorts first
        pa.cmp(&pb).then(na.cmp(nb))
    });
    idx
}

/// The verdict on a boot that read ahead, against the last boot without
/// (or, with none, the read-ahead's own cold reads of the same files).
/// `None`: nothing of the set was used, so nothing to judge.
pub fn judge(m: &Measure, without: Option<&Measure>) -> Option<(bool, String)> {
    if !m.prefetched || m.files == 0 {
        return None;
    }
    let mean = |us: u64, n: u64| us as f64 / n.max(1) as f64;
    let now = mean(m.first_use_us, m.files);
    let (base, what) = match without {
        Some(w) if w.files > 0 => (mean(w.first_use_us, w.files), "the last boot without"),
        _ => (mean(m.cold_us, m.files), "reading them from the stick"),
    };
    let saved = ((base - now) * m.files as f64).max(0.0);
    let helped = base > 0.0 && now <= base / 2.0 && saved >= MIN_SAVED_US as f64;
    let text = format!(
        "first use of {} files took {:.1} ms each, {:.1} ms with {what}: {}",
        m.files,
        now / 1000.0,
        base / 1000.0,
        if helped {
            format!("helped ({:.0} ms saved)", saved / 1000.0)
        } else {
            "did not help".to_string()
        }
    );
    Some((helped, text))
}

impl History {
    /// A new boot (`boot_id`) begins: the last boot's measure is judged
    /// (or kept as the boot without), and whether this boot reads ahead
    /// is decided. A daemon restarted in the same boot changes nothing.
    /// Returns whether to read ahead, or why not.
    pub fn begin(&mut self, boot_id: &str) -> Result<(), String> {
        if self.boot_id != boot_id {
            let last = std::mem::take(&mut self.last);
            if !last.prefetched && last.files > 0 {
                self.without = Some(last.clone());
            }
            if let Some((helped, text)) = judge(&last, self.without.as_ref()) {
                self.misses = if helped {
                    0
                } else {
                    self.misses.saturating_add(1)
                };
                self.verdict = Some(text.clone());
                if self.misses >= MISSES_OFF && self.off.is_none() {
                    self.off = Some(format!(
                        "did not help in {} boots in a row ({text})",
                        self.misses
                    ));
                    self.off_boots = 0;
                }
            }
            if self.off.is_some() {
                self.off_boots = self.off_boots.saturating_add(1);
                if self.off_boots > RETRY_AFTER {
                    self.off = None;
                    self.misses = 0;
                    self.off_boots = 0;
                }
            }
            self.boot_id = boot_id.to_string();
        }
        match &self.off {
            Some(why) => Err(format!(
                "off: {why}; tried again in {} boots",
                (RETRY_AFTER + 1).saturating_sub(self.off_boots)
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, heat: f64, size: u64) -> HotFile {
        HotFile {
            path: path.into(),
            ino: 1,
            size,
            mtime_ns: 0,
            heat,
            ranges: vec![(0, size)],
        }
    }

    #[test]
    fn ranges_merge_close_runs_and_stay_inside_the_file() {
        let p = 4096;
        // pages 0-1 and 3 (gap of one page: merged), then 100 alone
        let mut r = vec![false; 101];
        r[0] = true;
        r[1] = true;
        r[3] = true;
        r[100] = true;
        assert_eq!(
            ranges_from_residency(&r, p, 100 * p + 10),
            vec![(0, 4 * p), (100 * p, 10)]
        );
        assert_eq!(ranges_from_residency(&[false; 3], p, 9000), vec![(0, 9000)]);
        // 200 runs far apart: merged down to the cap
        let mut r = vec![false; 200 * 64];
        for i in 0..200 {
            r[i * 64] = true;
        }
        let v = ranges_from_residency(&r, p, 200 * 64 * p);
        assert_eq!(v.len(), MAX_RANGES);
        let f = HotFile {
            ranges: v,
            ..file("/x", 1.0, 200 * 64 * p)
        };
        assert_eq!(f.invalid(), None);
    }

    #[test]
    fn choose_keeps_the_hottest_within_budget_and_count() {
        let v = vec![
            file("/a", 1.0, 50),
            file("/b", 5.0, 300),
            file("/c", 3.0, 100),
            file("/d", 2.0, 100),
        ];
        let c = choose(v.clone(), 10, 460);
        let names: Vec<_> = c.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["/b", "/c", "/a"], "/d does not fit after /c");
        assert_eq!(choose(v, 2, 1000).len(), 2);
    }

    #[test]
    fn order_puts_the_squashfs_first_by_path_then_the_partition_by_block() {
        let v = vec![
            file("/usr/z", 1.0, 10),
            file("/home/a", 2.0, 10),
            file("/usr/a", 3.0, 10),
            file("/home/b", 4.0, 10),
            file("/big", 0.5, 1000),
        ];
        let phys = [None, Some(900), None, Some(100), None];
        assert_eq!(order(&v, &phys, 100), vec![2, 0, 3, 1]);
    }

    #[test]
    fn parse_drops_bad_entries_and_refuses_other_versions() {
        let mut h = HotSet {
            version: VERSION,
            files: vec![file("/ok", 1.0, 10)],
            ..Default::default()
        };
        for bad in [
            HotFile {
                ranges: vec![(5, 10)],
                ..file("/outside", 1.0, 10)
            },
            HotFile {
                ranges: vec![(u64::MAX, 2)],
                ..file("/overflow", 1.0, 10)
            },
            HotFile {
                ranges: vec![(4, 2), (0, 2)],
                ..file("/unordered", 1.0, 10)
            },
            file("relative", 1.0, 10),
            file("/a/../etc/shadow", 1.0, 10),
            HotFile {
                heat: -1.0,
                ..file("/negative", 1.0, 10)
            },
        ] {
            h.files.push(bad);
        }
        h.dirs = vec![
            ("/var/lib/app".into(), 40.0),
            ("/var/../x".into(), 40.0),
            ("/var/y".into(), -1.0),
        ];
        let (p, dropped) = parse(&serde_json::to_vec(&h).unwrap()).unwrap();
        assert_eq!(dropped, 8);
        assert_eq!(p.dirs, vec![("/var/lib/app".to_string(), 40.0)]);
        assert_eq!(p.files, vec![file("/ok", 1.0, 10)]);
        h.version = 2;
        assert!(parse(&serde_json::to_vec(&h).unwrap()).is_err());
        assert!(parse(b"{").is_err());
    }

    #[test]
    fn parse_never_panics_on_mangled_bytes() {
        let h = HotSet {
            version: VERSION,
            files: vec![file("/usr/lib/a", 2.5, 4096), file("/home/u/b", 1.0, 9)],
            ..Default::default()
        };
        let good = serde_json::to_vec(&h).unwrap();
        // every single-byte change and every truncation
        let mut seed = 0x2545F4914F6CDD1Du64;
        for i in 0..good.len() {
            assert!(parse(&good[..i]).is_err() || i == good.len());
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let mut b = good.clone();
                b[i] = seed as u8;
                if let Ok((p, _)) = parse(&b) {
                    assert!(p.files.iter().all(|f| f.invalid().is_none()));
                }
            }
        }
    }

    fn measure(prefetched: bool, files: u64, first_use_us: u64, cold_us: u64) -> Measure {
        Measure {
            prefetched,
            files,
            first_use_us,
            cold_us,
            ..Default::default()
        }
    }

    #[test]
    fn judged_against_the_boot_without_else_the_cold_reads() {
        // 10 files at 50 ms each without; 1 ms each with: helped
        let w = measure(false, 10, 500_000, 0);
        let (h, t) = judge(&measure(true, 10, 10_000, 0), Some(&w)).unwrap();
        assert!(h, "{t}");
        assert!(t.contains("the last boot without"), "{t}");
        // a fast disk: 0.2 ms each without, 0.05 with: under 20 ms saved
        let w = measure(false, 10, 2_000, 0);
        assert!(!judge(&measure(true, 10, 500, 0), Some(&w)).unwrap().0);
        // evicted before use: as slow as without
        let w = measure(false, 10, 500_000, 0);
        assert!(!judge(&measure(true, 10, 400_000, 0), Some(&w)).unwrap().0);
        // no boot without: the read-ahead's own reads
        let (h, t) = judge(&measure(true, 4, 400, 200_000), None).unwrap();
        assert!(h && t.contains("from the stick"), "{t}");
        // nothing used, or not read ahead: nothing to judge
        assert!(judge(&measure(true, 0, 0, 0), None).is_none());
        assert!(judge(&measure(false, 5, 9, 9), None).is_none());
    }

    #[test]
    fn two_boots_without_help_turn_it_off_until_the_retry() {
        let mut h = History::default();
        assert!(h.begin("b1").is_ok());
        h.last = measure(false, 10, 500_000, 0);
        assert!(h.begin("b2").is_ok());
        assert!(h.without.is_some());
        // a restart of the daemon in the same boot changes nothing
        h.last = measure(true, 10, 450_000, 0);
        assert!(h.begin("b2").is_ok());
        assert_eq!(h.misses, 0);
        assert!(h.begin("b3").is_ok(), "one miss is not enough");
        assert_eq!(h.misses, 1);
        h.last = measure(true, 10, 450_000, 0);
        let why = h.begin("b4").unwrap_err();
        assert!(why.contains("did not help in 2 boots"), "{why}");
        for i in 0..RETRY_AFTER - 1 {
            assert!(h.begin(&format!("c{i}")).is_err());
        }
        assert!(h.begin("again").is_ok(), "tried again");
        assert_eq!(h.misses, 0);
        // a boot that helped resets the count
        h.last = measure(true, 10, 450_000, 0);
        h.begin("d1").unwrap();
        h.last = measure(true, 10, 1_000, 0);
        h.begin("d2").unwrap();
        assert_eq!(h.misses, 0);
        assert!(h.verdict.as_deref().unwrap().contains("helped"));
    }
}
