//! File heat (pure): per file a moving average of accesses that halves
//! every `half_life`, in bounded memory, and the pin decision it drives.
//!
//! A file's heat is `sum of 2^(-(now - t_i) / half_life)` over its accesses
//! `t_i`, kept as one number and the time it was last brought up to date
//! (so an access costs O(1)). The tracker holds at most `cap` files; when
//! it is over, the coldest are evicted down to 90% of `cap` at once (the
//! scan is paid once per `cap / 10` new files).
//!
//! `plan` decides which files are pinned, with hysteresis: a file is
//! pinned when its heat reaches `pin_high`, stays pinned while it is at or
//! above `pin_low`, and the pinned bytes stay within the budget, the
//! hottest first (a pinned file loses its place only to a hotter one).
//!
//! Fed by the daemon (`companion::pinning`) with the opens `hot` sees.

use std::collections::{HashMap, HashSet};

/// A file's identity: device and inode (a path can be replaced under it).
pub type FileId = (u64, u64);

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    /// Heat as of `at` (seconds on the tracker's clock).
    pub heat: f64,
    pub at: f64,
}

#[derive(Debug, Clone)]
pub struct Heat {
    half_life: f64,
    cap: usize,
    files: HashMap<FileId, Entry>,
}

impl Heat {
    /// `half_life` in seconds (> 0), `cap` files at most (> 0).
    pub fn new(half_life: f64, cap: usize) -> Heat {
        assert!(half_life > 0.0 && cap > 0);
        Heat {
            half_life,
            cap,
            files: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn decayed(&self, e: &Entry, now: f64) -> f64 {
        let dt = (now - e.at).max(0.0);
        e.heat * (-dt / self.half_life).exp2()
    }

    /// The heat of `id` at `now` (0 for a file not tracked).
    pub fn heat(&self, id: FileId, now: f64) -> f64 {
        self.files.get(&id).map_or(0.0, |e| self.decayed(e, now))
    }

    /// One access of `id` (at `path`, `size` bytes) at `now`.
    pub fn touch(&mut self, id: FileId, path: &str, size: u64, now: f64) {
        let h = self.heat(id, now);
        let e = self.files.entry(id).or_insert_with(|| Entry {
            path: String::new(),
            size: 0,
            heat: 0.0,
            at: now,
        });
        if e.path != path {
            e.path = path.to_string();
        }
        e.size = size;
        e.heat = h + 1.0;
        e.at = now;
        if self.files.len() > self.cap {
            self.evict(now);
        }
    }

    /// One access of a file already tracked (its path as last seen): the
    /// caller need not look the path up. False when `id` is not tracked.
    pub fn touch_known(&mut self, id: FileId, size: u64, now: f64) -> bool {
        let h = self.heat(id, now);
        match self.files.get_mut(&id) {
            Some(e) => {
                e.size = size;
                e.heat = h + 1.0;
                e.at = now;
                true
            }
            None => false,
        }
    }

    /// A file replaced under its path (a rename over it, a rewrite): its
    /// heat goes on under the new identity, so the new content is kept
    /// pinned as the old one was.
    pub fn carry(&mut self, old: FileId, new: FileId) {
        if let Some(e) = self.files.remove(&old) {
            self.files.insert(new, e);
        }
    }

    /// A file known hot from the last boot (the hot set): tracked with
    /// that heat added, as if its accesses had been seen.
    pub fn seed(&mut self, id: FileId, path: &str, size: u64, heat: f64, now: f64) {
        let h = self.heat(id, now);
        self.files.insert(
            id,
            Entry {
                path: path.to_string(),
                size,
                heat: h + heat.max(0.0),
                at: now,
            },
        );
        if self.files.len() > self.cap {
            self.evict(now);
        }
    }

    /// Forget a file (removed, or replaced: a new inode starts cold).
    pub fn forget(&mut self, id: FileId) {
        self.files.remove(&id);
    }

    fn evict(&mut self, now: f64) {
        let keep = (self.cap * 9 / 10).max(1);
        let mut by_heat: Vec<(f64, FileId)> = self
            .files
            .iter()
            .map(|(id, e)| (self.decayed(e, now), *id))
            .collect();
        by_heat.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, id) in by_heat.into_iter().skip(keep) {
            self.files.remove(&id);
        }
    }

    /// What is known of a tracked file (its path and size as last seen).
    pub fn entry(&self, id: FileId) -> Option<&Entry> {
        self.files.get(&id)
    }

    /// The `n` hottest files at `now`, hottest first.
    pub fn hottest(&self, n: usize, now: f64) -> Vec<(FileId, &Entry, f64)> {
        let mut v: Vec<_> = self
            .files
            .iter()
            .map(|(id, e)| (*id, e, self.decayed(e, now)))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// What to pin and unpin now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PinPlan {
    /// Hottest first.
    pub pin: Vec<FileId>,
    pub unpin: Vec<FileId>,
    /// The bytes pinned after the plan is carried out.
    pub bytes: u64,
}

/// Thresholds and budget for `plan`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PinRules {
    pub pin_high: f64,
    pub pin_low: f64,
    pub budget: u64,
}

/// Which files are pinned after this step, given those pinned now.
pub fn plan(h: &Heat, pinned: &HashSet<FileId>, r: &PinRules, now: f64) -> PinPlan {
    let mut cands: Vec<(f64, FileId, u64)> = h
        .files
        .iter()
        .filter_map(|(id, e)| {
            let heat = h.decayed(e, now);
            let bar = if pinned.contains(id) {
                r.pin_low
            } else {
                r.pin_high
            };
            (heat >= bar).then_some((heat, *id, e.size))
        })
        .collect();
    cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut keep = HashSet::new();
    let mut bytes = 0u64;
    let mut pin = Vec::new();
    for (_, id, size) in cands {
        let Some(next) = bytes.checked_add(size).filter(|b| *b <= r.budget) else {
            continue; // a smaller, colder file may still fit
        };
        bytes = next;
        keep.insert(id);
        if !pinned.contains(&id) {
            pin.push(id);
        }
    }
    let mut unpin: Vec<FileId> = pinned
        .iter()
        .filter(|id| !keep.contains(id))
        .copied()
        .collect();
    unpin.sort();
    PinPlan { pin, unpin, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_halves_every_half_life_and_adds_up() {
        let mut h = Heat::new(60.0, 100);
        h.touch((1, 1), "/a", 10, 0.0);
        assert!((h.heat((1, 1), 0.0) - 1.0).abs() < 1e-9);
        assert!((h.heat((1, 1), 60.0) - 0.5).abs() < 1e-9);
        assert!((h.heat((1, 1), 120.0) - 0.25).abs() < 1e-9);
        h.touch((1, 1), "/a", 10, 60.0);
        assert!((h.heat((1, 1), 60.0) - 1.5).abs() < 1e-9);
        assert_eq!(h.heat((9, 9), 0.0), 0.0);
        // a clock that goes back does not heat anything up
        assert!((h.heat((1, 1), 0.0) - 1.5).abs() < 1e-9);
    }

    #[test]
    fn a_known_file_is_touched_without_its_path() {
        let mut h = Heat::new(60.0, 100);
        assert!(
            !h.touch_known((1, 1), 10, 0.0),
            "an unknown file is not made up"
        );
        assert!(h.is_empty());
        h.touch((1, 1), "/a", 10, 0.0);
        assert!(h.touch_known((1, 1), 12, 0.0));
        assert!((h.heat((1, 1), 0.0) - 2.0).abs() < 1e-9);
        let e = h.entry((1, 1)).unwrap();
        assert_eq!((e.path.as_str(), e.size), ("/a", 12));
        // the same sum as touch, decayed the same way
        assert!(h.touch_known((1, 1), 12, 60.0));
        assert!((h.heat((1, 1), 60.0) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_replaced_file_keeps_its_heat_under_its_new_identity() {
        let mut h = Heat::new(60.0, 100);
        for _ in 0..5 {
            h.touch((1, 1), "/a", 10, 0.0);
        }
        h.carry((1, 1), (1, 2));
        assert_eq!(h.heat((1, 1), 0.0), 0.0);
        assert!((h.heat((1, 2), 0.0) - 5.0).abs() < 1e-9);
        assert_eq!(h.entry((1, 2)).unwrap().path, "/a");
        // a pinned file replaced stays pinned through the next plan
        let r = PinRules {
            pin_high: 4.0,
            pin_low: 1.0,
            budget: 100,
        };
        let p = plan(&h, &HashSet::from([(1, 2)]), &r, 0.0);
        assert!(p.unpin.is_empty() && p.pin.is_empty(), "{p:?}");
        h.carry((9, 9), (9, 10));
        assert_eq!(h.len(), 1, "nothing made up for an unknown file");
    }

    #[test]
    fn memory_is_bounded_and_the_coldest_go_first() {
        let mut h = Heat::new(10.0, 100);
        for i in 0..100u64 {
            for _ in 0..(i % 5 + 1) {
                h.touch((0, i), &format!("/f{i}"), 1, 0.0);
            }
        }
        assert_eq!(h.len(), 100);
        h.touch((0, 1000), "/new", 1, 0.0);
        assert_eq!(h.len(), 90, "evicted down to 90% of the cap");
        // 80 files had 2 accesses or more: all kept; of the 21 with one
        // (the new one included), 10
        let kept = |accesses: &dyn Fn(u64) -> bool| {
            (0..100u64)
                .filter(|i| accesses(i % 5 + 1) && h.heat((0, *i), 0.0) > 0.0)
                .count()
        };
        assert_eq!(kept(&|a| a >= 2), 80, "the coldest went first");
        assert_eq!(
            kept(&|a| a == 1) + usize::from(h.heat((0, 1000), 0.0) > 0.0),
            10
        );
        for _ in 0..10_000u64 {
            let i = rand_like(h.len() as u64);
            h.touch((1, i), "/x", 1, 1.0);
            assert!(h.len() <= 100);
        }
    }

    fn rand_like(seed: u64) -> u64 {
        seed.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            >> 40
    }

    fn rules(budget: u64) -> PinRules {
        PinRules {
            pin_high: 4.0,
            pin_low: 2.0,
            budget,
        }
    }

    #[test]
    fn hysteresis_pins_high_and_unpins_low() {
        let mut h = Heat::new(60.0, 100);
        for _ in 0..5 {
            h.touch((0, 1), "/hot", 100, 0.0);
        }
        for _ in 0..3 {
            h.touch((0, 2), "/warm", 100, 0.0);
        }
        let none = HashSet::new();
        let p = plan(&h, &none, &rules(1000), 0.0);
        assert_eq!(p.pin, vec![(0, 1)], "only the file above pin_high");
        assert_eq!(p.bytes, 100);
        // a minute later /hot is at 2.5: below pin_high, above pin_low
        let pinned: HashSet<_> = [(0, 1)].into();
        let p = plan(&h, &pinned, &rules(1000), 60.0);
        assert!(p.pin.is_empty() && p.unpin.is_empty(), "{p:?}");
        // two minutes later 1.25: unpinned
        let p = plan(&h, &pinned, &rules(1000), 120.0);
        assert_eq!(p.unpin, vec![(0, 1)]);
        assert_eq!(p.bytes, 0);
    }

    #[test]
    fn the_budget_keeps_the_hottest() {
        let mut h = Heat::new(60.0, 100);
        for (ino, n, size) in [(1, 10, 600), (2, 8, 600), (3, 6, 300), (4, 5, 100)] {
            for _ in 0..n {
                h.touch((0, ino), "/f", size, 0.0);
            }
        }
        // pinned now: 2 and 3; the budget fits 1000 bytes
        let pinned: HashSet<_> = [(0, 2), (0, 3)].into();
        let p = plan(&h, &pinned, &rules(1000), 0.0);
        // 1 (600) is hotter than 2: 1 in, 2 out (600 more would not fit),
        // 3 (300) stays, 4 (100) fits in what is left
        assert_eq!(p.pin, vec![(0, 1), (0, 4)]);
        assert_eq!(p.unpin, vec![(0, 2)]);
        assert_eq!(p.bytes, 1000);
        // a file larger than the budget is never pinned
        let p = plan(&h, &HashSet::new(), &rules(500), 0.0);
        assert_eq!(p.pin, vec![(0, 3), (0, 4)]);
    }

    #[test]
    fn a_replaced_file_starts_cold() {
        let mut h = Heat::new(60.0, 100);
        for _ in 0..9 {
            h.touch((0, 1), "/etc/x", 10, 0.0);
        }
        h.forget((0, 1));
        h.touch((0, 2), "/etc/x", 10, 0.0);
        assert_eq!(h.hottest(5, 0.0).len(), 1);
        assert_eq!(h.hottest(5, 0.0)[0].0, (0, 2));
        assert!((h.hottest(5, 0.0)[0].2 - 1.0).abs() < 1e-9);
    }
}
