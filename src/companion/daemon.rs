//! `mados-persistence daemon`: the long-running companion. One per boot
//! (an `flock` in /run; a second one exits). Reads state.json; with RAM
//! tiers it syncs them on the interval, after `idle` seconds without tier
//! writes, when the tier tmpfs passes 90% of its budget, on SIGUSR1, and a
//! final time on SIGTERM/SIGINT/SIGHUP before it exits 0. The tier's data
//! lives in its tmpfs, not in this process: a `kill -9` loses nothing, and
//! a restarted daemon goes on from the manifests in /run.

use super::{Lock, notify::notify, read_state, run_dir, sync_all};
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

pub fn run() -> Result<()> {
    crate::util::logging::init(false, log::LevelFilter::Info);
    let run = run_dir();
    let _me = Lock::take(&run.join("daemon.lock"), false)
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
    let status = if tiers.is_empty() {
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
    log::info!("started: {status}");
    let _ = notify(&format!("READY=1\nSTATUS={status}"));
    let interval = Duration::from_secs(s.tier.interval);
    let idle = Duration::from_secs(s.tier.idle);
    let mut last_sync = Instant::now();
    let mut last_seen = ram.as_deref().and_then(usage);
    let mut last_write: Option<Instant> = None;
    // a restarted daemon does not know whether the tiers changed: sync once
    let mut dirty = !tiers.is_empty();
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
        }
        if matches!(
            wake,
            Some(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP)
        ) {
            let _ = notify("STOPPING=1\nSTATUS=final sync");
            log::info!("stopping: final sync");
            if tiers.is_empty() {
                return Ok(());
            }
            return match sync_once(&run, &tiers) {
                true => {
                    log::info!("final sync done: everything written before it is on the stick");
                    Ok(())
                }
                false => {
                    anyhow::bail!("the final sync failed (see above); the data is still in RAM")
                }
            };
        }
        if tiers.is_empty() {
            continue;
        }
        let now = ram.as_deref().and_then(usage);
        if now.map(|u| (u.0, u.1)) != last_seen.map(|u| (u.0, u.1)) {
            dirty = true;
            last_write = Some(Instant::now());
            last_seen = now;
        }
        let full = now.is_some_and(|(used, _, size)| size > 0 && used * 10 >= size * 9);
        let due = wake == Some(Signal::SIGUSR1)
            || (dirty && last_sync.elapsed() >= interval)
            || (dirty && last_write.is_some_and(|w| w.elapsed() >= idle))
            || (dirty && full);
        if due {
            if full {
                log::warn!(
                    "the RAM tier is above 90% of its budget: syncing; it cannot be emptied while mounted, so it fills up (see README)"
                );
            }
            if sync_once(&run, &tiers) {
                dirty = false;
                last_write = None;
            }
            last_sync = Instant::now();
            last_seen = ram.as_deref().and_then(usage);
        }
    }
}

/// Sync all tiers, log each outcome; whether all are durable.
fn sync_once(run: &Path, tiers: &[Tier]) -> bool {
    match sync_all(run, tiers) {
        Ok(all) => {
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
