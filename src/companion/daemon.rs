//! `mados-persistence daemon`: the long-running companion. One per boot
//! (an `flock` in /run; a second one exits). Reads state.json; with RAM
//! tiers it syncs them on the interval, after `idle` seconds without tier
//! writes (seen by `watch` and by the tmpfs use), when the tier tmpfs
//! passes 90% of its budget, on SIGUSR1, and a final time on
//! SIGTERM/SIGINT/SIGHUP (one a process sent: a kernel's SIGHUP is a
//! terminal hanging up, ignored) before it exits 0; the hot set is saved
//! after that final sync, never before it. The sync lock is waited for
//! 5 s in the loop (the next trigger tries again) and `SYNC_WAIT` at stop,
//! never without end. The tier's data
//! lives in its tmpfs, not in this process: a `kill -9` loses nothing, and
//! a restarted daemon goes on from the manifests in /run.
//!
//! In every mode (RAM mode too) it runs the temp cleanup every
//! `[cleanup] every` seconds, pins the files opened most often within a
//! budget (`companion::pinning`, `[pin]`), and publishes live stats
//! (`/run/mados-persistence/stats`, `companion::stats`) once a second.

use super::stats::{self, Stats};
use super::{Lock, cleanup, notify::notify, read_state, run_dir, sync, sync_all};
use crate::boot::tier::Tier;
use crate::settings::config::{self, Settings};
use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// What the tier tmpfs holds now (bytes and inodes used), from statvfs:
/// a change means the tiers were written.
fn usage(ram: &Path) -> Option<(u64, u64, u64)> {
    let v = nix::sys::statvfs::statvfs(ram).ok()?;
    let f = v.fragment_size();
    Some((
        (v.blocks() - v.blocks_free()) * f,
        v.files() - v.files_free(),
        v.blocks() * f,
    ))
}

fn tier_ram(tiers: &[Tier]) -> Option<&Path> {
    // the tmpfs all tiers share: the parent of a tier's own dir
    tiers
        .first()
        .and_then(|t| Path::new(&t.upper).parent()?.parent())
}

/// The daemon's view of what it did, published to the stats block.
struct Live {
    stats: Stats,
    writer: Option<stats::Writer>,
    /// The sync log's `seq` last read.
    sync_seq: u64,
}

impl Live {
    fn publish(&mut self) {
        self.stats.updated_unix_ms = stats::now_ms();
        if let Some(w) = &self.writer {
            w.publish(&self.stats);
        }
    }

    /// Per-tier RAM use and what a sync would carry now.
    fn refresh_dirty(&mut self, run: &Path, tiers: &[Tier]) {
        let mut oldest = 0u64;
        for (t, ts) in tiers.iter().zip(self.stats.tiers.iter_mut()) {
            let m = sync::Manifest::load(&super::manifest_path(run, t)).unwrap_or_default();
            if let Ok(p) = sync::pending(t, &m) {
                ts.dirty_files = p.files;
                ts.dirty_bytes = p.bytes;
                ts.ram_bytes = p.ram;
                oldest = match (oldest, p.oldest_ms) {
                    (0, o) | (o, 0) => o,
                    (a, b) => a.min(b),
                };
            }
        }
        self.stats.health.oldest_dirty_unix_ms = oldest;
    }

    /// Take the sync counts from the log every sync writes (the daemon's
    /// and `mados-persistence sync`'s); whether it changed.
    fn read_sync_log(&mut self, run: &Path) -> bool {
        let log = super::SyncLog::load(run);
        if log.seq == self.sync_seq {
            return false;
        }
        self.sync_seq = log.seq;
        for t in &log.tiers {
            if let Some(ts) = self.stats.tiers.iter_mut().find(|s| s.dir == t.dir) {
                ts.syncs = t.syncs;
                ts.sync_errors = t.errors;
                ts.last_sync_unix_ms = t.last_unix_ms;
                ts.last_sync_us = t.last_us;
                ts.last_sync_bytes = t.last_bytes;
            }
        }
        self.stats.health.synced = log
            .tiers
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.bytes_total));
        true
    }

    /// The counts of bytes written into RAM, from the watches.
    fn count_written(
        &mut self,
        tier: Option<&super::watch::Watch>,
        tmpfs: Option<&super::watch::Watch>,
    ) {
        fn w(x: Option<&super::watch::Watch>) -> Option<&super::health::Written> {
            x.and_then(|w| w.written.as_ref())
        }
        let h = &mut self.stats.health;
        h.tier_written = w(tier).map_or(0, |w| w.bytes);
        h.tmpfs_written = w(tmpfs).map_or(0, |w| w.bytes);
        h.tracked_files = [w(tier), w(tmpfs)]
            .iter()
            .flatten()
            .map(|w| w.tracked() as u64)
            .sum();
        h.overflows = [tier, tmpfs].iter().flatten().map(|w| w.overflows).sum();
    }
}

/// The tmpfs dirs this boot mounted (not the RAM upper of RAM mode, nor a
/// tier's own tmpfs), as paths of the running system.
fn tmpfs_dirs(st: &crate::boot::state::State) -> Vec<std::path::PathBuf> {
    let root = if st.root.is_empty() {
        "/new_root"
    } else {
        st.root.as_str()
    };
    st.mounts
        .iter()
        .filter(|m| m.fstype == "tmpfs" && m.source != "cow")
        .filter_map(|m| {
            let rest = m.target.strip_prefix(root).ok()?;
            Some(Path::new("/").join(rest))
        })
        .filter(|p| st.tiers.iter().all(|t| !p.starts_with(&t.dir)))
        .collect()
}

/// Whether the daemon counts what is written into RAM for `status` and
/// keeps the health history (`MADOS_PERSISTENCE_HEALTH=off` turns both
/// off, for measuring their cost).
fn health_tracking() -> bool {
    std::env::var("MADOS_PERSISTENCE_HEALTH").map_or(true, |v| v != "off")
}

/// Add what the persistence filesystem wrote since the last save to the
/// health history on the partition (`companion::health`) and this boot's
/// record. Its loss or a failure costs nothing but the record: logged.
fn save_history(st: &crate::boot::state::State, started_ms: u64) {
    use super::health::{self, Boot};
    let Some(p) = st
        .partition
        .as_ref()
        .filter(|_| st.mode == "persistent" && !st.read_only)
    else {
        return;
    };
    let Some(dev) = Path::new(&p.mounted_from)
        .file_name()
        .and_then(|n| n.to_str())
    else {
        return;
    };
    let Some(fs) = crate::disk::sysfs::ext4_live(Path::new("/sys"), dev) else {
        log::debug!("health: no ext4 counters for {dev}");
        return;
    };
    let path = Path::new(&p.mountpoint).join(health::HEALTH_FILE);
    let mut h = crate::util::fsutil::read_nofollow(&path, health::MAX_FILE)
        .ok()
        .and_then(|b| {
            let h = health::parse(&b);
            if h.is_none() {
                log::warn!("{}: not a health record; started again", path.display());
            }
            h
        })
        .unwrap_or_default();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let now_s = stats::now_ms() / 1000;
    h.update(
        now_s,
        fs.lifetime_write_kbytes,
        p.at_boot.map(|w| w.kbytes_written),
        Boot {
            boot_id,
            started_unix_s: started_ms / 1000,
            fsck_code: p.fsck.as_ref().map(|f| f.code),
            fsck: p.fsck.as_ref().map(|f| f.summary.clone()),
            last_shutdown: p.last_shutdown,
            errors: p.at_boot.map_or(0, |w| w.error_count),
        },
    );
    let r = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(serde_json::to_vec(&h)?))
        .and_then(|b| crate::util::fsutil::write_atomic_mode(&path, &b, 0o600));
    if let Err(e) = r {
        log::warn!("health: saving {}: {e:#}", path.display());
    }
}

/// One cleanup pass over every configured dir, logged and counted.
fn cleanup_pass(s: &Settings, live: &mut Live) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let dirs: Vec<&Path> = s
        .cleanup
        .dirs
        .iter()
        .map(Path::new)
        .filter(|p| p.is_dir())
        .filter(|p| match cleanup::in_ram(p) {
            Ok(()) => true,
            Err(why) => {
                // said once, at the first pass
                if live.stats.cleanup_runs == 0 {
                    log::warn!("cleanup: {why}");
                }
                false
            }
        })
        .collect();
    let passes = cleanup::run(&dirs, Path::new("/proc"), now, s.cleanup.age);
    for (p, r) in dirs.iter().zip(passes) {
        let d = p.display();
        match r {
            Ok(pass) => {
                if pass.files > 0 {
                    log::info!(
                        "cleanup {d}: removed {} files ({} bytes) older than {} s",
                        pass.files,
                        pass.bytes,
                        s.cleanup.age
                    );
                }
                for e in &pass.errors {
                    log::warn!("cleanup: {e}");
                }
                live.stats.cleanup_files += pass.files;
                live.stats.cleanup_bytes = live.stats.cleanup_bytes.saturating_add(pass.bytes);
            }
            Err(e) => log::warn!("cleanup of {d}: {e:#}"),
        }
    }
    let held = cleanup::deleted_open(Path::new("/proc"));
    live.stats.deleted_open_files = held.len() as u64;
    live.stats.deleted_open_bytes = held.iter().map(|h| h.bytes).sum();
    live.stats.cleanup_runs += 1;
    live.stats.last_cleanup_unix_ms = stats::now_ms();
}

pub fn run() -> Result<()> {
    crate::util::logging::init(false, log::LevelFilter::Info);
    let run = run_dir();
    let _me = Lock::take(&run.join("daemon.lock"), None)
        .context("another mados-persistence daemon is running")?;
    let st = read_state(&run)?;
    let mut warnings = vec![];
    let s: Settings = config::resolve(
        Path::new("/"),
        &crate::settings::cmdline::parse(&st.cmdline),
        &mut warnings,
    );
    for w in warnings {
        log::warn!("{w}");
    }
    let mut mask = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        mask.add(sig);
    }
    mask.thread_block().context("blocking signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd")?;
    let tiers = st.tiers.clone();
    let ram = tier_ram(&tiers).map(Path::to_path_buf);
    let status = if st.read_only {
        "read-only stick: changes are not saved; nothing to sync".to_string()
    } else if tiers.is_empty() {
        format!("mode {}: no RAM tier", st.mode)
    } else {
        format!(
            "RAM tier on {}",
            tiers
                .iter()
                .map(|t| t.dir.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut live = Live {
        stats: Stats {
            pid: u64::from(std::process::id()),
            started_unix_ms: stats::now_ms(),
            tiers: tiers
                .iter()
                .map(|t| stats::TierStats {
                    dir: t.dir.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        writer: None,
        sync_seq: 0,
    };
    // what this boot's earlier syncs did (a restarted daemon)
    live.read_sync_log(&run);
    live.refresh_dirty(&run, &tiers);
    if let Some(u) = ram.as_deref().and_then(usage) {
        (live.stats.tier_used, live.stats.tier_budget) = (u.0, u.2);
    }
    let sp = run.join(stats::STATS_FILE);
    match stats::Writer::create(&sp, &live.stats) {
        Ok(w) => live.writer = Some(w),
        Err(e) => log::warn!("no live stats: {e:#}"),
    }
    let dirs: Vec<&Path> = tiers.iter().map(|t| Path::new(t.dir.as_str())).collect();
    let track = health_tracking() && !st.read_only;
    // the tiers' writes: by file handle on the tier tmpfs (nothing held),
    // else by fd on the overlays (a removed file's RAM held until the
    // drain), else sampling alone
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut watch = ram.as_deref().and_then(|r| {
        if !super::watch::upper_sees_overlay_writes(&release) {
            log::info!(
                "kernel {release} does not report overlay writes on the tier tmpfs (before 6.5): tier writes watched by fd on the overlays"
            );
            return None;
        }
        super::watch::Watch::by_handle(&[r], "tmpfs", track)
            .map(|(w, _)| w)
            .map_err(|e| {
                log::info!(
                    "tier writes not watched by file handle ({e:#}): by fd on the overlays"
                )
            })
            .ok()
    });
    if watch.is_none() && !dirs.is_empty() {
        watch = super::watch::Watch::new(&dirs, track)
            .map_err(|e| {
                log::info!(
                    "no fanotify ({e:#}): tier writes are seen by sampling the tier's RAM use"
                )
            })
            .ok();
    }
    live.stats.health.tracking = track && (dirs.is_empty() || watch.is_some());
    let tdirs = if track && st.mode == "persistent" {
        tmpfs_dirs(&st)
    } else {
        vec![]
    };
    let tref: Vec<&Path> = tdirs.iter().map(|p| p.as_path()).collect();
    // the tmpfs dirs by file handle only: a watch by fd would hold every
    // removed file's RAM until the drain, for a count
    let mut tmpfs_watch = (!tref.is_empty())
        .then(|| super::watch::Watch::by_handle(&tref, "tmpfs", true))
        .and_then(|w| {
            w.map(|(w, failed)| {
                for f in &failed {
                    log::info!("bytes written to {f}: not counted");
                }
                live.stats.health.tmpfs_uncounted = !failed.is_empty();
                w
            })
            .map_err(|e| {
                log::info!("bytes written to the tmpfs dirs not counted ({e:#})");
                live.stats.health.tmpfs_uncounted = true;
            })
            .ok()
        });
    if !track {
        log::info!("not counting bytes written into RAM (MADOS_PERSISTENCE_HEALTH=off)");
    }
    // the health record: after a sync at most every SAVE_EVERY s, and at stop
    let mut history_at: Option<Instant> = None;
    let mut pinning = if s.pin.enabled {
        super::pinning::Pinning::start(&st, &s, &run)
            .map_err(|e| log::info!("no pinning ({e:#})"))
            .ok()
    } else {
        log::info!("pinning is off (mados.pin=off or [pin] enabled = false)");
        None
    };
    let cleanup_every = (s.cleanup.every > 0).then(|| Duration::from_secs(s.cleanup.every));
    if cleanup_every.is_none() {
        log::info!("temp cleanup is off (cleanup.every = 0)");
    }
    log::info!("started: {status}");
    let _ = notify(&format!("READY=1\nSTATUS={status}"));
    let interval = Duration::from_secs(s.tier.interval);
    let idle = Duration::from_secs(s.tier.idle);
    let mut last_sync = Instant::now();
    let mut last_seen = ram.as_deref().and_then(usage);
    let mut last_write: Option<Instant> = None;
    let mut last_refresh = Instant::now();
    // the dirty counts shown are older than the last tier write
    let mut stale = false;
    // the first pass soon after start, then every `every`
    let mut next_cleanup = cleanup_every.map(|_| Instant::now() + Duration::from_secs(5));
    // a restarted daemon does not know whether the tiers changed: sync once
    let mut dirty = !tiers.is_empty();
    // failed syncs in a row, and when the next may be tried
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    loop {
        let mut wake = None;
        if let Ok(fd) = nix::poll::poll(
            &mut [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&sfd),
                nix::poll::PollFlags::POLLIN,
            )],
            nix::poll::PollTimeout::from(1000u16),
        ) && fd > 0
            && let Ok(Some(si)) = sfd.read_signal()
        {
            wake = Signal::try_from(si.ssi_signo as i32).ok();
            // a hang-up from the kernel is a terminal's (the daemon has none
            // of its own; one taken by mistake must not stop it): only a
            // SIGHUP sent by a process (systemctl) stops it
            if wake == Some(Signal::SIGHUP) && si.ssi_code == nix::libc::SI_KERNEL {
                log::warn!("SIGHUP from a terminal hang-up, not from a process: ignored");
                wake = None;
            }
        }
        if matches!(
            wake,
            Some(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP)
        ) {
            if tiers.is_empty() {
                let _ = notify("STOPPING=1");
                log::info!("stopping (no RAM tier to sync)");
            } else {
                let _ = notify("STOPPING=1\nSTATUS=final sync");
                log::info!("stopping: final sync");
            }
            // the tiers first: the hot set (a capture of many files) is
            // worth less than the data, and must never delay it
            let ok = tiers.is_empty()
                || sync_once(&run, &tiers, &mut live, super::lock_wait(super::SYNC_WAIT));
            if let Some(p) = pinning.as_mut() {
                p.save_now();
            }
            if track {
                save_history(&st, live.stats.started_unix_ms);
            }
            live.refresh_dirty(&run, &tiers);
            if !ok {
                // the last word on what this boot loses
                for t in live.stats.tiers.iter().filter(|t| t.dirty_files > 0) {
                    log::error!(
                        "at stop: {} changes ({} bytes) in {} stay unsaved in RAM and are lost at poweroff{}",
                        t.dirty_files,
                        t.dirty_bytes,
                        t.dir,
                        super::SyncLog::load(&run)
                            .tiers
                            .iter()
                            .find(|l| l.dir == t.dir)
                            .and_then(|l| l.last_error.clone())
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                }
            }
            live.stats.stopped = true;
            live.publish();
            return match ok {
                true if tiers.is_empty() => Ok(()),
                true => {
                    log::info!("final sync done: everything written before it is on the stick");
                    Ok(())
                }
                false => {
                    anyhow::bail!("the final sync failed (see above); the data is still in RAM")
                }
            };
        }
        if let (Some(every), Some(at)) = (cleanup_every, next_cleanup)
            && Instant::now() >= at
        {
            cleanup_pass(&s, &mut live);
            next_cleanup = Some(Instant::now() + every);
        }
        if let Some(p) = pinning.as_mut() {
            p.tick(&mut live.stats.pin);
        }
        if let Some(w) = tmpfs_watch.as_mut() {
            w.wrote();
        }
        if tiers.is_empty() {
            live.count_written(None, tmpfs_watch.as_ref());
            if track
                && history_at.is_none_or(|t| t.elapsed().as_secs() >= super::health::SAVE_EVERY)
            {
                save_history(&st, live.stats.started_unix_ms);
                history_at = Some(Instant::now());
            }
            live.publish();
            continue;
        }
        let now = ram.as_deref().and_then(usage);
        // a sync by hand (`mados-persistence sync`) is counted too, and the
        // dirty counts are then out of date
        if live.read_sync_log(&run) {
            stale = true;
        }
        let wrote = watch.as_mut().is_some_and(|w| w.wrote());
        live.count_written(watch.as_ref(), tmpfs_watch.as_ref());
        let changed = wrote || now.map(|u| (u.0, u.1)) != last_seen.map(|u| (u.0, u.1));
        if changed {
            dirty = true;
            stale = true;
            last_write = Some(Instant::now());
            last_seen = now;
        }
        let full = now.is_some_and(|(used, _, size)| size > 0 && used * 10 >= size * 9);
        if let Some(u) = now {
            (live.stats.tier_used, live.stats.tier_budget) = (u.0, u.2);
        }
        live.stats.tier_full = full;
        // after a failed sync (a full partition, an I/O error) the next
        // try waits: not every second while the trigger holds
        let backed_off = retry_at.is_some_and(|r| Instant::now() < r);
        let due = wake == Some(Signal::SIGUSR1)
            || (!backed_off
                && dirty
                && (last_sync.elapsed() >= interval
                    || last_write.is_some_and(|w| w.elapsed() >= idle)
                    || full));
        if due {
            if full {
                log::warn!(
                    "the RAM tier is above 90% of its budget: syncing; it cannot be emptied while mounted, so it fills up (see README)"
                );
            }
            // a sync by hand in progress: the next trigger tries again
            let ok = sync_once(&run, &tiers, &mut live, super::lock_wait(LOOP_WAIT));
            last_sync = Instant::now();
            last_seen = ram.as_deref().and_then(usage);
            live.refresh_dirty(&run, &tiers);
            if ok {
                dirty = false;
                last_write = None;
                if failures > 0 {
                    log::info!("synced again after {failures} failed syncs: everything is saved");
                }
                failures = 0;
                retry_at = None;
            } else {
                failures += 1;
                let wait = backoff(failures, interval);
                retry_at = Some(Instant::now() + wait);
                let (files, bytes) = live
                    .stats
                    .tiers
                    .iter()
                    .fold((0, 0), |(f, b), t| (f + t.dirty_files, b + t.dirty_bytes));
                log::warn!(
                    "{files} changes ({bytes} bytes) stay in RAM, not saved; next try in {} s ({failures} failed in a row)",
                    wait.as_secs()
                );
            }
            last_refresh = Instant::now();
            stale = false;
            if track
                && history_at.is_none_or(|t| t.elapsed().as_secs() >= super::health::SAVE_EVERY)
            {
                save_history(&st, live.stats.started_unix_ms);
                history_at = Some(Instant::now());
            }
        } else if stale && last_refresh.elapsed() >= Duration::from_secs(5) {
            // what is dirty costs a walk of the RAM upper: at most every 5 s
            live.refresh_dirty(&run, &tiers);
            last_refresh = Instant::now();
            stale = false;
        }
        live.stats.health.next_sync_unix_ms =
            next_sync(dirty, last_sync, interval, last_write, idle, retry_at);
        live.publish();
    }
}

/// When the loop syncs next at the latest (Unix ms): the interval or the
/// idle time, whichever comes first, not before a backoff ends; 0 when
/// nothing waits to be synced.
fn next_sync(
    dirty: bool,
    last_sync: Instant,
    interval: Duration,
    last_write: Option<Instant>,
    idle: Duration,
    retry_at: Option<Instant>,
) -> u64 {
    if !dirty {
        return 0;
    }
    let mut at = last_sync + interval;
    if let Some(w) = last_write {
        at = at.min(w + idle);
    }
    if let Some(r) = retry_at {
        at = at.max(r);
    }
    let now = Instant::now();
    stats::now_ms().saturating_add(
        u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
    )
}

/// How long to wait before the next try after `failures` failed syncs
/// in a row: 10 s, doubling, at most the sync interval (and at least
/// 10 s). SIGUSR1 and `mados-persistence sync` try at once.
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let cap = interval.max(Duration::from_secs(10));
    Duration::from_secs(10)
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap)
}

/// How long the loop's own syncs wait for the sync lock (a
/// `mados-persistence sync` in progress): the loop is not held up longer.
const LOOP_WAIT: Duration = Duration::from_secs(5);

/// Sync all tiers (waiting at most `wait` for the sync lock), log each
/// outcome; whether all are durable.
fn sync_once(run: &Path, tiers: &[Tier], live: &mut Live, wait: Duration) -> bool {
    match sync_all(run, tiers, wait) {
        Ok(all) => {
            live.read_sync_log(run);
            for (dir, r) in &all.reports {
                match r {
                    Ok(r) if r.changed > 0 => log::info!(
                        "synced {dir}: {} changed, {} bytes written ({} appended, {} renamed, {} removed)",
                        r.changed,
                        r.bytes,
                        r.appended,
                        r.renamed,
                        r.removed
                    ),
                    Ok(_) => log::debug!("synced {dir}: nothing changed"),
                    Err(e) => log::error!("sync of {dir} failed: {e:#}"),
                }
            }
            let _ = notify(&format!(
                "STATUS=last sync {}",
                if all.ok() { "ok" } else { "FAILED" }
            ));
            all.ok()
        }
        Err(e) => {
            log::error!("sync: {e:#}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_syncs_back_off_up_to_the_interval() {
        let i = Duration::from_secs(300);
        let got: Vec<u64> = (1..=8).map(|n| backoff(n, i).as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX, i).as_secs(), 300);
        // a short interval still waits 10 s
        assert_eq!(backoff(3, Duration::from_secs(2)).as_secs(), 10);
    }
}
