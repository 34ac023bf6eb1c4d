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
pub mod health;
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
use std::time::{Duration, Instant};

/// How long `mados-persistence sync` and the daemon's final sync wait for
/// a sync in progress (`MADOS_PERSISTENCE_LOCK_WAIT` overrides it): well
/// within the unit's `TimeoutStopSec=300`.
pub const SYNC_WAIT: Duration = Duration::from_secs(120);

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
    /// Bytes all of this boot's syncs of the tier wrote (for `status`'s
    /// "kept off the stick").
    #[serde(default)]
    pub bytes_total: u64,
    /// Why the last sync failed (`sync::fault`'s sentence, never a file
    /// name: this file is readable by all); null after a good one.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the syncs began failing (Unix ms; 0: the last one was good).
    #[serde(default)]
    pub failing_since_unix_ms: u64,
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
                    t.bytes_total = t.bytes_total.saturating_add(r.bytes);
                    t.last_error = None;
                    t.failing_since_unix_ms = 0;
                }
                Err(e) => {
                    t.errors += 1;
                    t.last_error = Some(
                        sync::fault(e)
                            .unwrap_or("the sync failed (the error is in the journal)")
                            .to_string(),
                    );
                    if t.failing_since_unix_ms == 0 {
                        t.failing_since_unix_ms = now_ms;
                    }
                }
            }
        }
    }
}

/// Sync every tier under the sync lock (the daemon and `sync` never run
/// one at the same time), waiting at most `wait` for it. Each tier's
/// manifest lives in `run`.
pub fn sync_all(run: &Path, tiers: &[Tier], wait: Duration) -> Result<SyncAll> {
    let _lock = Lock::take(&run.join("sync.lock"), Some(wait))?;
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
    // readable by all (`status` without root): tier dirs and counts only
    if let Err(e) = serde_json::to_vec(&log)
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::util::fsutil::write_atomic_mode(&run.join(SYNC_LOG), &b, 0o644))
    {
        log::warn!("counting the sync in {SYNC_LOG}: {e:#}");
    }
    Ok(out)
}

/// How long a lock is waited for: `default`, or
/// `MADOS_PERSISTENCE_LOCK_WAIT` seconds (tests, and a slow stick).
pub fn lock_wait(default: Duration) -> Duration {
    std::env::var("MADOS_PERSISTENCE_LOCK_WAIT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(default, Duration::from_secs_f64)
}

/// An exclusive `flock` on a file in /run, released when dropped (or when
/// the process dies, `kill -9` included).
///
/// The file is root's, mode 0600 (created so; an older file is
/// `fchmod`ed): `flock` needs only a read-only fd, and a lock anyone can
/// open is a lock anyone can hold. A lock held by someone else is waited
/// for at most the given time, never forever; the error names the holder.
pub struct Lock {
    _l: nix::fcntl::Flock<std::fs::File>,
}

impl Lock {
    /// Take the lock at `p`: at once or not at all (`wait` none), else
    /// polling until `wait` has passed.
    pub fn take(p: &Path, wait: Option<Duration>) -> Result<Lock> {
        use nix::fcntl::{Flock, FlockArg};
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?;
        let m = f.metadata()?;
        if !m.is_file() {
            anyhow::bail!("{} is not a regular file", p.display());
        }
        if m.mode() & 0o7777 != 0o600 {
            // left by an earlier release: nobody else may open it from now
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", p.display()))?;
        }
        let deadline = wait.map(|w| Instant::now() + w);
        loop {
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(Lock { _l: l }),
                Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                    f = back;
                    if deadline.is_none_or(|d| Instant::now() >= d) {
                        let who = holders(&m);
                        anyhow::bail!(
                            "locking {}: held by {}{}",
                            p.display(),
                            if who.is_empty() {
                                "another process".to_string()
                            } else {
                                who.join(", ")
                            },
                            wait.map_or(String::new(), |w| format!(
                                " for longer than {:.1} s",
                                w.as_secs_f64()
                            ))
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("locking {}", p.display()));
                }
            }
        }
    }
}

/// Who holds a lock on the file `m` describes, from `/proc/locks`:
/// "pid N (comm)" each.
fn holders(m: &std::fs::Metadata) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    parse_lock_holders(&text, m.dev(), m.ino())
        .into_iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({})", comm.trim())
        })
        .collect()
}

/// The pids holding (not waiting for) a lock on `dev`/`ino` in
/// `/proc/locks` text (pure).
pub fn parse_lock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let mut v: Vec<u32> = text
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:77 0 EOF"
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(5) == Some(&want.as_str()))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
        .collect();
    v.dedup();
    v
}

/// `mados-persistence sync`: every tier durable on the stick now.
pub fn sync_command(json: bool) -> Result<bool> {
    let run = run_dir();
    let st = read_state(&run)?;
    if st.tiers.is_empty() {
        let why = if st.read_only {
            "the stick is write-protected: nothing is synced to it; the changes of this boot are kept in RAM only".to_string()
        } else if st.mode != "persistent" {
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
    let all = sync_all(&run, &st.tiers, lock_wait(SYNC_WAIT))?;
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
    fn lock_holders_are_read_from_proc_locks() {
        let dev = nix::sys::stat::makedev(0, 0x1a);
        let text = "1: FLOCK  ADVISORY  WRITE 1234 00:1a:77 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 99 00:1a:77 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 55 00:1a:78 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 66 08:01:77 0 EOF\n";
        assert_eq!(parse_lock_holders(text, dev, 77), vec![1234]);
        assert!(parse_lock_holders("garbage\n", dev, 77).is_empty());
    }

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
                last_bytes: 20,
                bytes_total: 30,
                last_error: None,
                failing_since_unix_ms: 0,
            }
        );
        assert_eq!((log.tiers[1].syncs, log.tiers[1].errors), (1, 1));
        assert_eq!(
            log.tiers[1].last_error.as_deref(),
            Some("the sync failed (the error is in the journal)")
        );
        assert_eq!(log.tiers[1].failing_since_unix_ms, 2000);
        let full = std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
        log.record(
            &SyncAll {
                reports: vec![(
                    "/a".into(),
                    Err(anyhow::Error::from(full).context("copying /a/secret-name")),
                )],
                seconds: 0.0,
            },
            3000,
        );
        assert_eq!(
            log.tiers[1].last_error.as_deref(),
            Some("the persistence partition is full (ENOSPC)"),
            "the reason, no file name"
        );
        assert_eq!(
            log.tiers[1].failing_since_unix_ms, 2000,
            "since the first failure"
        );
        assert_eq!(
            log.tiers[1].last_bytes, 1,
            "a failed sync keeps the last good one's bytes"
        );
        log.record(
            &SyncAll {
                reports: vec![("/a".into(), report(3))],
                seconds: 0.0,
            },
            4000,
        );
        assert_eq!(
            (
                log.tiers[1].last_error.as_ref(),
                log.tiers[1].failing_since_unix_ms
            ),
            (None, 0)
        );
    }
}
