//! The daemon's pinning loop: opens (`hot`) heat files (`heat`), and every
//! `[pin] every` seconds the hottest are pinned within the budget in force
//! (`pinset`), files replaced since are pinned again as their new content,
//! and the pinned set is published: counts in the stats block, the files
//! themselves in `/run/mados-persistence/pinned.json` for `status` (mode
//! 0600: they are any user's files, so only root sees which).
//!
//! What is marked: the live root and the overlays `boot` layered (whole
//! filesystems: on Debian's 6.1 only overlays report opens), and the bind
//! dirs as mounts (their filesystem is the partition, which also holds the
//! overlays' uppers).

use super::heat::{self, Heat, PinRules};
use super::hot::Hot;
use super::pinset::{self, PinSet};
use super::stats::{PinStats, now_ms};
use crate::boot::state::State;
use crate::settings::config::PinSettings;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const PINNED_FILE: &str = "pinned.json";
/// Files listed in `pinned.json` at most (the hottest).
const LISTED: usize = 20;

/// One pinned file as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinnedFile {
    pub path: String,
    pub bytes: u64,
    /// Its heat at the last decision (about: opens within a half-life).
    pub heat: f64,
}

/// `pinned.json`: the pinned files, hottest first (at most `LISTED`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PinnedList {
    pub files: Vec<PinnedFile>,
}

impl PinnedList {
    /// Read by `status`; missing or malformed: empty.
    pub fn load(run: &Path) -> PinnedList {
        crate::util::fsutil::read_nofollow(&run.join(PINNED_FILE), 1 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// The mounts to mark, from what `boot` recorded: (live path, whole
/// filesystem?).
pub fn marks(st: &State) -> Vec<(PathBuf, bool)> {
    let root = st.root.trim_end_matches('/');
    let live = |t: &Path| -> PathBuf {
        let t = t.to_string_lossy();
        match t.strip_prefix(root) {
            Some("") => PathBuf::from("/"),
            Some(rest) if !root.is_empty() && rest.starts_with('/') => PathBuf::from(rest),
            _ => PathBuf::from(t.as_ref()),
        }
    };
    let mut v = vec![(PathBuf::from("/"), true)];
    for m in &st.mounts {
        let whole = match m.fstype.as_str() {
            "overlay" => true,
            "bind" => false,
            _ => continue,
        };
        let p = live(&m.target);
        if !v.iter().any(|(q, _)| *q == p) {
            v.push((p, whole));
        }
    }
    v
}

pub struct Pinning {
    hot: Hot,
    heat: Heat,
    set: PinSet,
    cfg: PinSettings,
    budget: u64,
    t0: Instant,
    next_plan: Instant,
    run: PathBuf,
}

impl Pinning {
    pub fn start(st: &State, cfg: &PinSettings, run: &Path) -> Result<Pinning> {
        let ram = crate::boot::mem_total();
        let budget = cfg.budget_bytes(ram);
        let limit = super::pin::raise_memlock(budget).unwrap_or(0);
        if limit < budget {
            log::info!(
                "pinning: RLIMIT_MEMLOCK is {limit} bytes, below the budget of {budget} (without CAP_IPC_LOCK fewer files are pinned)"
            );
        }
        let m = marks(st);
        let refs: Vec<(&Path, bool)> = m.iter().map(|(p, w)| (p.as_path(), *w)).collect();
        let (hot, failed) = Hot::new(&refs)?;
        for f in failed {
            log::info!("pinning: not watching {f}");
        }
        Ok(Pinning {
            hot,
            heat: Heat::new(cfg.half_life as f64, cfg.tracked),
            set: PinSet::default(),
            cfg: cfg.clone(),
            budget,
            t0: Instant::now(),
            next_plan: Instant::now() + Duration::from_secs(cfg.every),
            run: run.to_path_buf(),
        })
    }

    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Called about once a second: count the opens; decide when due.
    pub fn tick(&mut self, out: &mut PinStats) {
        let now = self.now();
        self.hot.drain(&mut self.heat, now);
        if Instant::now() >= self.next_plan {
            self.decide(now, out);
            self.next_plan = Instant::now() + Duration::from_secs(self.cfg.every);
        }
        out.enabled = true;
        out.tracked_files = self.heat.len() as u64;
        out.open_events = self.hot.events;
        out.overflows = self.hot.overflows;
    }

    fn decide(&mut self, now: f64, out: &mut PinStats) {
        let (avail, psi) = pinset::pressure();
        let budget = pinset::effective_budget(self.budget, avail, psi);
        // replaced or rewritten since pinned: the new content in its place,
        // with the old one's heat (else the plan below would let it go)
        for (old, new) in self.set.refresh(budget) {
            match new {
                Some(new) => self.heat.carry(old, new),
                None => self.heat.forget(old),
            }
        }
        if self.set.bytes() > budget {
            let hottest: Vec<_> = self
                .heat
                .hottest(self.heat.len(), now)
                .into_iter()
                .map(|(id, _, _)| id)
                .collect();
            let n = self.set.shrink_to(budget, &hottest);
            log::info!(
                "pinning: the budget shrank to {budget} bytes (memory pressure); {n} files let go"
            );
        }
        let rules = PinRules {
            pin_high: self.cfg.pin_high,
            pin_low: self.cfg.pin_low,
            budget,
        };
        let plan = heat::plan(&self.heat, &self.set.ids(), &rules, now);
        let heat = &self.heat;
        let paths = |id| heat.entry(id).map(|e| PathBuf::from(&e.path));
        let a = self.set.apply(&plan, paths, budget);
        for id in &a.failed_ids {
            self.heat.forget(*id);
        }
        if a.pinned + a.unpinned + a.failed > 0 {
            log::info!(
                "pinning: {} pinned, {} let go, {} failed; {} files ({} bytes) of a {budget}-byte budget",
                a.pinned,
                a.unpinned,
                a.failed,
                self.set.len(),
                self.set.bytes()
            );
        }
        out.pinned_files = self.set.len() as u64;
        out.pinned_bytes = self.set.bytes();
        out.budget = budget;
        out.failures = self.set.failures;
        out.last_plan_unix_ms = now_ms();
        self.publish(now);
    }

    fn publish(&self, now: f64) {
        let mut files: Vec<PinnedFile> = self
            .set
            .iter()
            .map(|(id, p)| PinnedFile {
                path: p.path.display().to_string(),
                bytes: p.size,
                heat: (self.heat.heat(*id, now) * 100.0).round() / 100.0,
            })
            .collect();
        files.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.path.cmp(&b.path)));
        files.truncate(LISTED);
        // root only: the paths are of every user's files
        if let Ok(b) = serde_json::to_vec_pretty(&PinnedList { files }) {
            let _ = crate::util::fsutil::write_atomic_mode(&self.run.join(PINNED_FILE), &b, 0o600);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_root_and_the_layered_dirs_are_marked() {
        let st: State = serde_json::from_value(serde_json::json!({
            "version": 1,
            "mode": "persistent",
            "root": "/new_root",
            "cmdline": "",
            "mounts": [
                {"target": "/new_root/run/mados/persistence", "fstype": "ext4", "source": "/dev/sda3", "options": ""},
                {"target": "/new_root/etc", "fstype": "overlay", "source": "overlay", "options": ""},
                {"target": "/new_root/usr", "fstype": "overlay", "source": "overlay", "options": ""},
                {"target": "/new_root/home", "fstype": "bind", "source": "/x", "options": ""},
                {"target": "/new_root/tmp", "fstype": "tmpfs", "source": "tmpfs", "options": ""}
            ],
            "warnings": [],
            "timings": []
        }))
        .unwrap();
        assert_eq!(
            marks(&st),
            vec![
                (PathBuf::from("/"), true),
                (PathBuf::from("/etc"), true),
                (PathBuf::from("/usr"), true),
                (PathBuf::from("/home"), false),
            ]
        );
    }
}
