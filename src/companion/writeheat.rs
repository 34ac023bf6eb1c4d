//! Write heat per directory (pure), and the RAM-tier suggestions drawn
//! from it: a directory where files are closed after writing many times a
//! half-life is written to the stick that often; in the RAM tier those
//! writes would cost the stick one sync instead.
//!
//! Fed by `hot` (`FAN_CLOSE_WRITE`); the suggestions are shown by
//! `status` and saved on the partition, where a boot with
//! `[tier] adopt_suggested = true` takes them (`boot::tier::adopt`).

use crate::boot::tier::{self, Suggested};
use crate::settings::config::Settings;
use std::collections::HashMap;

/// Writes (closes after writing) within a half-life from which a
/// directory is suggested.
pub const SUGGEST_HEAT: f64 = 30.0;
/// Suggestions at most.
pub const SUGGESTED_MAX: usize = 8;

#[derive(Debug, Clone)]
pub struct DirHeat {
    half_life: f64,
    cap: usize,
    dirs: HashMap<String, (f64, f64)>,
    /// Writes counted since the start.
    pub writes: u64,
}

impl DirHeat {
    pub fn new(half_life: f64, cap: usize) -> DirHeat {
        assert!(half_life > 0.0 && cap > 0);
        DirHeat {
            half_life,
            cap,
            dirs: HashMap::new(),
            writes: 0,
        }
    }

    fn decayed(&self, (h, at): (f64, f64), now: f64) -> f64 {
        h * (-(now - at).max(0.0) / self.half_life).exp2()
    }

    pub fn heat(&self, dir: &str, now: f64) -> f64 {
        self.dirs.get(dir).map_or(0.0, |e| self.decayed(*e, now))
    }

    /// Heat carried from the last boot.
    pub fn seed(&mut self, dir: &str, heat: f64, now: f64) {
        if self.dirs.len() < self.cap {
            let h = self.heat(dir, now) + heat.max(0.0);
            self.dirs.insert(dir.to_string(), (h, now));
        }
    }

    /// The `n` hottest directories at `now` (to carry to the next boot).
    pub fn top(&self, n: usize, now: f64) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .dirs
            .iter()
            .map(|(d, e)| (d.clone(), self.decayed(*e, now)))
            .filter(|(_, h)| *h >= 0.01)
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// A file in `dir` was closed after writing at `now`.
    pub fn touch(&mut self, dir: &str, now: f64) {
        let h = self.heat(dir, now) + 1.0;
        self.dirs.insert(dir.to_string(), (h, now));
        self.writes += 1;
        if self.dirs.len() > self.cap {
            let mut v: Vec<(f64, String)> = self
                .dirs
                .iter()
                .map(|(d, e)| (self.decayed(*e, now), d.clone()))
                .collect();
            v.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (_, d) in v.into_iter().skip((self.cap * 9 / 10).max(1)) {
                self.dirs.remove(&d);
            }
        }
    }

    /// The directories worth a RAM tier, hottest first: written at least
    /// `SUGGEST_HEAT` times a half-life, under a persistent directory (a
    /// tier needs one), not in a tier already nor holding one, not kept
    /// out of the tier (`tier.exclude`), and not below another suggestion.
    /// `ram_bytes` is left 0 for the caller to measure.
    pub fn suggest(&self, now: f64, s: &Settings, tiers: &[String]) -> Vec<Suggested> {
        let overlaps = |a: &str, b: &str| {
            a == b || tier::strictly_under(a, b).is_some() || tier::strictly_under(b, a).is_some()
        };
        let mut v: Vec<(String, f64)> = self
            .dirs
            .iter()
            .map(|(d, e)| (d.clone(), self.decayed(*e, now)))
            .filter(|(d, h)| {
                *h >= SUGGEST_HEAT
                    && tier::home_of(d, s).is_ok()
                    && !tiers.iter().chain(&s.tier.exclude).any(|t| overlaps(d, t))
            })
            .collect();
        // parents first, so a child of a suggested dir is dropped
        v.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.0.cmp(&b.0)));
        let mut out: Vec<(String, f64)> = vec![];
        for (d, h) in v {
            if !out
                .iter()
                .any(|(p, _)| tier::strictly_under(&d, p).is_some())
            {
                out.push((d, h));
            }
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(SUGGESTED_MAX);
        out.into_iter()
            .map(|(dir, h)| Suggested {
                dir,
                writes: (h * 10.0).round() / 10.0,
                ram_bytes: 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_written_dirs_under_persistent_dirs_are_suggested() {
        let s = Settings::default();
        let mut h = DirHeat::new(600.0, 100);
        for _ in 0..40 {
            h.touch("/var/lib/app", 0.0);
            h.touch("/var/lib/app/sub", 0.0); // below a suggestion
            h.touch("/tmp", 0.0); // not persistent
            h.touch("/var/log/x", 0.0); // in a tier
            h.touch("/var/log/journal", 0.0); // excluded
            h.touch("/var", 0.0); // holds a tier
        }
        for _ in 0..50 {
            h.touch("/home/u/.config/app", 0.0);
        }
        for _ in 0..10 {
            h.touch("/etc/cold", 0.0);
        }
        let v = h.suggest(0.0, &s, &["/var/log".to_string()]);
        let dirs: Vec<_> = v.iter().map(|x| x.dir.as_str()).collect();
        assert_eq!(dirs, ["/home/u/.config/app", "/var/lib/app"]);
        assert_eq!(v[0].writes, 50.0);
        // a half-life later the heat has halved: under the threshold
        assert!(
            h.suggest(600.0, &s, &[])
                .iter()
                .all(|x| x.dir != "/var/lib/app")
        );
        // carried to the next boot
        let mut next = DirHeat::new(600.0, 100);
        for (d, x) in h.top(100, 0.0) {
            next.seed(&d, x, 0.0);
        }
        assert_eq!(next.suggest(0.0, &s, &["/var/log".to_string()]), v);
    }

    #[test]
    fn the_tracker_is_bounded() {
        let mut h = DirHeat::new(600.0, 10);
        for i in 0..100 {
            h.touch(&format!("/d{i}"), i as f64);
        }
        assert!(h.dirs.len() <= 10);
        assert!(h.heat("/d99", 99.0) > 0.0, "the newest is kept");
    }
}
