//! The stick's health in `status`: what it has written (in its life, this
//! boot, per day), what the RAM kept off it, what a power cut would lose
//! now, the faults it showed, and how full it is. `build` makes the
//! document from what was read (pure); `render` is its text (pure);
//! `gather` holds the thin readers (sysfs, the history on the partition,
//! a bounded walk of the persistent uppers when the partition is full).

use super::status::{FULL_PERCENT, Usage};
use crate::boot::state::{LastShutdown, State};
use crate::companion::health::{self, History};
use crate::companion::stats::Stats;
use crate::disk::sysfs::{DiskIo, Ext4Live};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What was read for the health (all optional: each reader may fail).
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// The ext4 counters of the mounted persistence filesystem.
    pub fs: Option<Ext4Live>,
    /// The boot disk's writes and I/O errors this boot.
    pub disk: Option<DiskIo>,
    /// The history on the partition (root's: None without root).
    pub history: Option<History>,
    /// The companion's last stats block and whether it runs.
    pub stats: Option<Stats>,
    pub daemon_running: bool,
    pub partition_usage: Option<Usage>,
    /// The largest dirs in the persistent uppers (read when full).
    pub largest: Vec<DirSize>,
    /// The reasons of tiers whose syncs fail now (`syncs.json`).
    pub sync_faults: Vec<String>,
    pub now_ms: u64,
    /// Not run as root: the history is not readable.
    pub not_root: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirSize {
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayBytes {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Writes {
    /// Bytes written to the persistence filesystem since mkfs (ext4
    /// `lifetime_write_kbytes`).
    pub fs_lifetime_bytes: Option<u64>,
    /// The same since this boot (against the counter read at boot, or
    /// since the mount).
    pub fs_boot_bytes: Option<u64>,
    /// The whole stick (all partitions), this boot.
    pub disk: Option<String>,
    pub disk_boot_bytes: Option<u64>,
    /// Per UTC day over the last 30 days, oldest first (the history plus
    /// what was written since its last save).
    pub days: Vec<DayBytes>,
    pub last_7_days_bytes: Option<u64>,
    pub last_30_days_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeptOff {
    /// Bytes seen written into the RAM tiers this boot.
    pub tier_written: u64,
    /// Bytes the syncs carried to the stick this boot.
    pub synced: u64,
    /// Written into the tiers, never carried: overwritten or deleted
    /// before a sync.
    pub tier_kept_off: u64,
    /// Bytes seen written to the tmpfs dirs (none of it reaches the stick).
    pub tmpfs_written: u64,
    /// Every tmpfs dir counted (false: the daemon could not watch one; its
    /// log names it).
    pub tmpfs_counted: bool,
    /// Both, and their ratio to what reached the stick (null: nothing
    /// reached it yet).
    pub kept_off: u64,
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AtRisk {
    /// The daemon published its counts this boot (else nothing below is
    /// known).
    pub known: bool,
    pub files: u64,
    pub bytes: u64,
    /// The oldest change not synced (Unix ms; null: none, or unknown).
    pub oldest_unix_ms: Option<u64>,
    /// The next sync at the latest (Unix ms; null: nothing to sync, or no
    /// daemon).
    pub next_sync_unix_ms: Option<u64>,
    pub daemon_running: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootRecord {
    pub started_unix_s: u64,
    pub fsck_code: Option<i32>,
    pub fsck: Option<String>,
    pub last_shutdown: Option<LastShutdown>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// ext4's error count now (null: not known).
    pub fs_errors: Option<u64>,
    /// The count the superblock held at boot, before e2fsck.
    pub fs_errors_at_boot: Option<u32>,
    pub first_error_unix_s: Option<u64>,
    pub last_error_unix_s: Option<u64>,
    /// The last boots, oldest first (this one included).
    pub boots: Vec<BootRecord>,
    pub last_shutdown: Option<LastShutdown>,
    /// I/O errors the kernel counted for the stick this boot (null: its
    /// bus keeps no count).
    pub io_errors: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Full {
    pub partition_percent: Option<u64>,
    pub tier_percent: Option<u64>,
    /// The largest dirs in the persistent uppers (when the partition is
    /// at 90% or more).
    pub largest: Vec<DirSize>,
}

/// The health part of the `--json` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub writes: Writes,
    /// Null: the daemon does not count (off, not running this boot, or an
    /// older release's).
    pub kept_off: Option<KeptOff>,
    /// Null: no RAM tier this boot.
    pub at_risk: Option<AtRisk>,
    pub faults: Faults,
    pub full: Full,
    /// Something says the stick is failing: back up now.
    pub failing: bool,
    /// The warning lines (failing, full), each saying what to do.
    pub warnings: Vec<String>,
    /// What is not shown, and why (not root).
    pub note: Option<String>,
    /// When this was read (Unix ms), for the ages shown.
    pub now_unix_ms: u64,
    /// The stick is write-protected: nothing of this boot is saved.
    pub read_only: bool,
}

/// `YYYY-MM-DD` of a day number since 1970-01-01 (proleptic Gregorian,
/// Howard Hinnant's `civil_from_days`).
pub fn date(days: u64) -> String {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn kib(k: u64) -> u64 {
    k.saturating_mul(1024)
}

/// An fsck exit code that says the filesystem had errors left (4 and up:
/// uncorrected, an operational error, …).
fn fsck_bad(code: i32) -> bool {
    code >= 4
}

/// An fsck that corrected errors (1, 2).
fn fsck_fixed(code: i32) -> bool {
    code & 3 != 0 && code < 4
}

/// The health document of a persistent boot (None in RAM mode or
/// without a partition).
pub fn build(st: &State, i: &Inputs) -> Option<Health> {
    let p = st.partition.as_ref().filter(|_| st.mode == "persistent")?;
    let today = i.now_ms / 86_400_000;
    // writes
    let fs_lifetime = i.fs.map(|f| kib(f.lifetime_write_kbytes));
    let fs_boot = match (i.fs, p.at_boot) {
        (Some(f), Some(b)) if f.lifetime_write_kbytes >= b.kbytes_written => {
            Some(kib(f.lifetime_write_kbytes - b.kbytes_written))
        }
        (Some(f), _) => f.session_write_kbytes.map(kib),
        _ => None,
    };
    let mut days: Vec<health::Day> = i
        .history
        .as_ref()
        .map(|h| h.days.clone())
        .unwrap_or_default();
    if let (Some(h), Some(f)) = (&i.history, i.fs) {
        // what was written since the history's last save, on today
        let since = f.lifetime_write_kbytes.saturating_sub(h.lifetime_kb);
        let t = u32::try_from(today).unwrap_or(u32::MAX);
        match days.last_mut() {
            Some(d) if d.day >= t => d.kbytes = d.kbytes.saturating_add(since),
            _ => days.push(health::Day {
                day: t,
                kbytes: since,
            }),
        }
    }
    let sum = |n: u64| {
        i.history.as_ref().map(|_| {
            days.iter()
                .filter(|d| u64::from(d.day) + n > today)
                .fold(0u64, |a, d| a.saturating_add(kib(d.kbytes)))
        })
    };
    let writes = Writes {
        fs_lifetime_bytes: fs_lifetime,
        fs_boot_bytes: fs_boot,
        disk: st
            .boot_device
            .as_ref()
            .map(|b| b.disk.clone())
            .filter(|_| i.disk.is_some()),
        disk_boot_bytes: i.disk.map(|d| d.bytes_written),
        last_7_days_bytes: sum(7),
        last_30_days_bytes: sum(30),
        days: days
            .iter()
            .filter(|d| u64::from(d.day) + 30 > today)
            .map(|d| DayBytes {
                day: date(u64::from(d.day)),
                bytes: kib(d.kbytes),
            })
            .collect(),
    };
    // kept off, at risk
    let s = i.stats.as_ref();
    let kept_off = s.filter(|s| s.health.tracking).map(|s| {
        let h = &s.health;
        let pending: u64 = s.tiers.iter().map(|t| t.dirty_bytes).sum();
        let tier_kept_off = health::kept_off(h.tier_written, h.synced, pending, 0);
        let kept = tier_kept_off.saturating_add(h.tmpfs_written);
        KeptOff {
            tier_written: h.tier_written,
            synced: h.synced,
            tier_kept_off,
            tmpfs_written: h.tmpfs_written,
            tmpfs_counted: !h.tmpfs_uncounted,
            kept_off: kept,
            ratio: (h.synced > 0).then(|| kept as f64 / h.synced as f64),
        }
    });
    let at_risk = (!st.tiers.is_empty() && !st.read_only).then(|| {
        let (files, bytes) = s.map_or((0, 0), |s| {
            s.tiers
                .iter()
                .fold((0, 0), |(f, b), t| (f + t.dirty_files, b + t.dirty_bytes))
        });
        AtRisk {
            known: s.is_some(),
            files,
            bytes,
            oldest_unix_ms: s
                .map(|s| s.health.oldest_dirty_unix_ms)
                .filter(|&o| o > 0 && files > 0),
            next_sync_unix_ms: s
                .map(|s| s.health.next_sync_unix_ms)
                .filter(|&n| n > 0 && i.daemon_running && files > 0),
            daemon_running: i.daemon_running,
        }
    });
    // faults
    let mut boots: Vec<BootRecord> = i
        .history
        .as_ref()
        .map(|h| {
            h.boots
                .iter()
                .map(|b| BootRecord {
                    started_unix_s: b.started_unix_s,
                    fsck_code: b.fsck_code,
                    fsck: b.fsck.clone(),
                    last_shutdown: b.last_shutdown,
                })
                .collect()
        })
        .unwrap_or_default();
    if boots.is_empty() {
        // no history (new, lost, or not root): this boot at least
        boots.push(BootRecord {
            started_unix_s: 0,
            fsck_code: p.fsck.as_ref().map(|f| f.code),
            fsck: p.fsck.as_ref().map(|f| f.summary.clone()),
            last_shutdown: p.last_shutdown,
        });
    }
    let faults = Faults {
        fs_errors: i.fs.and_then(|f| f.errors_count),
        fs_errors_at_boot: p.at_boot.map(|b| b.error_count),
        first_error_unix_s: i
            .fs
            .and_then(|f| f.first_error_unix_s)
            .filter(|&t| t > 0)
            .or(p.at_boot.map(|b| b.first_error_unix_s).filter(|&t| t > 0)),
        last_error_unix_s: i
            .fs
            .and_then(|f| f.last_error_unix_s)
            .filter(|&t| t > 0)
            .or(p.at_boot.map(|b| b.last_error_unix_s).filter(|&t| t > 0)),
        boots,
        last_shutdown: p.last_shutdown,
        io_errors: i.disk.and_then(|d| d.io_errors),
    };
    // failing?
    let mut why = vec![];
    let errors = faults
        .fs_errors
        .unwrap_or(0)
        .max(u64::from(faults.fs_errors_at_boot.unwrap_or(0)));
    if errors > 0 {
        why.push(format!(
            "the filesystem recorded {errors} errors{}",
            faults
                .last_error_unix_s
                .map(|t| format!(" (the last on {})", date(t / 86_400)))
                .unwrap_or_default()
        ));
    }
    if let Some(n) = faults.io_errors.filter(|&n| n > 0) {
        why.push(format!(
            "the kernel counted {n} I/O errors on {} this boot",
            writes.disk.as_deref().unwrap_or("the stick")
        ));
    }
    let bad = faults
        .boots
        .iter()
        .filter(|b| b.fsck_code.is_some_and(fsck_bad))
        .count();
    let fixed = faults
        .boots
        .iter()
        .filter(|b| b.fsck_code.is_some_and(fsck_fixed))
        .count();
    if bad > 0 {
        why.push(format!(
            "e2fsck left errors uncorrected at {bad} of the last {} boots",
            faults.boots.len()
        ));
    }
    if fixed >= 2 {
        why.push(format!(
            "e2fsck corrected errors at {fixed} of the last {} boots",
            faults.boots.len()
        ));
    }
    if i.sync_faults.iter().any(|r| r.contains("EIO")) {
        why.push("a sync failed with an I/O error".into());
    }
    let failing = !why.is_empty();
    let mut warnings = vec![];
    if failing {
        warnings.push(format!(
            "the stick may be failing: {}. Back up now: copy /home and anything else you need to another disk, \
             then replace the stick (the log has the kernel's messages: `journalctl -k`)",
            why.join("; ")
        ));
    }
    // full
    let partition_percent = i.partition_usage.map(|u| u.percent());
    let tier_percent = s
        .filter(|s| !st.tiers.is_empty() && s.tier_budget > 0)
        .map(|s| s.tier_used.saturating_mul(100) / s.tier_budget);
    let full = Full {
        partition_percent,
        tier_percent,
        largest: if partition_percent.is_some_and(|p| p >= FULL_PERCENT) {
            i.largest.clone()
        } else {
            vec![]
        },
    };
    if let Some(pc) = tier_percent.filter(|&p| p >= FULL_PERCENT) {
        warnings.push(format!(
            "the RAM tier is {pc}% full (of its budget this boot): a sync does not empty it; when it is full writes \
             to its dirs fail. Reboot to start it empty, or remove what is not needed in its dirs"
        ));
    }
    Some(Health {
        writes,
        kept_off,
        at_risk,
        faults,
        full,
        failing,
        warnings,
        note: (i.not_root && i.history.is_none()).then(|| {
            "the per-day history and the last boots are root's: `sudo mados-persistence status` shows them".into()
        }),
        now_unix_ms: i.now_ms,
        read_only: st.read_only,
    })
}

fn h(b: u64) -> String {
    super::status::human(b)
}

fn when(now_ms: u64, then_ms: u64) -> String {
    super::status::ago(now_ms, then_ms)
}

fn within(now_ms: u64, at_ms: u64) -> String {
    let s = at_ms.saturating_sub(now_ms) / 1000;
    match s {
        0 => "now".into(),
        1..=59 => format!("in {s} s"),
        60..=3599 => format!("in {} min", s / 60),
        _ => format!("in {} h {} min", s / 3600, s / 60 % 60),
    }
}

fn shutdown_word(l: Option<LastShutdown>) -> &'static str {
    match l {
        Some(LastShutdown::Clean) => "clean",
        Some(LastShutdown::Unclean) => "NOT clean",
        Some(LastShutdown::New) => "new",
        None => "unknown",
    }
}

/// The health's text (pure).
pub fn render(x: &Health) -> String {
    let now_ms = x.now_unix_ms;
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<14}{v}\n"));
    let w = &x.writes;
    let mut v = vec![];
    if let Some(b) = w.fs_lifetime_bytes {
        v.push(format!(
            "{} to the persistence filesystem in its life{}",
            h(b),
            w.fs_boot_bytes
                .map(|b| format!(", {} this boot", h(b)))
                .unwrap_or_default()
        ));
    }
    if let (Some(d), Some(b)) = (&w.disk, w.disk_boot_bytes) {
        v.push(format!("{} to the stick ({d}) this boot", h(b)));
    }
    line(
        "writes:",
        if v.is_empty() {
            "not known (no ext4 counters for the partition)".into()
        } else {
            v.join("; ")
        },
    );
    if let (Some(a), Some(b)) = (w.last_7_days_bytes, w.last_30_days_bytes) {
        let top = w.days.iter().max_by_key(|d| d.bytes);
        line(
            "",
            format!(
                "last 7 days {}, last 30 days {} ({} days recorded{})",
                h(a),
                h(b),
                w.days.len(),
                top.map(|d| format!("; most on {}: {}", d.day, h(d.bytes)))
                    .unwrap_or_default()
            ),
        );
    }
    match &x.kept_off {
        Some(k) => {
            let ratio = match k.ratio {
                Some(r) => format!("{r:.1}x what reached the stick ({})", h(k.synced)),
                None => "nothing reached the stick yet".into(),
            };
            line(
                "kept off:",
                format!(
                    "{} in all, {ratio}: {} written into the RAM tier, {} of it overwritten or deleted before a sync; {} written to the tmpfs dirs{}",
                    h(k.kept_off),
                    h(k.tier_written),
                    h(k.tier_kept_off),
                    h(k.tmpfs_written),
                    if k.tmpfs_counted {
                        ""
                    } else {
                        " (not all of them counted: see the daemon's log)"
                    }
                ),
            );
        }
        None => line(
            "kept off:",
            "not counted (the daemon is not running, counts nothing with MADOS_PERSISTENCE_HEALTH=off, or is older)".into(),
        ),
    }
    match &x.at_risk {
        None if x.read_only => line(
            "at risk:",
            "everything changed this boot: the stick is write-protected, nothing is saved".into(),
        ),
        None => line(
            "at risk:",
            "nothing waits in RAM: no RAM tier (changes go to the stick as they are written)".into(),
        ),
        Some(r) if !r.known => line(
            "at risk:",
            "not known: no daemon published its counts this boot (what is in the RAM tier is not synced until one runs)".into(),
        ),
        Some(r) if r.files == 0 => line("at risk:", "nothing: every change is synced".into()),
        Some(r) => {
            let next = match (r.daemon_running, r.next_sync_unix_ms) {
                (false, _) => "the daemon is NOT RUNNING: nothing is synced until it runs (`sudo mados-persistence sync` syncs now)".to_string(),
                (true, Some(t)) => format!("next sync {}", within(now_ms, t)),
                (true, None) => "next sync when the daemon's trigger comes".into(),
            };
            line(
                "at risk:",
                format!(
                    "a power cut now loses {} changes ({}){}; {next}",
                    r.files,
                    h(r.bytes),
                    r.oldest_unix_ms
                        .map(|t| format!(", the oldest made {}", when(now_ms, t)))
                        .unwrap_or_default()
                ),
            );
        }
    }
    let f = &x.faults;
    let errors = match (f.fs_errors, f.fs_errors_at_boot) {
        (Some(0) | None, Some(0) | None)
            if f.fs_errors.is_some() || f.fs_errors_at_boot.is_some() =>
        {
            "no filesystem errors".to_string()
        }
        (None, None) => "filesystem errors not known".to_string(),
        (now, boot) => format!(
            "FILESYSTEM ERRORS: {} now, {} at boot{}{}",
            now.map_or("?".into(), |n| n.to_string()),
            boot.map_or("?".into(), |n| n.to_string()),
            f.first_error_unix_s
                .map(|t| format!(", first on {}", date(t / 86_400)))
                .unwrap_or_default(),
            f.last_error_unix_s
                .map(|t| format!(", last on {}", date(t / 86_400)))
                .unwrap_or_default()
        ),
    };
    let io = match f.io_errors {
        Some(0) => "no I/O errors this boot".to_string(),
        Some(n) => format!("{n} I/O ERRORS this boot"),
        None => "I/O errors not counted on this bus".into(),
    };
    line("faults:", format!("{errors}; {io}"));
    let fsck: Vec<String> = f
        .boots
        .iter()
        .map(|b| match (&b.fsck, b.fsck_code) {
            (Some(s), Some(c)) => format!("{s} ({c})"),
            _ => "no fsck".into(),
        })
        .collect();
    let unclean = f
        .boots
        .iter()
        .filter(|b| b.last_shutdown == Some(LastShutdown::Unclean))
        .count();
    line(
        "",
        format!(
            "fsck at the last {} boots, oldest first: {}; shutdowns not clean: {unclean}; the last: {}",
            f.boots.len(),
            fsck.join(", "),
            shutdown_word(f.last_shutdown)
        ),
    );
    if !x.full.largest.is_empty() {
        line(
            "largest:",
            format!(
                "the partition is {}% full; the largest dirs in the persistent uppers:",
                x.full.partition_percent.unwrap_or(0)
            ),
        );
        for d in &x.full.largest {
            line("", format!("{:>9}  {}", h(d.bytes), d.path));
        }
    }
    for w in &x.warnings {
        line("WARNING:", w.clone());
    }
    if let Some(n) = &x.note {
        line("", format!("({n})"));
    }
    o
}

/// At most this many entries are looked at by `largest_dirs`.
pub const WALK_MAX: usize = 100_000;
/// Dirs deeper than this below the partition's root are counted in
/// their ancestors only.
const WALK_DEPTH: usize = 6;

/// The dirs to name as the largest (pure): from every dir's total, those
/// none of whose children holds half of it (the one to look into) and
/// below no other such dir, the largest `n` first.
pub fn pick_largest(totals: &[(PathBuf, u64)], n: usize) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64)> = totals
        .iter()
        .filter(|(p, b)| {
            *b > 0
                && !totals
                    .iter()
                    .any(|(c, cb)| c.parent() == Some(p.as_path()) && cb.saturating_mul(2) >= *b)
        })
        .cloned()
        .collect();
    // a dir whose children are each small is named itself, not its children
    let named: Vec<PathBuf> = v.iter().map(|(p, _)| p.clone()).collect();
    v.retain(|(p, _)| !named.iter().any(|a| a != p && p.starts_with(a)));
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// The space each dir under the partition's `overlays/` (the persistent
/// uppers), `home/`, `cache/` (the cache binds) and `tier/` (the RAM
/// tiers' lower and stage) takes (allocated blocks), walked by fd (`util::safefs`: no symlink followed,
/// no mount crossed), at most `WALK_MAX` entries; the largest five.
pub fn largest_dirs(pmount: &Path) -> Vec<DirSize> {
    use crate::util::safefs::{self, Dir, Kind};
    use std::collections::HashMap;
    let Ok(root) = Dir::open(pmount) else {
        return vec![];
    };
    let mut totals: HashMap<PathBuf, u64> = HashMap::new();
    let mut stack: Vec<PathBuf> = ["overlays", "home", "cache", "tier"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let mut seen = 0usize;
    while let Some(rel) = stack.pop() {
        let Ok(d) = root.dir(&rel) else { continue };
        let Ok(names) = d.list() else { continue };
        for n in names {
            seen += 1;
            if seen > WALK_MAX {
                break;
            }
            let Ok(Some(st)) = d.lstat(&n) else { continue };
            let child = rel.join(&n);
            let bytes = (st.st_blocks as u64).saturating_mul(512);
            // the entry's own blocks count in every ancestor kept
            for a in child.ancestors().skip(1) {
                if a.as_os_str().is_empty() {
                    break;
                }
                if a.components().count() <= WALK_DEPTH {
                    let e = totals.entry(a.to_path_buf()).or_default();
                    *e = e.saturating_add(bytes);
                }
            }
            if safefs::kind(&st) == Kind::Dir {
                if child.components().count() <= WALK_DEPTH {
                    totals.entry(child.clone()).or_default();
                }
                stack.push(child);
            }
        }
        if seen > WALK_MAX {
            break;
        }
    }
    let totals: Vec<(PathBuf, u64)> = totals.into_iter().collect();
    pick_largest(&totals, 5)
        .into_iter()
        .map(|(p, b)| DirSize {
            path: pmount.join(p).display().to_string(),
            bytes: b,
        })
        .collect()
}

/// `largest_dirs`, walked at most once a minute in one process (`status
/// --watch` refreshes every second; the walk may take 100,000 lstats).
fn largest_cached(pmount: &Path) -> Vec<DirSize> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<(Instant, PathBuf, Vec<DirSize>)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, p, v)) = last.as_ref()
        && p == pmount
        && at.elapsed() < Duration::from_secs(60)
    {
        return v.clone();
    }
    let v = largest_dirs(pmount);
    *last = Some((Instant::now(), pmount.to_path_buf(), v.clone()));
    v
}

/// Read what the health needs now (thin).
pub fn gather(
    st: &State,
    c: Option<&super::status::Companion>,
    partition_usage: Option<Usage>,
) -> Option<Health> {
    let p = st.partition.as_ref().filter(|_| st.mode == "persistent")?;
    let sys = Path::new("/sys");
    let name = |d: &str| {
        Path::new(d)
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
    };
    let fs = name(&p.mounted_from).and_then(|d| crate::disk::sysfs::ext4_live(sys, &d));
    let disk = st
        .boot_device
        .as_ref()
        .and_then(|b| name(&b.disk))
        .and_then(|d| crate::disk::sysfs::disk_io(sys, &d));
    let history = crate::util::fsutil::read_nofollow(
        &Path::new(&p.mountpoint).join(health::HEALTH_FILE),
        health::MAX_FILE,
    )
    .ok()
    .and_then(|b| health::parse(&b));
    let largest = if partition_usage.is_some_and(|u| u.percent() >= FULL_PERCENT) {
        largest_cached(Path::new(&p.mountpoint))
    } else {
        vec![]
    };
    let i = Inputs {
        fs,
        disk,
        history,
        stats: c.and_then(|c| c.stats.clone()),
        daemon_running: c.is_some_and(|c| c.running),
        partition_usage,
        largest,
        sync_faults: c
            .map(|c| c.failing.iter().map(|f| f.reason.clone()).collect())
            .unwrap_or_default(),
        now_ms: crate::companion::stats::now_ms(),
        not_root: !nix::unistd::geteuid().is_root(),
    };
    build(st, &i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::companion::health::{Boot, Day};
    use crate::companion::stats::{HealthStats, TierStats};
    use crate::disk::superblock::Ext4Wear;

    const NOW: u64 = 20_000 * 86_400_000 + 12 * 3_600_000; // 2024-10-04 12:00 UTC

    fn state(tier: bool) -> State {
        let j = r#"{
          "version": 1, "mode": "persistent", "reason": null, "root": "/new_root",
          "boot_device": {"device": "/dev/sda1", "disk": "/dev/sda", "kind": "usb", "description": "USB disk"},
          "partition": {"device": "/dev/sda3", "mounted_from": "/dev/sda3", "created": false, "start": 1,
                        "size": 2000000000, "mountpoint": "/run/mados/persistence",
                        "fsck": {"code": 0, "summary": "clean", "output": ""},
                        "last_shutdown": "clean",
                        "at_boot": {"kbytes_written": 1000000, "error_count": 0,
                                    "first_error_unix_s": 0, "last_error_unix_s": 0}},
          "mounts": [], "warnings": [], "timings": [], "cmdline": ""
        }"#;
        let mut s: State = serde_json::from_str(j).unwrap();
        if tier {
            s.tiers = vec![
                serde_json::from_str(
                    r#"{"dir": "/var/log", "base": "", "lower": "", "stage": "", "tmp": "",
                        "upper": "", "work": "", "excluded": []}"#,
                )
                .unwrap(),
            ];
        }
        s
    }

    fn stats() -> Stats {
        Stats {
            pid: 7,
            tier_budget: 1000 << 20,
            tier_used: 100 << 20,
            tiers: vec![TierStats {
                dir: "/var/log".into(),
                dirty_files: 3,
                dirty_bytes: 2 << 20,
                ..Default::default()
            }],
            health: HealthStats {
                tracking: true,
                tier_written: 50 << 20,
                tmpfs_written: 100 << 20,
                synced: 8 << 20,
                oldest_dirty_unix_ms: NOW - 120_000,
                next_sync_unix_ms: NOW + 240_000,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn history() -> History {
        let mut h = History {
            version: 1,
            lifetime_kb: 1_200_000,
            days: vec![
                Day {
                    day: 19_960, // 40 days ago: not in the last 30
                    kbytes: 999_999,
                },
                Day {
                    day: 19_990,
                    kbytes: 300_000,
                },
                Day {
                    day: 19_998,
                    kbytes: 50_000,
                },
            ],
            boots: vec![],
        };
        for (i, code) in [0, 0, 1].iter().enumerate() {
            h.boots.push(Boot {
                boot_id: format!("b{i}"),
                started_unix_s: 1_700_000_000 + i as u64,
                fsck_code: Some(*code),
                fsck: Some(
                    if *code == 0 {
                        "clean"
                    } else {
                        "errors corrected"
                    }
                    .into(),
                ),
                last_shutdown: Some(if i == 1 {
                    LastShutdown::Unclean
                } else {
                    LastShutdown::Clean
                }),
                errors: 0,
            });
        }
        h
    }

    fn healthy() -> Inputs {
        Inputs {
            fs: Some(Ext4Live {
                lifetime_write_kbytes: 1_250_000,
                session_write_kbytes: Some(40_000),
                errors_count: Some(0),
                first_error_unix_s: Some(0),
                last_error_unix_s: Some(0),
            }),
            disk: Some(DiskIo {
                bytes_written: 300 << 20,
                io_errors: Some(0),
            }),
            history: Some(history()),
            stats: Some(stats()),
            daemon_running: true,
            partition_usage: Some(Usage {
                size: 1000,
                used: 500,
                free: 500,
            }),
            largest: vec![DirSize {
                path: "/p/overlays/usr/upper/lib".into(),
                bytes: 400,
            }],
            sync_faults: vec![],
            now_ms: NOW,
            not_root: false,
        }
    }

    #[test]
    fn a_healthy_stick() {
        let x = build(&state(true), &healthy()).unwrap();
        let t = render(&x);
        assert!(!x.failing && x.warnings.is_empty(), "{t}");
        // 1,250,000 KiB in its life; 250,000 KiB since the counter at boot
        assert!(
            t.contains("writes:       1.2G to the persistence filesystem in its life, 244.1M this boot; 300M to the stick (/dev/sda) this boot"),
            "{t}"
        );
        // today: what was written since the history's last save (50,000 KiB)
        assert_eq!(x.writes.days.last().unwrap().day, "2024-10-04");
        assert_eq!(x.writes.days.last().unwrap().bytes, 50_000 << 10);
        assert_eq!(x.writes.last_7_days_bytes, Some(100_000 << 10));
        assert_eq!(x.writes.last_30_days_bytes, Some(400_000 << 10));
        assert_eq!(x.writes.days.len(), 3, "the day 40 days ago is left out");
        assert!(
            t.contains("last 7 days 97.7M, last 30 days 390.6M (3 days recorded; most on 2024-09-24: 293.0M)"),
            "{t}"
        );
        // 50M written into the tier, 8M synced, 2M waiting: 40M kept off, and 100M of tmpfs
        let k = x.kept_off.as_ref().unwrap();
        assert_eq!((k.tier_kept_off, k.kept_off), (40 << 20, 140 << 20));
        assert!(
            t.contains("kept off:     140M in all, 17.5x what reached the stick (8M): 50M written into the RAM tier, 40M of it overwritten or deleted before a sync; 100M written to the tmpfs dirs"),
            "{t}"
        );
        assert!(
            t.contains("at risk:      a power cut now loses 3 changes (2M), the oldest made 2 min ago; next sync in 4 min"),
            "{t}"
        );
        assert!(
            t.contains("faults:       no filesystem errors; no I/O errors this boot"),
            "{t}"
        );
        assert!(
            t.contains("fsck at the last 3 boots, oldest first: clean (0), clean (0), errors corrected (1); shutdowns not clean: 1; the last: clean"),
            "{t}"
        );
        // not full: no dirs named
        assert!(!t.contains("largest:"), "{t}");
        let j = serde_json::to_value(&x).unwrap();
        assert_eq!(j["kept_off"]["tmpfs_written"], 100 << 20);
        assert_eq!(j["kept_off"]["tmpfs_counted"], true);
        assert_eq!(j["at_risk"]["files"], 3);
        assert_eq!(j["faults"]["fs_errors"], 0);
        assert_eq!(j["writes"]["days"][2]["day"], "2024-10-04");
        assert_eq!(j["failing"], false);
    }

    #[test]
    fn a_failing_stick_says_back_up_now() {
        // each sign alone makes the warning
        type Sign = Box<dyn Fn(&mut State, &mut Inputs)>;
        let signs: Vec<Sign> = vec![
            Box::new(|_, i| {
                i.fs = i.fs.map(|f| Ext4Live {
                    errors_count: Some(3),
                    first_error_unix_s: Some(19_990 * 86_400),
                    last_error_unix_s: Some(19_999 * 86_400 + 5),
                    ..f
                })
            }),
            // e2fsck clears the record: the count read at boot still tells
            Box::new(|s, _| {
                s.partition.as_mut().unwrap().at_boot = Some(Ext4Wear {
                    error_count: 2,
                    last_error_unix_s: 19_999 * 86_400,
                    ..Default::default()
                })
            }),
            Box::new(|_, i| i.disk.as_mut().unwrap().io_errors = Some(12)),
            Box::new(|_, i| i.history.as_mut().unwrap().boots[0].fsck_code = Some(4)),
            Box::new(|_, i| i.history.as_mut().unwrap().boots[1].fsck_code = Some(1)),
            Box::new(|_, i| i.sync_faults = vec!["the stick reported an I/O error (EIO)".into()]),
        ];
        let expect = [
            "the filesystem recorded 3 errors (the last on 2024-10-03)",
            "the filesystem recorded 2 errors (the last on 2024-10-03)",
            "the kernel counted 12 I/O errors on /dev/sda this boot",
            "e2fsck left errors uncorrected at 1 of the last 3 boots",
            "e2fsck corrected errors at 2 of the last 3 boots",
            "a sync failed with an I/O error",
        ];
        for (f, want) in signs.iter().zip(expect) {
            let (mut s, mut i) = (state(true), healthy());
            f(&mut s, &mut i);
            let x = build(&s, &i).unwrap();
            let t = render(&x);
            assert!(x.failing, "{want}: {t}");
            assert!(
                t.contains(&format!(
                    "WARNING:      the stick may be failing: {want}. Back up now"
                )),
                "{want}: {t}"
            );
        }
        let mut i = healthy();
        i.fs = i.fs.map(|f| Ext4Live {
            errors_count: Some(3),
            first_error_unix_s: Some(19_990 * 86_400),
            last_error_unix_s: Some(19_999 * 86_400),
            ..f
        });
        i.disk.as_mut().unwrap().io_errors = Some(12);
        let t = render(&build(&state(true), &i).unwrap());
        assert!(
            t.contains("faults:       FILESYSTEM ERRORS: 3 now, 0 at boot, first on 2024-09-24, last on 2024-10-03; 12 I/O ERRORS this boot"),
            "{t}"
        );
        // one boot whose fsck corrected something is not a failing stick
        let mut i = healthy();
        i.history.as_mut().unwrap().boots[2].fsck_code = Some(0);
        i.history.as_mut().unwrap().boots[0].fsck_code = Some(1);
        assert!(!build(&state(true), &i).unwrap().failing);
    }

    #[test]
    fn a_full_partition_and_a_full_tier() {
        let mut i = healthy();
        i.partition_usage = Some(Usage {
            size: 1000,
            used: 900,
            free: 100,
        });
        i.stats.as_mut().unwrap().tier_used = 950 << 20;
        let x = build(&state(true), &i).unwrap();
        let t = render(&x);
        assert_eq!(x.full.partition_percent, Some(90));
        assert!(
            t.contains("largest:      the partition is 90% full; the largest dirs in the persistent uppers:\n                  400 B  /p/overlays/usr/upper/lib"),
            "{t}"
        );
        assert!(
            t.contains("WARNING:      the RAM tier is 95% full (of its budget this boot)"),
            "{t}"
        );
        // at 89%: neither
        i.partition_usage.as_mut().unwrap().used = 890;
        i.stats.as_mut().unwrap().tier_used = 890 << 20;
        let x = build(&state(true), &i).unwrap();
        assert!(x.full.largest.is_empty() && x.warnings.is_empty());
    }

    #[test]
    fn what_is_not_known_is_said() {
        // no daemon stats, no sysfs, no history (not root)
        let i = Inputs {
            now_ms: NOW,
            not_root: true,
            ..Default::default()
        };
        let x = build(&state(true), &i).unwrap();
        let t = render(&x);
        assert!(t.contains("writes:       not known"), "{t}");
        assert!(
            t.contains("at risk:      not known: no daemon published"),
            "{t}"
        );
        assert!(t.contains("kept off:     not counted"), "{t}");
        // the count read at boot (0) is all there is
        assert!(t.contains("faults:       no filesystem errors"), "{t}");
        let mut old = state(true);
        old.partition.as_mut().unwrap().at_boot = None;
        let t2 = render(&build(&old, &i).unwrap());
        assert!(
            t2.contains("faults:       filesystem errors not known"),
            "{t2}"
        );
        assert!(t.contains("I/O errors not counted on this bus"), "{t}");
        // without a history, this boot's fsck at least
        assert!(
            t.contains("fsck at the last 1 boots, oldest first: clean (0)"),
            "{t}"
        );
        assert!(t.contains("sudo mados-persistence status"), "{t}");
        // the daemon died with changes in RAM
        let mut i = healthy();
        i.daemon_running = false;
        let t = render(&build(&state(true), &i).unwrap());
        assert!(
            t.contains("a power cut now loses 3 changes (2M), the oldest made 2 min ago; the daemon is NOT RUNNING"),
            "{t}"
        );
        // no tier: nothing waits in RAM
        let t = render(&build(&state(false), &healthy()).unwrap());
        assert!(
            t.contains("at risk:      nothing waits in RAM: no RAM tier"),
            "{t}"
        );
        // all synced
        let mut i = healthy();
        i.stats.as_mut().unwrap().tiers[0].dirty_files = 0;
        i.stats.as_mut().unwrap().tiers[0].dirty_bytes = 0;
        let t = render(&build(&state(true), &i).unwrap());
        assert!(
            t.contains("at risk:      nothing: every change is synced"),
            "{t}"
        );
        // a tmpfs dir the daemon could not watch: said, not hidden
        let mut i = healthy();
        i.stats.as_mut().unwrap().health.tmpfs_uncounted = true;
        let x = build(&state(true), &i).unwrap();
        assert!(!x.kept_off.as_ref().unwrap().tmpfs_counted);
        let t = render(&x);
        assert!(
            t.contains(
                "100M written to the tmpfs dirs (not all of them counted: see the daemon's log)"
            ),
            "{t}"
        );
        assert_eq!(
            serde_json::to_value(&x).unwrap()["kept_off"]["tmpfs_counted"],
            false
        );
        // counting off: nothing made up
        let mut i = healthy();
        i.stats.as_mut().unwrap().health.tracking = false;
        assert_eq!(build(&state(true), &i).unwrap().kept_off, None);
        // nothing synced yet: no ratio
        let mut i = healthy();
        i.stats.as_mut().unwrap().health.synced = 0;
        let t = render(&build(&state(true), &i).unwrap());
        assert!(t.contains("nothing reached the stick yet"), "{t}");
        // a write-protected stick: all of this boot is at risk
        let mut ro = state(true);
        ro.read_only = true;
        let t = render(&build(&ro, &healthy()).unwrap());
        assert!(
            t.contains("at risk:      everything changed this boot: the stick is write-protected"),
            "{t}"
        );
        // RAM mode has no stick health
        let mut ram = state(true);
        ram.mode = "ram".into();
        assert_eq!(build(&ram, &healthy()), None);
    }

    #[test]
    fn dates_and_the_dirs_to_name() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(19_723), "2024-01-01");
        assert_eq!(date(20_000), "2024-10-04");
        assert_eq!(date(11_016), "2000-02-29");
        let p = |s: &str, b| (PathBuf::from(s), b);
        let totals = [
            p("overlays", 1000),
            p("overlays/usr", 900),
            p("overlays/usr/upper", 900),
            p("overlays/usr/upper/lib", 500),
            p("overlays/usr/upper/share", 400),
            p("home", 300),
            p("home/alice", 100),
            p("home/bob", 100),
            p("empty", 0),
        ];
        let got = pick_largest(&totals, 5);
        assert_eq!(
            got,
            [
                p("overlays/usr/upper/lib", 500),
                p("overlays/usr/upper/share", 400),
                p("home", 300),
            ]
        );
    }

    #[test]
    fn the_walk_counts_blocks_and_stays_on_the_partition() {
        let d = std::env::temp_dir().join(format!("mados-largest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let big = d.join("overlays/var/upper/lib/big");
        std::fs::create_dir_all(&big).unwrap();
        std::fs::write(big.join("f"), vec![1u8; 1 << 20]).unwrap();
        std::fs::create_dir_all(d.join("home/alice")).unwrap();
        // outside the four trees: not walked
        std::fs::create_dir_all(d.join("lost+found")).unwrap();
        std::fs::write(d.join("lost+found/huge"), vec![1u8; 4 << 20]).unwrap();
        std::fs::write(d.join("home/alice/g"), vec![1u8; 256 << 10]).unwrap();
        // a symlink out is not followed
        std::os::unix::fs::symlink("/usr", d.join("home/alice/usr")).unwrap();
        let got = largest_dirs(&d);
        assert_eq!(got[0].path, big.display().to_string());
        assert!(got[0].bytes >= 1 << 20, "{got:?}");
        assert_eq!(got[1].path, d.join("home/alice").display().to_string());
        assert!(got[1].bytes < 1 << 20, "{got:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
