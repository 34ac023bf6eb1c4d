//! The companion, `mados-persistence daemon`, and `mados-persistence sync`:
//! after boot, the RAM tiers `boot` mounted (state.json `tiers`) are synced
//! to the partition on a timer, when idle, when the tier fills, on request
//! and at stop.
//!
//! - `sync`: one tier's crash-safe sync (stage mirrors the RAM upper).
//! - `notify`: systemd's readiness protocol over `$NOTIFY_SOCKET`.
//! - `cleanup`: old files out of the temp dirs, never one in use; the
//!   space deleted-but-open files hold.
//! - `stats`: the live stats block in shared memory (seqlock).
//! - `watch`: tier writes as they happen (fanotify), for the idle trigger.
//! - `hot`, `heat`, `pin`, `pinset`, `pinning`: the files opened most
//!   often kept in RAM under a budget (opens seen by fanotify, a heat with
//!   a half-life, mapped and locked pages, the daemon's loop).
//! - `hotset`, `prefetch`: the hot set kept on the partition and read
//!   ahead at the next boot, and whether that helped.
//! - `writeheat`: writes per directory, and the RAM-tier suggestions.
//! - `daemon`: the loop, the single-instance lock, signals.
//!
//! Here: reading state.json, the locks, `sync_all` (every tier under the
//! sync lock, counted in the sync log the stats are taken from), and the
//! `sync` command.

pub mod cleanup;
pub mod daemon;
pub mod heat;
pub mod hot;
pub mod hotset;
pub mod notify;
pub mod pin;
pub mod pinning;
pub mod pinset;
pub mod prefetch;
pub mod stats;
pub mod sync;
pub mod watch;
pub mod writeheat;

use crate::boot::state::{self, State};
use crate::boot::tier::Tier;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub const RUN_DIR: &str = "/run/mados-persistence";

/// The directory for the companion's runtime files (`MADOS_PERSISTENCE_RUN`
/// overrides it, for tests).
pub fn run_dir() -> PathBuf {
    std::env::var_os("MADOS_PERSISTENCE_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

pub fn read_state(run: &Path) -> Result<State> {
    let p = run.join(state::STATE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (did the initramfs hook run this boot?)",
            p.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

pub fn manifest_path(run: &Path, t: &Tier) -> PathBuf {
    run.join(format!(
        "tier-{}.manifest.json",
        crate::boot::mounts::escape(&t.dir)
    ))
}

/// The outcome of syncing every tier once.
#[derive(Debug, Default)]
pub struct SyncAll {
    pub reports: Vec<(String, Result<sync::Report>)>,
    pub seconds: f64,
}

impl SyncAll {
    pub fn ok(&self) -> bool {
        self.reports.iter().all(|(_, r)| r.is_ok())
    }
}

/// Every sync of this boot, the daemon's and `mados-persistence sync`'s,
/// counted per tier in `/run/mados-persistence/syncs.json` (updated under
/// the sync lock); the daemon publishes it in the live stats.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyncLog {
    pub seq: u64,
    pub tiers: Vec<TierLog>,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TierLog {
    pub dir: String,
    pub syncs: u64,
    pub errors: u64,
    pub last_unix_ms: u64,
    pub last_us: u64,
    pub last_bytes: u64,
}

pub const SYNC_LOG: &str = "syncs.json";

impl SyncLog {
    pub fn load(run: &Path) -> SyncLog {
        std::fs::read(run.join(SYNC_LOG))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Count one `sync_all` (pure).
    pub fn record(&mut self, all: &SyncAll, now_ms: u64) {
        self.seq += 1;
        for (dir, r) in &all.reports {
            let t = match self.tiers.iter().position(|t| &t.dir == dir) {
                Some(i) => &mut self.tiers[i],
                None => {
                    self.tiers.push(TierLog {
                        dir: dir.clone(),
                        ..Default::default()
                    });
                    self.tiers.last_mut().unwrap()
                }
            };
            t.last_unix_ms = now_ms;
            match r {
                Ok(r) => {
                    t.syncs += 1;
                    t.last_us = r.micros;
                    t.last_bytes = r.bytes;
                }
                Err(_) => t.errors += 1,
            }
        }
    }
}

/// Sync every tier under the sync lock (the daemon and `sync` never run
/// one at the same time). Each tier's manifest lives in `run`.
pub fn sync_all(run: &Path, tiers: &[Tier]) -> Result<SyncAll> {
    let _lock = Lock::take(&run.join("sync.lock"), true)?;
    let t0 = std::time::Instant::now();
    let mut out = SyncAll::default();
    for t in tiers {
        let mp = manifest_path(run, t);
        let mut m = sync::Manifest::load(&mp).unwrap_or_default();
        let t1 = std::time::Instant::now();
        let r = sync::sync_tier(t, &mut m).and_then(|mut r| {
            m.save(&mp)?;
            r.micros = t1.elapsed().as_micros() as u64;
            Ok(r)
        });
        out.reports.push((t.dir.clone(), r));
    }
    out.seconds = t0.elapsed().as_secs_f64();
    let mut log = SyncLog::load(run);
    log.record(&out, stats::now_ms());
    if let Err(e) = serde_json::to_vec(&log)
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::util::fsutil::write_atomic(&run.join(SYNC_LOG), &b))
    {
        log::warn!("counting the sync in {SYNC_LOG}: {e:#}");
    }
    Ok(out)
}

/// An exclusive `flock` on a file in /run, released when dropped (or when
/// the process dies, `kill -9` included).
pub struct Lock {
    _l: nix::fcntl::Flock<std::fs::File>,
}

impl Lock {
    pub fn take(p: &Path, wait: bool) -> Result<Lock> {
        use nix::fcntl::{Flock, FlockArg};
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        Flock::lock(f, arg)
            .map(|l| Lock { _l: l })
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", p.display()))
    }
}

/// `mados-persistence sync`: every tier durable on the stick now.
pub fn sync_command(json: bool) -> Result<bool> {
    let run = run_dir();
    let st = read_state(&run)?;
    if st.tiers.is_empty() {
        let why = if st.mode != "persistent" {
            format!(
                "this boot runs in RAM mode ({}); there is no RAM tier to sync",
                st.mode
            )
        } else {
            "no RAM tier is mounted this boot (tier off or not configured)".into()
        };
        if json {
            println!("{}", serde_json::json!({"synced": [], "note": why}));
        } else {
            println!("{why}");
        }
        return Ok(true);
    }
    let all = sync_all(&run, &st.tiers)?;
    let mut ok = true;
    let mut out = vec![];
    for (dir, r) in &all.reports {
        match r {
            Ok(r) => {
                if !json {
                    println!(
                        "{dir}: synced: {} changed ({} bytes written, {} appended, {} renamed, {} removed); durable on the stick",
                        r.changed, r.bytes, r.appended, r.renamed, r.removed
                    );
                    for n in &r.not_carried {
                        println!("  not carried: {n}");
                    }
                }
                out.push(
                    serde_json::json!({"dir": dir, "ok": true, "changed": r.changed,
                    "bytes": r.bytes, "appended": r.appended, "renamed": r.renamed,
                    "removed": r.removed, "not_carried": r.not_carried}),
                );
            }
            Err(e) => {
                ok = false;
                if !json {
                    eprintln!("{dir}: NOT synced: {e:#}");
                }
                out.push(serde_json::json!({"dir": dir, "ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"synced": out, "seconds": all.seconds})
            )?
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sync_log_counts_every_sync_per_tier() {
        let report = |bytes| {
            Ok(sync::Report {
                bytes,
                micros: 7,
                ..Default::default()
            })
        };
        let mut log = SyncLog::default();
        log.record(
            &SyncAll {
                reports: vec![("/var/log".into(), report(10)), ("/a".into(), report(1))],
                seconds: 0.0,
            },
            1000,
        );
        log.record(
            &SyncAll {
                reports: vec![
                    ("/var/log".into(), report(20)),
                    ("/a".into(), Err(anyhow::anyhow!("EIO"))),
                ],
                seconds: 0.0,
            },
            2000,
        );
        assert_eq!(log.seq, 2);
        assert_eq!(
            log.tiers[0],
            TierLog {
                dir: "/var/log".into(),
                syncs: 2,
                errors: 0,
                last_unix_ms: 2000,
                last_us: 7,
                last_bytes: 20
            }
        );
        assert_eq!((log.tiers[1].syncs, log.tiers[1].errors), (1, 1));
        assert_eq!(
            log.tiers[1].last_bytes, 1,
            "a failed sync keeps the last good one's bytes"
        );
    }
}
