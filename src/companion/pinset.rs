//! The pinned set: carries out `heat::plan` with `pin::Pin`, within a byte
//! budget that gives way to the rest of the system first.
//!
//! - Unpins come before pins, so the pinned bytes never exceed the budget
//!   in between; pins go hottest first and stop at the budget.
//! - A file that cannot be pinned (gone, not a regular file, `mlock`
//!   refused under the memlock limit or memory pressure) is counted and
//!   skipped: fewer pins, never an abort.
//! - `refresh` finds pins whose path now names other content (a rename
//!   over it, a rewrite): the old pages are released and the new content
//!   pinned in their place.
//! - `effective_budget`: the configured budget, never more than a quarter
//!   of `MemAvailable`, halved while memory pressure (PSI "some", 10 s
//!   average) is above 10%; `shrink_to` unpins the coldest until within.

use crate::companion::heat::{FileId, PinPlan};
use crate::companion::pin::Pin;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct PinSet {
    pins: BTreeMap<FileId, Pin>,
    /// Pins that failed since the daemon started, and the last reason.
    pub failures: u64,
    pub last_failure: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub pinned: usize,
    pub unpinned: usize,
    pub failed: usize,
    /// The files that failed (gone from their path, not lockable): the
    /// caller forgets them, to learn their path anew at the next open.
    pub failed_ids: Vec<FileId>,
}

impl PinSet {
    pub fn len(&self) -> usize {
        self.pins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.pins.values().map(|p| p.size).sum()
    }

    pub fn ids(&self) -> HashSet<FileId> {
        self.pins.keys().copied().collect()
    }

    pub fn get(&self, id: FileId) -> Option<&Pin> {
        self.pins.get(&id)
    }

    fn fail(&mut self, why: String) {
        log::debug!("not pinned: {why}");
        self.failures += 1;
        self.last_failure = Some(why);
    }

    /// Pin `path` if it fits in `budget` with what is pinned; the pin's id
    /// is the file's identity now (it may differ from what was planned when
    /// the file was replaced since).
    fn pin_path(&mut self, path: &Path, budget: u64) -> Option<FileId> {
        // the size checked before anything is mapped: a file grown since
        // the plan (by its owner, on purpose) never locks past the budget
        match Pin::new_within(path, budget.saturating_sub(self.bytes())) {
            Ok(Some(p)) => {
                let id = p.id;
                // the same file under a second name: one pin is enough
                self.pins.entry(id).or_insert(p);
                Some(id)
            }
            Ok(None) => None, // grew past the budget since it was planned
            Err(e) => {
                self.fail(format!("{e:#}"));
                None
            }
        }
    }

    /// Carry out `plan`: unpin first (the pages released), then pin the
    /// hottest first while the pinned bytes stay within `budget`.
    /// `path_of` names each planned file (the heat tracker's path).
    pub fn apply(
        &mut self,
        plan: &PinPlan,
        path_of: impl Fn(FileId) -> Option<PathBuf>,
        budget: u64,
    ) -> Applied {
        let mut a = Applied::default();
        for id in &plan.unpin {
            if self.pins.remove(id).is_some() {
                a.unpinned += 1;
            }
        }
        for id in &plan.pin {
            if self.pins.contains_key(id) {
                continue;
            }
            let Some(path) = path_of(*id) else {
                continue;
            };
            let failures = self.failures;
            match self.pin_path(&path, budget) {
                Some(_) => a.pinned += 1,
                None if self.failures > failures => {
                    a.failed += 1;
                    a.failed_ids.push(*id);
                }
                None => {}
            }
        }
        a
    }

    /// Pins whose path now names other content (replaced by a rename,
    /// rewritten): each old pin is released and the path pinned again as
    /// its new content when that fits `budget`. Returns (old id, new id)
    /// for each, so the caller can carry the heat over.
    pub fn refresh(&mut self, budget: u64) -> Vec<(FileId, Option<FileId>)> {
        let stale: Vec<(FileId, PathBuf)> = self
            .pins
            .iter()
            .filter(|(_, p)| !p.current())
            .map(|(id, p)| (*id, p.path.clone()))
            .collect();
        let mut out = vec![];
        for (old, path) in stale {
            self.pins.remove(&old);
            let new = match crate::companion::pin::stat_nofollow(&path) {
                Ok(m) if m.is_file() && m.len() > 0 => self.pin_path(&path, budget),
                _ => None, // gone or emptied: nothing to pin
            };
            out.push((old, new));
        }
        out
    }

    /// Unpin until the pinned bytes are within `budget`: files missing
    /// from `hottest_first` (no heat left) go first, then the coldest.
    pub fn shrink_to(&mut self, budget: u64, hottest_first: &[FileId]) -> usize {
        let rank = |id: &FileId| {
            hottest_first
                .iter()
                .position(|h| h == id)
                .unwrap_or(usize::MAX)
        };
        let mut order: Vec<FileId> = self.pins.keys().copied().collect();
        order.sort_by_key(|id| std::cmp::Reverse(rank(id)));
        let mut n = 0;
        for id in order {
            if self.bytes() <= budget {
                break;
            }
            self.pins.remove(&id);
            n += 1;
        }
        n
    }

    /// The pins, by file identity.
    pub fn iter(&self) -> impl Iterator<Item = (&FileId, &Pin)> {
        self.pins.iter()
    }
}

/// PSI "some" 10 s average above which the budget is halved (percent of
/// time some task waited for memory).
pub const PRESSURE_HIGH: f64 = 10.0;

/// The budget in force: `configured`, at most a quarter of what the
/// kernel says is available, and half of that while memory pressure is
/// high. Unknown figures (no PSI in the kernel) do not shrink it.
pub fn effective_budget(
    configured: u64,
    mem_available: Option<u64>,
    psi_some_avg10: Option<f64>,
) -> u64 {
    let mut b = configured;
    if let Some(avail) = mem_available {
        b = b.min(avail / 4);
    }
    if psi_some_avg10.is_some_and(|p| p > PRESSURE_HIGH) {
        b /= 2;
    }
    b
}

/// `MemAvailable` from /proc/meminfo text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// The "some" line's `avg10` from /proc/pressure/memory text, in percent.
pub fn parse_psi(text: &str) -> Option<f64> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    let v: f64 = some
        .split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()?;
    v.is_finite().then_some(v)
}

/// `MemAvailable` and memory PSI now (either may be unknown).
pub fn pressure() -> (Option<u64>, Option<f64>) {
    (
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t)),
        std::fs::read_to_string("/proc/pressure/memory")
            .ok()
            .and_then(|t| parse_psi(&t)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_gives_way_to_available_memory_and_pressure() {
        const M: u64 = 1 << 20;
        assert_eq!(effective_budget(512 * M, None, None), 512 * M);
        assert_eq!(
            effective_budget(512 * M, Some(4096 * M), Some(0.0)),
            512 * M
        );
        // a quarter of what is available at most
        assert_eq!(effective_budget(512 * M, Some(1024 * M), None), 256 * M);
        // halved under pressure
        assert_eq!(
            effective_budget(512 * M, Some(4096 * M), Some(25.5)),
            256 * M
        );
        assert_eq!(
            effective_budget(512 * M, Some(1024 * M), Some(11.0)),
            128 * M
        );
        assert_eq!(effective_budget(512 * M, Some(0), Some(90.0)), 0);
    }

    #[test]
    fn meminfo_and_psi_are_read_and_anything_malformed_is_unknown() {
        let mi = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(parse_meminfo(mi), Some(20_480_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots\n"), None);
        assert_eq!(
            parse_meminfo("MemAvailable: 99999999999999999999 kB\n"),
            None
        );
        let psi = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=9\n";
        assert_eq!(parse_psi(psi), Some(12.5));
        assert_eq!(parse_psi("full avg10=1.00\n"), None);
        assert_eq!(parse_psi("some avg10=NaN avg60=0\n"), None);
        assert_eq!(parse_psi("some avg60=1.0\n"), None);
    }
}
