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

use super::heat::{self, FileId, Heat, PinRules};
use super::hot::{Hot, Sink};
use super::hotset::{self, HotFile, HotSet, Measure};
use super::pinset::{self, PinSet};
use super::prefetch::{self, FirstUse, SharedRef};
use super::stats::{PinStats, now_ms};
use super::writeheat::DirHeat;
use crate::boot::state::State;
use crate::boot::tier::{self, Suggested};
use crate::settings::config::{PinSettings, Settings};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

pub const PINNED_FILE: &str = "pinned.json";
/// The hot set's state for `status`, mode 0600: the tier suggestions name
/// users' dirs, so only root sees it.
pub const HOT_FILE: &str = "hot.json";
/// Hot-set files saved at most (the hottest).
const SAVED_MAX: usize = 4096;
/// Bytes the first-use probe reads in a boot at most.
const PROBE_CAP: u64 = 256 << 20;

/// `hot.json`: the read-ahead this boot, the verdict on the last one that
/// read ahead, and the RAM-tier suggestions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HotState {
    /// What the read-ahead does this boot: `reading`, `done`, `not
    /// reading: <why>`, or `no hot set yet`.
    pub prefetch: String,
    pub measure: Measure,
    pub verdict: Option<String>,
    pub saved_files: u64,
    pub saved_bytes: u64,
    pub saved_unix_ms: u64,
    pub writes: u64,
    pub suggestions: Vec<Suggested>,
    pub adopt_suggested: bool,
}

impl HotState {
    pub fn load(run: &Path) -> Option<HotState> {
        crate::util::fsutil::read_nofollow(&run.join(HOT_FILE), 1 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}
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
    dirs: DirHeat,
    set: PinSet,
    cfg: PinSettings,
    settings: Settings,
    tiers: Vec<String>,
    budget: u64,
    t0: Instant,
    next_plan: Instant,
    next_save: Instant,
    run: PathBuf,
    /// The partition, where the hot set is kept (none in RAM mode).
    pm: Option<PathBuf>,
    /// The set saved last boot and the read-ahead's record.
    saved: HotSet,
    files: Arc<Vec<HotFile>>,
    shared: SharedRef,
    /// Hot-set files not used yet this boot, and what reading them ahead took.
    watch: HashMap<FileId, usize>,
    cold: HashMap<usize, Option<u64>>,
    first: Vec<FileId>,
    probe: Option<mpsc::Sender<FirstUse>>,
    /// The read-ahead reads this boot (else the pass only looks up).
    reading: bool,
    state: HotState,
}

impl Pinning {
    pub fn start(st: &State, s: &Settings, run: &Path) -> Result<Pinning> {
        let cfg = &s.pin;
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
        let pm = st
            .partition
            .as_ref()
            // a write-protected stick keeps no hot set: it cannot be saved
            .filter(|_| st.mode == "persistent" && !st.read_only)
            .map(|p| PathBuf::from(&p.mountpoint));
        let mut p = Pinning {
            hot,
            heat: Heat::new(cfg.half_life as f64, cfg.tracked),
            dirs: DirHeat::new(cfg.half_life as f64, 2000),
            set: PinSet::default(),
            cfg: cfg.clone(),
            settings: s.clone(),
            tiers: st.tiers.iter().map(|t| t.dir.clone()).collect(),
            budget,
            t0: Instant::now(),
            next_plan: Instant::now() + Duration::from_secs(cfg.every),
            next_save: Instant::now() + Duration::from_secs(cfg.save_every),
            run: run.to_path_buf(),
            pm,
            saved: HotSet {
                version: hotset::VERSION,
                ..Default::default()
            },
            files: Arc::new(vec![]),
            shared: Default::default(),
            watch: HashMap::new(),
            cold: HashMap::new(),
            first: vec![],
            probe: None,
            reading: false,
            state: HotState {
                adopt_suggested: s.tier.adopt_suggested,
                ..Default::default()
            },
        };
        p.start_prefetch(ram);
        p.publish_hot();
        Ok(p)
    }

    /// Load the hot set saved last boot and start the read-ahead (or, when
    /// it is not to read, the look-up that times first uses all the same).
    fn start_prefetch(&mut self, ram: u64) {
        let Some(pm) = self.pm.clone() else {
            self.state.prefetch =
                "not reading: RAM mode (no partition to keep a hot set on)".into();
            return;
        };
        let path = pm.join(hotset::HOTSET_FILE);
        match crate::util::fsutil::read_nofollow(&path, hotset::MAX_FILE_BYTES) {
            Ok(b) => match hotset::parse(&b) {
                Ok((h, dropped)) => {
                    if dropped > 0 {
                        log::warn!(
                            "hot set {}: {dropped} malformed entries dropped",
                            path.display()
                        );
                    }
                    self.saved = h;
                }
                Err(e) => log::warn!("hot set {}: {e}; starting a new one", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("hot set {}: {e}; starting a new one", path.display()),
        }
        for (d, h) in std::mem::take(&mut self.saved.dirs) {
            self.dirs.seed(&d, h, 0.0);
        }
        if !self.cfg.prefetch {
            self.state.prefetch =
                "not reading: off (mados.prefetch=off or [pin] prefetch = false)".into();
            return;
        }
        let read = self.saved.history.begin(&prefetch::boot_id());
        if self.saved.files.is_empty() {
            self.state.prefetch =
                "no hot set yet (it is saved at stop and every save_every seconds)".into();
            return;
        }
        self.state.verdict = self.saved.history.verdict.clone();
        self.state.prefetch = match &read {
            Ok(()) => "reading".into(),
            Err(why) => format!("not reading: {why}"),
        };
        self.reading = read.is_ok();
        self.files = Arc::new(std::mem::take(&mut self.saved.files));
        log::info!(
            "hot set: {} files saved last boot; {}",
            self.files.len(),
            self.state.prefetch
        );
        prefetch::start_pass(
            self.files.clone(),
            self.reading,
            self.cfg.prefetch_bytes(ram),
            Duration::from_secs(self.cfg.prefetch_time),
            self.shared.clone(),
        );
        self.probe = Some(prefetch::start_probe(self.shared.clone(), PROBE_CAP));
    }

    /// The hot-set files the pass found in place: watched for their first
    /// use (unless opened already), and their heat carried over.
    fn take_found(&mut self, now: f64) {
        let (found, done) = {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut s.found), s.done)
        };
        for (id, i, cold) in found {
            let f = &self.files[i];
            // opened before the pass reached it, or (reading) not read
            // before its time ran out: its first use is not a measure
            if self.heat.entry(id).is_none() && (!self.reading || cold.is_some()) {
                self.watch.insert(id, i);
                self.cold.insert(i, cold);
            }
            self.heat.seed(id, &f.path, f.size, f.heat, now);
        }
        if done && self.reading && self.state.prefetch != "done" {
            self.state.prefetch = "done".into();
            let m = &self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .measure;
            log::info!(
                "read-ahead: {} files, {} bytes in {} ms{}; {} changed since, skipped",
                m.read_files,
                m.read_bytes,
                m.read_us / 1000,
                if m.cut { " (cut by prefetch_time)" } else { "" },
                m.skipped
            );
        }
    }

    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The opens and writes queued since the last call.
    fn drain(&mut self, now: f64) {
        let mut sink = Sink {
            heat: &mut self.heat,
            dirs: &mut self.dirs,
            watch: &self.watch,
            first: &mut self.first,
        };
        self.hot.drain(&mut sink, now);
    }

    /// Called about once a second: count the opens; decide when due.
    pub fn tick(&mut self, out: &mut PinStats) {
        let now = self.now();
        self.drain(now);
        for id in std::mem::take(&mut self.first) {
            if let (Some(i), Some(tx)) = (self.watch.remove(&id), &self.probe) {
                let f = &self.files[i];
                let cold = self.cold.get(&i).copied().flatten();
                let _ = tx.send((f.path.clone(), f.ranges.clone(), cold));
            }
        }
        if self.probe.is_some() {
            self.take_found(now);
        }
        if Instant::now() >= self.next_save {
            self.save(now);
            self.next_save = Instant::now() + Duration::from_secs(self.cfg.save_every);
        }
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
        let names = |v: &[Suggested]| v.iter().map(|g| g.dir.clone()).collect::<Vec<_>>();
        if names(&self.dirs.suggest(now, &self.settings, &self.tiers))
            != names(&self.state.suggestions)
        {
            self.state.suggestions = self.suggestions(now);
        }
        self.publish_hot();
    }

    /// The RAM-tier suggestions, with what each dir holds.
    fn suggestions(&self, now: f64) -> Vec<Suggested> {
        let mut v = self.dirs.suggest(now, &self.settings, &self.tiers);
        for g in &mut v {
            g.ram_bytes = dir_bytes(Path::new(&g.dir), 100_000);
        }
        v
    }

    /// Save now (at stop, after the final sync).
    pub fn save_now(&mut self) {
        let now = self.now();
        self.drain(now);
        self.save(now);
    }

    /// This boot's measure as the passes left it.
    fn measure(&self) -> Measure {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .measure
            .clone()
    }

    /// `hot.json` for `status`.
    fn publish_hot(&mut self) {
        self.state.measure = self.measure();
        self.state.writes = self.dirs.writes;
        if let Ok(b) = serde_json::to_vec_pretty(&self.state) {
            let _ = crate::util::fsutil::write_atomic_mode(&self.run.join(HOT_FILE), &b, 0o600);
        }
    }

    /// Keep the hot set (the hottest files, their identity and the ranges
    /// of them in RAM now) and this boot's measure on the partition, and
    /// the RAM-tier suggestions; at stop and every `save_every` seconds.
    pub fn save(&mut self, now: f64) {
        let Some(pm) = self.pm.clone() else { return };
        let ram = crate::boot::mem_total();
        let hot: Vec<HotFile> = self
            .heat
            .hottest(SAVED_MAX, now)
            .into_iter()
            .filter_map(|(_, e, h)| prefetch::capture(&e.path, h))
            .collect();
        let files = hotset::choose(hot, SAVED_MAX, self.cfg.prefetch_bytes(ram));
        let mut h = HotSet {
            version: hotset::VERSION,
            saved_unix_ms: now_ms(),
            files,
            history: self.saved.history.clone(),
            dirs: self.dirs.top(hotset::MAX_DIRS / 4, now),
        };
        h.history.last = self.measure();
        let dir = pm.join("companion");
        let sug = self.suggestions(now);
        let r = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| serde_json::to_vec(&h).map_err(anyhow::Error::from))
            .and_then(|b| {
                // mode 0600: the paths are of every user's files
                crate::util::fsutil::write_atomic_mode(&pm.join(hotset::HOTSET_FILE), &b, 0o600)
            })
            .and_then(|()| {
                let b = serde_json::to_vec_pretty(&sug)?;
                // users' dirs: root only
                crate::util::fsutil::write_atomic_mode(&pm.join(tier::SUGGESTED_FILE), &b, 0o600)
            });
        match r {
            Ok(()) => {
                self.state.saved_files = h.files.len() as u64;
                self.state.saved_bytes = h.files.iter().map(HotFile::bytes).sum();
                self.state.saved_unix_ms = h.saved_unix_ms;
                log::info!(
                    "hot set saved: {} files, {} bytes to read ahead at the next boot",
                    self.state.saved_files,
                    self.state.saved_bytes
                );
            }
            Err(e) => log::warn!("saving the hot set in {}: {e:#}", dir.display()),
        }
        self.state.suggestions = sug;
        self.publish_hot();
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

/// The bytes of the regular files under `dir`, counting at most `max`
/// entries (a suggestion's size, not an audit).
fn dir_bytes(dir: &Path, max: usize) -> u64 {
    use crate::util::safefs::{Dir, Kind, kind};
    // by fd (`util::safefs`): a subdir a user swaps for a symlink is not
    // followed, a mount inside is not entered
    let Ok(root) = Dir::open(dir) else { return 0 };
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(d) = root.dir(&rel) else { continue };
        let Ok(names) = d.list() else { continue };
        for n in names {
            seen += 1;
            if seen > max {
                return total;
            }
            match d.lstat(&n) {
                Ok(Some(st)) if kind(&st) == Kind::Dir => stack.push(rel.join(&n)),
                Ok(Some(st)) if kind(&st) == Kind::File => {
                    total = total.saturating_add(u64::try_from(st.st_size).unwrap_or(0))
                }
                _ => {}
            }
        }
    }
    total
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
