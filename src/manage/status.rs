//! `mados-persistence status`: what a person (or a script, with `--json`)
//! needs to know: is my work being saved, and if not, why. `gather` reads
//! the live system; `render` is pure and unit-tested on state samples.

use super::{RUN_DIR, mounted_targets, pending_path, read_state, usage};
use crate::boot::flags;
use crate::boot::state::{self, State};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// Use of a mounted filesystem, from statvfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub size: u64,
    pub used: u64,
    pub free: u64,
}

impl Usage {
    pub fn percent(&self) -> u64 {
        (self.used * 100).checked_div(self.size).unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountStatus {
    /// The path in the running system (`/etc`, not `/new_root/etc`).
    pub path: String,
    pub kind: String,
    pub mounted: bool,
    pub usage: Option<Usage>,
}

/// The `--json` document. Stable: fields are added, never renamed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub schema: u32,
    /// "persistent", "ram", or "unknown" (not booted with mados-persistence).
    pub mode: String,
    /// Changes are being saved: persistent, the partition mounted, and
    /// the stick writable.
    pub active: bool,
    /// The stick is write-protected: its persistence is shown read-only,
    /// changes are kept in RAM (state.json `read_only`).
    pub read_only: bool,
    pub reason: Option<crate::boot::detect::Reason>,
    pub boot_device: Option<crate::boot::state::BootDevice>,
    pub partition: Option<crate::boot::state::Partition>,
    pub partition_usage: Option<Usage>,
    pub full_warning: bool,
    pub mounts: Vec<MountStatus>,
    /// What will happen at next boot: "disabled-once", "disabled",
    /// "remove", "enabled" (created in this session), or null.
    pub next_boot: Option<String>,
    pub warnings: Vec<String>,
    pub log: String,
    pub state_file: String,
    /// The ISO build booted (label, uuid), when known.
    pub iso: Option<crate::boot::iso_build::IsoBuild>,
    /// An encrypted (LUKS2) persistence partition: version, PBKDF and
    /// its cost, unlocked or not and by which prompt (absent: clear).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::boot::state::Encryption>,
    /// Set when this boot found overlays made on another ISO build.
    pub iso_change: Option<crate::boot::iso_build::IsoChange>,
    /// The users' `~/.cache` in RAM this boot, with what stays on the stick.
    pub user_caches: Vec<crate::boot::usercache::UserCache>,
    /// The booted kernel's modules (`boot::kmod`), when /usr is persistent.
    pub kernel_modules: Option<crate::boot::kmod::KernelModules>,
    /// What this boot did about a `set-aside restore` request.
    pub set_aside_restore: Option<crate::boot::set_aside::Outcome>,
    /// The companion: RAM tiers, live stats, cleanup, deleted-but-open
    /// files (null when not gathered).
    pub companion: Option<Companion>,
    /// The stick's health: writes, what the RAM kept off it, what is at
    /// risk now, faults, fullness (`manage::health`; null in RAM mode or
    /// when not gathered).
    pub health: Option<super::health::Health>,
}

/// What the companion publishes and what is held by deleted files.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Companion {
    /// The RAM tier dirs this boot mounted (state.json `tiers`).
    pub tiers: Vec<String>,
    /// The daemon that wrote `stats` is alive.
    pub running: bool,
    /// The last stats block it published (null: no daemon ran this boot).
    pub stats: Option<crate::companion::stats::Stats>,
    /// Why the stats are missing or could not be read.
    pub stats_note: Option<String>,
    /// Deleted files still held open, largest first (as seen by this
    /// user: root sees every process).
    pub deleted_open: Vec<crate::companion::cleanup::DeletedOpen>,
    /// When this was gathered (Unix ms), for the ages shown.
    pub now_unix_ms: u64,
    /// The files the daemon keeps in RAM, hottest first (at most 20).
    pub pinned: Vec<crate::companion::pinning::PinnedFile>,
    /// The hot set's read-ahead this boot, the verdict on the last, and
    /// the RAM-tier suggestions (null: no daemon published them).
    pub hot: Option<crate::companion::pinning::HotState>,
    /// Set when run without root: what is not shown (the files that name
    /// users' files are root's, mode 0600) and how to see it.
    pub root_only: Option<String>,
    /// Tiers whose last sync failed, with the reason (from `syncs.json`):
    /// what they changed since their last good sync is in RAM only.
    pub failing: Vec<SyncFault>,
}

/// A tier whose syncs fail (a full partition, an I/O error).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncFault {
    pub dir: String,
    pub reason: String,
    pub since_unix_ms: u64,
}

pub const FULL_PERCENT: u64 = 90;

/// Build the status from a boot's state and what is seen now.
pub fn build(
    st: Option<&State>,
    state_file: &str,
    mounted: &dyn Fn(&str) -> bool,
    usage: &dyn Fn(&str) -> Option<Usage>,
    next_boot: Option<String>,
) -> Status {
    let log = "/var/log/mados-persistence.log".to_string();
    let Some(st) = st else {
        return Status {
            schema: 1,
            mode: "unknown".into(),
            active: false,
            read_only: false,
            reason: Some(crate::boot::detect::Reason::new(
                "not_booted",
                format!(
                    "no {state_file}: this system was not booted from a madOS stick with mados-persistence"
                ),
            )),
            boot_device: None,
            partition: None,
            partition_usage: None,
            full_warning: false,
            mounts: vec![],
            next_boot,
            warnings: vec![],
            log,
            state_file: state_file.into(),
            iso: None,
            encryption: None,
            iso_change: None,
            user_caches: vec![],
            kernel_modules: None,
            set_aside_restore: None,
            companion: None,
            health: None,
        };
    };
    let root = if st.root.is_empty() {
        "/new_root"
    } else {
        st.root.as_str()
    };
    let live = |t: &str| -> String {
        match t.strip_prefix(root) {
            Some("") => "/".into(),
            Some(rest) if rest.starts_with('/') => rest.into(),
            _ => t.into(),
        }
    };
    let mounts: Vec<MountStatus> = st
        .mounts
        .iter()
        .map(|m| {
            let path = live(&m.target.to_string_lossy());
            let kind = match m.fstype.as_str() {
                "overlay" => "overlay",
                "bind" => "bind",
                "tmpfs" if m.source == "cow" => "ram-upper",
                "tmpfs" => "tmpfs",
                "ext4" => "persistence",
                other => other,
            }
            .to_string();
            let usage = if matches!(kind.as_str(), "tmpfs" | "ram-upper" | "persistence") {
                usage(&path)
            } else {
                None
            };
            MountStatus {
                mounted: mounted(&path),
                path,
                kind,
                usage,
            }
        })
        .collect();
    let partition_usage = st
        .partition
        .as_ref()
        .filter(|_| st.mode == "persistent")
        .and_then(|p| usage(&p.mountpoint));
    let active = st.mode == "persistent"
        && !st.read_only
        && mounts.iter().any(|m| m.kind == "persistence" && m.mounted);
    Status {
        schema: 1,
        mode: st.mode.clone(),
        active,
        read_only: st.read_only,
        reason: st.reason.clone(),
        boot_device: st.boot_device.clone(),
        partition: st.partition.clone(),
        full_warning: partition_usage.is_some_and(|u| u.percent() >= FULL_PERCENT),
        partition_usage,
        mounts,
        next_boot,
        warnings: st.warnings.clone(),
        log,
        state_file: state_file.into(),
        iso: st.iso.clone(),
        encryption: st.encryption.clone(),
        iso_change: st.iso_change.clone(),
        user_caches: st.user_caches.clone(),
        kernel_modules: st.kernel_modules.clone(),
        set_aside_restore: st.set_aside_restore.clone(),
        companion: None,
        health: None,
    }
}

pub fn ago(now_ms: u64, then_ms: u64) -> String {
    // 0: the daemon never wrote that time (it died before its first update)
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        _ => format!("{} h {} min ago", s / 3600, s / 60 % 60),
    }
}

/// The companion's part of the text (pure).
pub fn render_companion(c: &Companion) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<14}{v}\n"));
    let st = c.stats.as_ref();
    let daemon = match (c.running, st) {
        (true, Some(s)) => format!(
            "running (pid {}, started {}, updated {})",
            s.pid,
            ago(c.now_unix_ms, s.started_unix_ms),
            ago(c.now_unix_ms, s.updated_unix_ms)
        ),
        (_, Some(s)) if s.stopped => format!(
            "NOT RUNNING: it stopped cleanly {}{}",
            ago(c.now_unix_ms, s.updated_unix_ms),
            if c.tiers.is_empty() {
                ""
            } else {
                "; the RAM tier is not synced until it runs again (`sudo mados-persistence sync` syncs now)"
            }
        ),
        (_, Some(s)) => format!(
            "NOT RUNNING: it died (pid {} gone, last update {}){}; the numbers below are its last",
            s.pid,
            ago(c.now_unix_ms, s.updated_unix_ms),
            if c.tiers.is_empty() {
                ""
            } else {
                "; nothing in the RAM tier is lost, but it is not synced until it runs again (`sudo mados-persistence sync`)"
            }
        ),
        (_, None) => format!(
            "NOT RUNNING: no daemon ran this boot{}",
            c.stats_note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ),
    };
    line("companion:", daemon);
    if let Some(s) = st {
        if !c.tiers.is_empty() {
            let pct = (s.tier_used.saturating_mul(100))
                .checked_div(s.tier_budget)
                .unwrap_or(0);
            line(
                "RAM tier:",
                format!(
                    "{} of {} used ({pct}%){}",
                    h(s.tier_used),
                    h(s.tier_budget),
                    if s.tier_full {
                        " — WARNING: above 90% of its budget; it cannot be emptied while mounted, so new writes fail when it is full (README, \"When the tier is full\")"
                    } else {
                        ""
                    }
                ),
            );
        }
        for t in &s.tiers {
            let last = if t.last_sync_unix_ms == 0 {
                "not synced yet this boot".to_string()
            } else {
                format!(
                    "last sync {} ({} written in {:.1} ms)",
                    ago(c.now_unix_ms, t.last_sync_unix_ms),
                    h(t.last_sync_bytes),
                    t.last_sync_us as f64 / 1000.0
                )
            };
            let pending = if t.dirty_files == 0 {
                "all synced".to_string()
            } else {
                format!(
                    "{} changes ({}) not yet synced",
                    t.dirty_files,
                    h(t.dirty_bytes)
                )
            };
            line(
                "",
                format!(
                    "{}: {} in RAM; {pending}; {last}; {} syncs, {} failed",
                    t.dir,
                    h(t.ram_bytes),
                    t.syncs,
                    t.sync_errors
                ),
            );
            if let Some(f) = c.failing.iter().find(|f| f.dir == t.dir) {
                line(
                    "",
                    format!(
                        "{}: NOT SAVED: {} (failing since {}); {} changes ({}) are kept in RAM only and lost at poweroff; \
                         the daemon retries with backoff: free space on the partition, then `sudo mados-persistence sync`",
                        t.dir,
                        f.reason,
                        ago(c.now_unix_ms, f.since_unix_ms),
                        t.dirty_files,
                        h(t.dirty_bytes)
                    ),
                );
            }
        }
        let cleanup = if s.cleanup_runs == 0 {
            "no pass yet".to_string()
        } else {
            format!(
                "{} passes, {} files ({}) removed, last {}",
                s.cleanup_runs,
                s.cleanup_files,
                h(s.cleanup_bytes),
                ago(c.now_unix_ms, s.last_cleanup_unix_ms)
            )
        };
        line("temp cleanup:", cleanup);
        let p = &s.pin;
        let pinned = if !p.enabled {
            "off (mados.pin=off, [pin] enabled = false, or no fanotify)".to_string()
        } else if p.last_plan_unix_ms == 0 {
            format!(
                "no decision yet ({} opens of {} files seen)",
                p.open_events, p.tracked_files
            )
        } else {
            format!(
                "{} files ({}) kept in RAM, budget {}; {} files tracked from {} opens{}{}",
                p.pinned_files,
                h(p.pinned_bytes),
                h(p.budget),
                p.tracked_files,
                p.open_events,
                if p.failures > 0 {
                    format!("; {} pins failed", p.failures)
                } else {
                    String::new()
                },
                if p.overflows > 0 {
                    format!("; {} event queue overflows", p.overflows)
                } else {
                    String::new()
                }
            )
        };
        line("pinned:", pinned);
        for f in c.pinned.iter().take(5) {
            line(
                "",
                format!("{:>9}  {}  (heat {:.1})", h(f.bytes), f.path, f.heat),
            );
        }
        if let Some(n) = &c.root_only {
            line("", format!("({n})"));
        } else if p.pinned_files > 0 && c.pinned.is_empty() {
            // pinned.json is root's: the files are any user's
            line("", "(run as root to see which files)".into());
        }
        if let Some(hs) = &c.hot {
            let m = &hs.measure;
            let mut pf = hs.prefetch.clone();
            if m.prefetched {
                pf = format!(
                    "{pf}: {} files ({}) read ahead in {:.1} s{}; {} changed since, skipped",
                    m.read_files,
                    h(m.read_bytes),
                    m.read_us as f64 / 1e6,
                    if m.cut {
                        ", cut by its time budget"
                    } else {
                        ""
                    },
                    m.skipped
                );
            }
            if m.files > 0 {
                pf = format!(
                    "{pf}; first use of {} of them: {:.1} ms each, {}% in RAM",
                    m.files,
                    m.first_use_us as f64 / 1000.0 / m.files as f64,
                    (m.resident_bytes * 100).checked_div(m.bytes).unwrap_or(100)
                );
            }
            line("read-ahead:", pf);
            if let Some(v) = &hs.verdict {
                line("", format!("last boot that read ahead: {v}"));
            }
            if hs.saved_unix_ms > 0 {
                line(
                    "",
                    format!(
                        "hot set saved {}: {} files ({}) for the next boot",
                        ago(c.now_unix_ms, hs.saved_unix_ms),
                        hs.saved_files,
                        h(hs.saved_bytes)
                    ),
                );
            }
            if hs.suggestions.is_empty() {
                line(
                    "suggested:",
                    format!("no RAM tier dir to suggest ({} writes seen)", hs.writes),
                );
            } else {
                line(
                    "suggested:",
                    format!(
                        "for the RAM tier (written most; {}):",
                        if hs.adopt_suggested {
                            "adopted at the next boot within the tier budget"
                        } else {
                            "[tier] adopt_suggested = true adopts them at the next boot"
                        }
                    ),
                );
                for g in &hs.suggestions {
                    line(
                        "",
                        format!(
                            "{}  ({:.0} writes a half-life, holds {})",
                            g.dir,
                            g.writes,
                            h(g.ram_bytes)
                        ),
                    );
                }
            }
        }
    } else if !c.tiers.is_empty() {
        line("RAM tier:", c.tiers.join(", "));
    }
    let held: u64 = c.deleted_open.iter().map(|d| d.bytes).sum();
    if !c.deleted_open.is_empty() {
        line(
            "deleted-open:",
            format!(
                "{} held by {} deleted files still open (df counts them, du does not); freed when these close:",
                h(held),
                c.deleted_open.len()
            ),
        );
        for d in c.deleted_open.iter().take(5) {
            line(
                "",
                format!("{:>9}  {}  ({})", h(d.bytes), d.path, d.holders.join(", ")),
            );
        }
    } else if let Some(s) = st.filter(|s| s.deleted_open_files > 0) {
        line(
            "deleted-open:",
            format!(
                "{} held by {} deleted files still open (run as root to see which processes)",
                h(s.deleted_open_bytes),
                s.deleted_open_files
            ),
        );
    }
    o
}

fn h(b: u64) -> String {
    human(b)
}

/// Bytes as `status` shows them.
pub fn human(b: u64) -> String {
    if b < 1024 {
        // "14" alone reads as a count
        return format!("{b} B");
    }
    crate::settings::size::human(b)
}

/// Human-readable, aligned.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<14}{v}\n"));
    let headline = match (s.mode.as_str(), s.active) {
        ("persistent", _) if s.read_only => {
            "read-only: changes are not saved (the stick is write-protected: what it holds is shown, \
             what you change is kept in RAM and lost at shutdown)"
                .to_string()
        }
        ("persistent", true) => "ACTIVE: your changes are saved to the stick".to_string(),
        ("persistent", false) => {
            "NOT ACTIVE: the persistence partition is no longer mounted; changes are not saved"
                .into()
        }
        ("ram", _) => "RAM MODE: changes are lost at shutdown".into(),
        _ => "UNKNOWN: not booted with mados-persistence".into(),
    };
    line("persistence:", headline);
    if let Some(r) = &s.reason {
        line("why:", format!("{} ({})", r.message, r.code));
    }
    if let Some(e) = &s.encryption {
        let cost = match (e.pbkdf_memory_kib, e.pbkdf_iterations) {
            (Some(m), Some(i)) => format!("{}, {} MiB, {i} passes", e.pbkdf, m / 1024),
            (None, Some(i)) => format!("{}, {i} iterations", e.pbkdf),
            _ => "key slots unread".into(),
        };
        let how = match &e.unlocked_by {
            Some(by) if e.unlocked => format!("unlocked at the {by} prompt (try {})", e.tries),
            _ => "LOCKED this boot: the next boot asks for the passphrase again (type it at the \
                  console prompt; Enter alone skips it)"
                .into(),
        };
        line(
            "encryption:",
            format!("LUKS{} on {} ({cost}); {how}", e.luks_version, e.device),
        );
    }
    if let Some(b) = &s.boot_device {
        line(
            "boot device:",
            format!("{} on {} — {}", b.device, b.disk, b.description),
        );
    }
    if let Some(p) = &s.partition {
        let mut v = format!("{} ({})", p.device, h(p.size));
        if p.mounted_from != p.device {
            v.push_str(&format!(", through {}", p.mounted_from));
        }
        if p.created {
            v.push_str(", created at this boot");
        }
        line("partition:", v);
        if let Some(u) = s.partition_usage {
            line(
                "space:",
                format!(
                    "{} used of {}, {} free ({}%)",
                    h(u.used),
                    h(u.size),
                    h(u.free),
                    u.percent()
                ),
            );
        }
        if s.mode == "persistent" {
            line("mounted at:", p.mountpoint.clone());
        }
        if let Some(f) = &p.fsck {
            line("fsck:", format!("{} (exit {})", f.summary, f.code));
        }
        if let Some(l) = p.last_shutdown {
            let mut t = last_shutdown_text(l).to_string();
            if s.read_only && l == state::LastShutdown::Unclean {
                t = t.replace(
                    "e2fsck replayed its journal at this boot",
                    "its journal was NOT replayed (the stick is write-protected): the last changes before it may be missing until a writable boot",
                );
            }
            line("shutdown:", t);
        }
    }
    if let Some(i) = &s.iso {
        line("ISO build:", format!("{} ({})", i.label, i.uuid));
    }
    if let Some(k) = &s.kernel_modules {
        line("kernel:", crate::boot::kmod::describe(k));
    }
    if let Some(c) = &s.iso_change {
        line(
            "ISO changed:",
            format!(
                "the stick was re-flashed: the overlays were made on {} ({})",
                c.previous.label, c.previous.uuid
            ),
        );
        match &c.set_aside {
            Some(p) => {
                line(
                    "",
                    format!(
                        "your old system changes (/etc /usr /var /opt) were set aside in {p}; /home was kept"
                    ),
                );
                line(
                    "",
                    "to bring them back with that release written to the stick again: \
                     `mados-persistence set-aside list`, then `sudo mados-persistence set-aside restore NAME`"
                        .to_string(),
                );
            }
            None => line("", format!("policy {}: nothing was set aside", c.policy)),
        }
    }
    if let Some(r) = &s.set_aside_restore {
        use crate::boot::set_aside::Outcome;
        let (tag, m) = match r {
            Outcome::Restored(m) => ("restored", m),
            Outcome::Waiting(m) => ("waiting", m),
            Outcome::Dropped(m) => ("dropped", m),
            Outcome::Failed(m) => ("FAILED", m),
        };
        line("set-aside:", format!("{tag}: {m}"));
    }
    if s.full_warning {
        line(
            "WARNING:",
            format!(
                "persistence is {FULL_PERCENT}% full or more; free space or the system may stop saving changes"
            ),
        );
    }
    if let Some(n) = &s.next_boot {
        let what = match n.as_str() {
            "disabled-once" => {
                "RAM mode for the next boot only (disable --once); persistent again after"
                    .to_string()
            }
            "disabled" => "RAM mode until `mados-persistence enable` (disable)".into(),
            "remove" => "the persistence partition will be removed (remove)".into(),
            "enabled" => {
                "persistence was created in this session and takes effect at next boot".into()
            }
            other => other.into(),
        };
        line("next boot:", what);
    }
    for c in &s.user_caches {
        line(
            "user cache:",
            format!(
                "{} of {} in RAM (up to {}); on the stick: {}",
                c.path,
                c.user,
                h(c.size),
                if c.kept.is_empty() {
                    "nothing".into()
                } else {
                    c.kept.join(", ")
                }
            ),
        );
    }
    if !s.mounts.is_empty() {
        o.push_str("\nmounts:\n");
        let w = s.mounts.iter().map(|m| m.path.len()).max().unwrap_or(0);
        for m in &s.mounts {
            let use_ = m
                .usage
                .map(|u| format!("  {} of {} used", h(u.used), h(u.size)))
                .unwrap_or_default();
            o.push_str(&format!(
                "  {:<w$}  {:<12} {}{}\n",
                m.path,
                m.kind,
                if m.mounted { "mounted" } else { "NOT MOUNTED" },
                use_
            ));
        }
    }
    if !s.warnings.is_empty() {
        o.push_str("\nwarnings from boot:\n");
        for w in &s.warnings {
            o.push_str(&format!("  - {w}\n"));
        }
    }
    if let Some(c) = &s.companion {
        o.push('\n');
        o.push_str(&render_companion(c));
    }
    if let Some(x) = &s.health {
        o.push_str("\nhealth of the stick:\n");
        o.push_str(&super::health::render(x));
    }
    o.push_str(&format!("\nlog: {}   state: {}\n", s.log, s.state_file));
    o
}

/// Everything `status` shows, read now.
pub fn gather() -> Status {
    let st = read_state();
    let mounted = mounted_targets();
    let next = std::fs::read_to_string(pending_path())
        .ok()
        .map(|s| s.trim().to_string())
        .or_else(|| {
            let p = st
                .as_ref()
                .filter(|s| s.mode == "persistent")?
                .partition
                .as_ref()?;
            let f = flags::read(Path::new(&p.mountpoint));
            if f.remove {
                Some("remove".into())
            } else {
                f.disabled.map(|d| {
                    if d == flags::Disabled::Once {
                        "disabled-once"
                    } else {
                        "disabled"
                    }
                    .into()
                })
            }
        });
    let state_file = Path::new(RUN_DIR)
        .join(state::STATE_FILE)
        .display()
        .to_string();
    let s = build(
        st.as_ref(),
        &state_file,
        &|p| mounted.iter().any(|m| m == p),
        &usage,
        next,
    );
    let mut s = s;
    s.companion = Some(gather_companion(st.as_ref()));
    s.health = st
        .as_ref()
        .and_then(|st| super::health::gather(st, s.companion.as_ref(), s.partition_usage));
    s
}

/// What `status` run without root cannot show.
pub const ROOT_ONLY: &str = "not shown without root: which files are pinned, the hot set's read-ahead and the RAM-tier suggestions (they name users' files, so they are root's), and a `disable` or `remove` left on the partition for the next boot (its root is root's only); run `sudo mados-persistence status` to see them";

/// The companion's stats block and the deleted-but-open files, read now.
fn gather_companion(st: Option<&State>) -> Companion {
    use crate::companion::{cleanup, run_dir, stats};
    let (stats, stats_note) = match stats::read(&run_dir().join(stats::STATS_FILE)) {
        Ok(s) => (s, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Companion {
        tiers: st
            .map(|s| s.tiers.iter().map(|t| t.dir.clone()).collect())
            .unwrap_or_default(),
        running: stats.as_ref().is_some_and(stats::daemon_alive),
        stats,
        stats_note,
        deleted_open: cleanup::deleted_open(Path::new("/proc")),
        now_unix_ms: stats::now_ms(),
        pinned: crate::companion::pinning::PinnedList::load(&run_dir()).files,
        hot: crate::companion::pinning::HotState::load(&run_dir()),
        root_only: (!nix::unistd::geteuid().is_root()).then(|| ROOT_ONLY.to_string()),
        failing: crate::companion::SyncLog::load(&run_dir())
            .tiers
            .into_iter()
            .filter_map(|t| {
                Some(SyncFault {
                    reason: t.last_error?,
                    dir: t.dir,
                    since_unix_ms: t.failing_since_unix_ms,
                })
            })
            .collect(),
    }
}

/// How often `status --watch` refreshes: 1 s to 1 h.
pub fn watch_interval(secs: u64) -> std::time::Duration {
    std::time::Duration::from_secs(secs.clamp(1, 3600))
}

/// Whether keys typed during `status --watch` ask it to quit (pure): `q`,
/// or Ctrl-C / Ctrl-D read as bytes.
pub fn wants_quit(keys: &[u8]) -> bool {
    keys.iter().any(|&k| matches!(k, b'q' | b'Q' | 3 | 4))
}

/// The terminal in stdin set to pass keys at once without echo (signals
/// kept: Ctrl-C still interrupts), restored on drop.
struct Keys {
    saved: nix::sys::termios::Termios,
}

impl Keys {
    fn new() -> Option<Keys> {
        use nix::sys::termios::{
            LocalFlags, SetArg, SpecialCharacterIndices, tcgetattr, tcsetattr,
        };
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut t = saved.clone();
        t.local_flags.remove(LocalFlags::ICANON | LocalFlags::ECHO);
        t.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
        t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        tcsetattr(&stdin, SetArg::TCSANOW, &t).ok()?;
        Some(Keys { saved })
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// `status`: once, or every `watch` seconds (1 s to 1 h) until `q`,
/// Ctrl-C or a termination signal. On a terminal the text is redrawn in
/// place; when stdout is not a terminal (a pipe, a file) each refresh is
/// printed after the last, once per interval; with `--json`, one document
/// a line.
pub fn status(json: bool, watch: Option<u64>) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let Some(secs) = watch else {
        let s = gather();
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", render(&s));
        }
        return Ok(());
    };
    let interval = watch_interval(secs);
    let tty = std::io::stdout().is_terminal();
    // the signals through a signalfd: the terminal is restored on Ctrl-C
    let mut mask = nix::sys::signal::SigSet::empty();
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        mask.add(sig);
    }
    mask.thread_block()?;
    let sfd = nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )?;
    let keys = (tty && std::io::stdin().is_terminal())
        .then(Keys::new)
        .flatten();
    loop {
        let s = gather();
        let mut out = std::io::stdout().lock();
        let r = match (json, tty) {
            (true, _) => writeln!(out, "{}", serde_json::to_string(&s)?),
            (false, true) => write!(
                out,
                "\x1b[H\x1b[2J{}\n(every {} s; q or Ctrl-C quits)\n",
                render(&s),
                interval.as_secs()
            ),
            (false, false) => writeln!(out, "{}", render(&s)),
        };
        // a reader gone (a closed pipe) ends the watch
        if r.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        drop(out);
        let deadline = std::time::Instant::now() + interval;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let stdin = std::io::stdin();
            let mut fds = vec![nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&sfd),
                nix::poll::PollFlags::POLLIN,
            )];
            if keys.is_some() {
                fds.push(nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&stdin),
                    nix::poll::PollFlags::POLLIN,
                ));
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if fds[0].any().unwrap_or(false) {
                return Ok(());
            }
            if let Some(k) = fds.get(1) {
                let ev = k.revents().unwrap_or(nix::poll::PollFlags::empty());
                if ev.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR) {
                    return Ok(());
                }
                if ev.contains(nix::poll::PollFlags::POLLIN) {
                    let mut b = [0u8; 64];
                    let n = nix::unistd::read(&stdin, &mut b).unwrap_or(0);
                    if wants_quit(&b[..n]) {
                        return Ok(());
                    }
                    // any other key: refresh now
                    break;
                }
            }
        }
    }
}

/// The last shutdown as `status` says it.
fn last_shutdown_text(l: state::LastShutdown) -> &'static str {
    match l {
        state::LastShutdown::Clean => "the last one was clean (the stick was unmounted)",
        state::LastShutdown::Unclean => {
            "the last one was NOT CLEAN: the stick was not unmounted (a power cut, pulled out \
             while in use, or no shutdown initramfs); e2fsck replayed its journal at this boot"
        }
        state::LastShutdown::New => "none before this boot (created at this boot)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERSISTENT: &str = r#"{
      "version": 1, "mode": "persistent", "reason": null, "root": "/new_root",
      "boot_device": {"device": "/dev/sda1", "disk": "/dev/sda", "kind": "usb", "description": "USB disk"},
      "partition": {"device": "/dev/sda3", "mounted_from": "/dev/sda3", "created": false, "start": 25165824,
                    "size": 2122317824, "mountpoint": "/run/mados/persistence",
                    "fsck": {"code": 0, "summary": "clean", "output": ""}},
      "mounts": [
        {"target": "/run/mados/persistence", "fstype": "ext4", "source": "/dev/sda3", "options": "noatime,commit=60"},
        {"target": "/new_root/etc", "fstype": "overlay", "source": "overlay", "options": ""},
        {"target": "/new_root/home", "fstype": "bind", "source": "/run/mados/persistence/home", "options": "bind"},
        {"target": "/new_root/tmp", "fstype": "tmpfs", "source": "tmpfs", "options": ""}
      ],
      "warnings": ["ignoring /dev/vda labelled 'persistence': it is not on the boot device sda"],
      "timings": [], "cmdline": "",
      "user_caches": [{"user": "alice", "path": "/home/alice/.cache", "size": 536870912, "kept": ["paru"]}]
    }"#;

    const CDROM: &str = r#"{
      "version": 1, "mode": "ram", "root": "/new_root",
      "reason": {"code": "optical", "message": "booted from a CD/DVD, which cannot hold persistence"},
      "boot_device": {"device": "/dev/sr0", "disk": "/dev/sr0", "kind": "optical", "description": "CD/DVD drive"},
      "partition": null, "mounts": [], "warnings": [], "timings": [], "cmdline": ""
    }"#;

    fn st(j: &str) -> State {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn persistent_and_nearly_full() {
        let s = st(PERSISTENT);
        let usage = |p: &str| {
            (p == "/run/mados/persistence").then_some(Usage {
                size: 1000,
                used: 950,
                free: 50,
            })
        };
        let status = build(Some(&s), "/run/x.json", &|p| p != "/etc", &usage, None);
        assert!(status.active);
        assert!(status.full_warning);
        assert_eq!(status.mounts[1].path, "/etc");
        assert!(!status.mounts[1].mounted);
        let text = render(&status);
        assert!(text.contains("ACTIVE: your changes are saved"), "{text}");
        assert!(text.contains("90% full or more"), "{text}");
        let etc = text
            .lines()
            .find(|l| l.trim_start().starts_with("/etc "))
            .unwrap();
        assert!(
            etc.contains("overlay") && etc.ends_with("NOT MOUNTED"),
            "{text}"
        );
        assert!(text.contains("ignoring /dev/vda"), "{text}");
        assert!(
            text.contains(
                "user cache:   /home/alice/.cache of alice in RAM (up to 512M); on the stick: paru"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["partition_usage"]["used"], 950);
        assert_eq!(json["mounts"][2]["kind"], "bind");
    }

    #[test]
    fn a_write_protected_stick_says_changes_are_not_saved() {
        let mut s = st(PERSISTENT);
        s.read_only = true;
        let p = s.partition.as_mut().unwrap();
        p.fsck = None;
        p.last_shutdown = Some(state::LastShutdown::Unclean);
        let status = build(Some(&s), "x", &|_| true, &|_| None, None);
        assert!(status.read_only && !status.active);
        assert!(
            render(&status).contains("its journal was NOT replayed (the stick is write-protected)"),
            "{}",
            render(&status)
        );
        let text = render(&status);
        assert!(
            text.starts_with(
                "persistence:  read-only: changes are not saved (the stick is write-protected"
            ),
            "{text}"
        );
        assert!(!text.contains("ACTIVE"), "{text}");
        assert!(
            !text.contains("fsck:"),
            "no fsck on a write-protected stick: {text}"
        );
        let j = serde_json::to_value(&status).unwrap();
        assert_eq!(
            (j["mode"].as_str(), j["read_only"].as_bool()),
            (Some("persistent"), Some(true))
        );
        // a state.json without the field (an older boot) is writable
        let old = st(PERSISTENT);
        assert!(!old.read_only);
        assert!(build(Some(&old), "x", &|_| true, &|_| None, None).active);
    }

    #[test]
    fn encryption_is_shown_and_absent_for_a_clear_stick() {
        let clear = build(Some(&st(PERSISTENT)), "x", &|_| true, &|_| None, None);
        assert!(!render(&clear).contains("encryption:"));
        assert!(
            serde_json::to_value(&clear)
                .unwrap()
                .get("encryption")
                .is_none()
        );
        assert!(
            !serde_json::to_string(&st(PERSISTENT))
                .unwrap()
                .contains("encryption")
        );
        let mut s = st(PERSISTENT);
        s.encryption = Some(state::Encryption {
            device: "/dev/sda3".into(),
            luks_version: 2,
            uuid: "u".into(),
            pbkdf: "argon2id".into(),
            pbkdf_memory_kib: Some(262144),
            pbkdf_iterations: Some(4),
            key_slots: 1,
            unlocked: true,
            unlocked_by: Some("console".into()),
            tries: 2,
            mapper: Some("/dev/mapper/mados-persistence".into()),
        });
        let status = build(Some(&s), "x", &|_| true, &|_| None, None);
        let text = render(&status);
        assert!(
            text.contains(
                "encryption:   LUKS2 on /dev/sda3 (argon2id, 256 MiB, 4 passes); unlocked at the console prompt (try 2)"
            ),
            "{text}"
        );
        let j = serde_json::to_value(&status).unwrap();
        assert_eq!(j["encryption"]["pbkdf_memory_kib"], 262144);
        assert_eq!(j["encryption"]["unlocked_by"], "console");
        let e = s.encryption.as_mut().unwrap();
        e.unlocked = false;
        e.unlocked_by = None;
        s.mode = "ram".into();
        let text = render(&build(Some(&s), "x", &|_| true, &|_| None, None));
        assert!(
            text.contains("LOCKED this boot: the next boot asks"),
            "{text}"
        );
    }

    #[test]
    fn a_time_never_written_is_never_not_decades_ago() {
        assert_eq!(ago(1_800_000_000_000, 0), "never");
        assert_eq!(
            ago(1_800_000_000_000, 1_800_000_000_000 - 90_000),
            "1 min ago"
        );
    }

    #[test]
    fn last_shutdown_is_shown() {
        let text = |j: &str| render(&build(Some(&st(j)), "/x", &|_| true, &|_| None, None));
        // an older release's state.json: nothing said
        assert!(!text(PERSISTENT).contains("shutdown:"));
        let with = |v: &str| {
            PERSISTENT.replace(
                r#""fsck": {"code": 0"#,
                &format!(r#""last_shutdown": "{v}", "fsck": {{"code": 0"#),
            )
        };
        let t = text(&with("clean"));
        assert!(
            t.contains("shutdown:     the last one was clean (the stick was unmounted)"),
            "{t}"
        );
        let t = text(&with("unclean"));
        assert!(
            t.contains("shutdown:     the last one was NOT CLEAN: the stick was not unmounted"),
            "{t}"
        );
        let t = text(&with("new"));
        assert!(t.contains("shutdown:     none before this boot"), "{t}");
        let s = build(
            Some(&st(&with("unclean"))),
            "/x",
            &|_| true,
            &|_| None,
            None,
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["partition"]["last_shutdown"], "unclean");
    }

    #[test]
    fn ram_mode_says_why() {
        let s = st(CDROM);
        let status = build(Some(&s), "/run/x.json", &|_| true, &|_| None, None);
        assert!(!status.active);
        let text = render(&status);
        assert!(text.contains("RAM MODE"), "{text}");
        assert!(text.contains("booted from a CD/DVD"), "{text}");
        assert!(text.contains("(optical)"), "{text}");
    }

    #[test]
    fn not_booted_with_us() {
        let status = build(
            None,
            "/run/mados-persistence/state.json",
            &|_| false,
            &|_| None,
            None,
        );
        assert_eq!(status.mode, "unknown");
        assert!(render(&status).contains("not booted from a madOS stick"));
    }

    #[test]
    fn next_boot_is_shown() {
        let s = st(PERSISTENT);
        let status = build(
            Some(&s),
            "/x",
            &|_| true,
            &|_| None,
            Some("disabled-once".into()),
        );
        assert!(render(&status).contains("RAM mode for the next boot only"));
        assert_eq!(
            serde_json::to_value(&status).unwrap()["next_boot"],
            "disabled-once"
        );
    }

    fn companion(running: bool, stopped: bool) -> Companion {
        use crate::companion::stats::{Stats, TierStats};
        Companion {
            tiers: vec!["/var/log".into()],
            running,
            stats: Some(Stats {
                pid: 77,
                started_unix_ms: 1_000_000,
                updated_unix_ms: 1_299_000,
                tier_full: true,
                stopped,
                cleanup_runs: 5,
                cleanup_files: 12,
                cleanup_bytes: 3 << 20,
                deleted_open_bytes: 9 << 20,
                deleted_open_files: 1,
                tier_budget: 1 << 30,
                tier_used: 1000 << 20,
                last_cleanup_unix_ms: 1_290_000,
                tiers: vec![TierStats {
                    dir: "/var/log".into(),
                    ram_bytes: 4 << 20,
                    dirty_files: 3,
                    dirty_bytes: 12 << 10,
                    last_sync_unix_ms: 1_180_000,
                    last_sync_us: 2500,
                    last_sync_bytes: 8 << 10,
                    syncs: 4,
                    sync_errors: 1,
                }],
                pin: crate::companion::stats::PinStats {
                    enabled: true,
                    tracked_files: 300,
                    open_events: 4000,
                    pinned_files: 1,
                    pinned_bytes: 90 << 20,
                    budget: 512 << 20,
                    last_plan_unix_ms: 1_295_000,
                    ..Default::default()
                },
                health: Default::default(),
            }),
            stats_note: None,
            deleted_open: vec![],
            now_unix_ms: 1_300_000,
            pinned: vec![crate::companion::pinning::PinnedFile {
                path: "/usr/lib/libLLVM.so".into(),
                bytes: 90 << 20,
                heat: 12.5,
            }],
            hot: Some(crate::companion::pinning::HotState {
                prefetch: "done".into(),
                measure: crate::companion::hotset::Measure {
                    prefetched: true,
                    files: 4,
                    bytes: 8 << 20,
                    resident_bytes: 8 << 20,
                    first_use_us: 2000,
                    read_files: 10,
                    read_bytes: 20 << 20,
                    read_us: 3_500_000,
                    skipped: 1,
                    ..Default::default()
                },
                verdict: Some("first use of 3 files took 0.3 ms each, 40.0 ms with the last boot without: helped (119 ms saved)".into()),
                saved_files: 12,
                saved_bytes: 30 << 20,
                saved_unix_ms: 1_240_000,
                writes: 900,
                suggestions: vec![crate::boot::tier::Suggested {
                    dir: "/var/lib/app".into(),
                    writes: 45.0,
                    ram_bytes: 3 << 20,
                }],
                adopt_suggested: false,
            }),
            root_only: None,
            failing: vec![],
        }
    }

    #[test]
    fn a_failing_sync_says_what_is_not_saved_and_why() {
        let mut c = companion(true, false);
        let text = render_companion(&c);
        assert!(!text.contains("NOT SAVED"), "{text}");
        c.failing = vec![SyncFault {
            dir: "/var/log".into(),
            reason: "the persistence partition is full (ENOSPC)".into(),
            since_unix_ms: 1_240_000,
        }];
        let text = render_companion(&c);
        assert!(
            text.contains("/var/log: NOT SAVED: the persistence partition is full (ENOSPC) (failing since 1 min ago); 3 changes (12K) are kept in RAM only"),
            "{text}"
        );
        assert!(text.contains("retries with backoff"), "{text}");
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["failing"][0]["dir"], "/var/log");
    }

    #[test]
    fn companion_live_stats_are_shown() {
        let text = render_companion(&companion(true, false));
        assert!(
            text.contains("running (pid 77, started 5 min ago, updated 1 s ago)"),
            "{text}"
        );
        assert!(
            text.contains("1000M of 1G used (97%)") && text.contains("WARNING: above 90%"),
            "{text}"
        );
        assert!(
            text.contains("/var/log: 4M in RAM; 3 changes (12K) not yet synced; last sync 2 min ago (8K written in 2.5 ms); 4 syncs, 1 failed"),
            "{text}"
        );
        assert!(
            text.contains("5 passes, 12 files (3M) removed, last 10 s ago"),
            "{text}"
        );
        assert!(text.contains("9M held by 1 deleted files"), "{text}");
        assert!(
            text.contains(
                "1 files (90M) kept in RAM, budget 512M; 300 files tracked from 4000 opens"
            ),
            "{text}"
        );
        assert!(text.contains("/usr/lib/libLLVM.so  (heat 12.5)"), "{text}");
        assert!(
            text.contains("read-ahead:   done: 10 files (20M) read ahead in 3.5 s; 1 changed since, skipped; first use of 4 of them: 0.5 ms each, 100% in RAM"),
            "{text}"
        );
        assert!(
            text.contains("last boot that read ahead: first use of 3 files"),
            "{text}"
        );
        assert!(
            text.contains("hot set saved 1 min ago: 12 files (30M)"),
            "{text}"
        );
        assert!(
            text.contains("/var/lib/app  (45 writes a half-life, holds 3M)"),
            "{text}"
        );
        assert!(
            text.contains("adopt_suggested = true adopts them"),
            "{text}"
        );
        assert!(!text.contains("run as root to see which files"), "{text}");
        let mut c = companion(true, false);
        c.pinned.clear();
        let text = render_companion(&c);
        assert!(text.contains("(run as root to see which files)"), "{text}");
        // status without root says what it cannot show and how to see it
        c.root_only = Some(ROOT_ONLY.into());
        let text = render_companion(&c);
        assert!(text.contains("sudo mados-persistence status"), "{text}");
        assert!(!text.contains("(run as root to see which files)"), "{text}");
        let mut c = companion(true, false);
        c.deleted_open = vec![crate::companion::cleanup::DeletedOpen {
            path: "/tmp/big".into(),
            bytes: 9 << 20,
            holders: vec!["123 firefox".into()],
        }];
        let text = render_companion(&c);
        assert!(text.contains("/tmp/big  (123 firefox)"), "{text}");
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["stats"]["tiers"][0]["dirty_files"], 3);
        assert_eq!(j["deleted_open"][0]["holders"][0], "123 firefox");
        assert_eq!(j["stats"]["pin"]["pinned_bytes"], 90 << 20);
        assert_eq!(j["pinned"][0]["path"], "/usr/lib/libLLVM.so");
    }

    #[test]
    fn watch_keys_and_interval() {
        assert!(wants_quit(b"q") && wants_quit(b"xQ") && wants_quit(&[3]) && wants_quit(&[4]));
        assert!(!wants_quit(b"") && !wants_quit(b" r\n"));
        assert_eq!(watch_interval(0).as_secs(), 1);
        assert_eq!(watch_interval(5).as_secs(), 5);
        assert_eq!(watch_interval(u64::MAX).as_secs(), 3600);
    }

    #[test]
    fn the_health_is_rendered_in_status() {
        let s = st(PERSISTENT);
        let mut status = build(Some(&s), "/x", &|_| true, &|_| None, None);
        assert!(!render(&status).contains("health of the stick:"));
        status.health = super::super::health::build(
            &s,
            &super::super::health::Inputs {
                now_ms: 1,
                ..Default::default()
            },
        );
        let text = render(&status);
        assert!(
            text.contains("\nhealth of the stick:\nwrites:       not known"),
            "{text}"
        );
        let j = serde_json::to_value(&status).unwrap();
        assert_eq!(j["health"]["failing"], false);
        assert!(j["health"]["faults"]["boots"].is_array());
    }

    #[test]
    fn companion_not_running_is_said() {
        let text = render_companion(&companion(false, true));
        assert!(text.contains("NOT RUNNING: it stopped cleanly"), "{text}");
        let text = render_companion(&companion(false, false));
        assert!(text.contains("NOT RUNNING: it died (pid 77 gone"), "{text}");
        let mut c = companion(false, false);
        c.stats = None;
        let text = render_companion(&c);
        assert!(text.contains("no daemon ran this boot"), "{text}");
    }
}
