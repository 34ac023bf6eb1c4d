//! Live stats in shared memory: a small fixed-layout, versioned block at
//! `/run/mados-persistence/stats` that the daemon writes through `mmap` and
//! `status` reads the same way, with no IPC round trip. A seqlock keeps
//! reads consistent: the daemon (the only writer) makes the sequence odd,
//! writes, makes it even; a reader copies the block and retries when the
//! sequence was odd or moved. The daemon never waits for a reader.
//!
//! Layout (all little-endian u64 words, `BYTES` in all):
//!
//! | word | header |
//! |---|---|
//! | 0 | magic `MADOSTAT` |
//! | 1 | layout version (`VERSION`) |
//! | 2 | sequence (odd while the daemon writes) |
//! | 3 | daemon pid (0 once it stopped) |
//! | 4, 5 | daemon start, last update (Unix ms) |
//! | 6 | number of tiers (≤ `MAX_TIERS`) |
//! | 7 | flags: bit 0 tier above 90% of its budget, bit 1 stopped cleanly |
//! | 8..=12 | cleanup runs, files removed, bytes freed, deleted-but-open bytes, deleted-but-open files |
//! | 13, 14 | tier RAM budget, tier RAM used (bytes) |
//! | 15 | last cleanup (Unix ms) |
//!
//! Then `MAX_TIERS` slots of 16 words: the tier dir (64 bytes, NUL-padded,
//! cut at a character boundary), RAM bytes, dirty files, dirty bytes, last
//! sync (Unix ms), its duration (µs), its bytes written, syncs, sync errors.
//!
//! Then the pinning (`PIN_WORDS`, version 2 on): files tracked, opens
//! counted, queue overflows, files pinned, bytes pinned, the budget in
//! force, pins that failed, the last pin decision (Unix ms). Flag bit 2:
//! pinning is on.
//!
//! Then the health (`HEALTH_WORDS`, version 3 on): bytes seen written into
//! the RAM tiers, into the tmpfs dirs, bytes the syncs of this boot wrote
//! to the stick, the oldest change not yet synced and the next sync due
//! (Unix ms; 0: none), files tracked, event queue overflows, then flags
//! (bit 0: the counting is on; bit 1: a tmpfs dir is not counted). A
//! version 2 block (a daemon started before an upgrade) is still read,
//! with no health.
//!
//! Written by hand (no crate does a cross-process seqlock over a file
//! mapping): each word is an `AtomicU64` in the mapping, so the copy is
//! defined behaviour even while the daemon writes.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::fs;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering, fence};

pub const STATS_FILE: &str = "stats";
pub const MAGIC: u64 = u64::from_le_bytes(*b"MADOSTAT");
pub const VERSION: u64 = 3;
pub const MAX_TIERS: usize = 8;
const HEADER: usize = 16;
const SLOT: usize = 16;
const NAME_WORDS: usize = 8;
const PIN_AT: usize = HEADER + MAX_TIERS * SLOT;
const PIN_WORDS: usize = 8;
const HEALTH_AT: usize = PIN_AT + PIN_WORDS;
const HEALTH_WORDS: usize = 8;
pub const WORDS: usize = HEALTH_AT + HEALTH_WORDS;
pub const BYTES: usize = WORDS * 8;
/// The size of a version 2 block (no health words).
const BYTES_V2: usize = HEALTH_AT * 8;
const W_SEQ: usize = 2;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TierStats {
    pub dir: String,
    pub ram_bytes: u64,
    pub dirty_files: u64,
    pub dirty_bytes: u64,
    /// Unix ms of the last sync that finished (ok or not); 0: none yet.
    pub last_sync_unix_ms: u64,
    pub last_sync_us: u64,
    pub last_sync_bytes: u64,
    pub syncs: u64,
    pub sync_errors: u64,
}

/// What the daemon pins (`companion::pinset`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PinStats {
    pub enabled: bool,
    pub tracked_files: u64,
    pub open_events: u64,
    pub overflows: u64,
    pub pinned_files: u64,
    pub pinned_bytes: u64,
    /// The budget in force (it shrinks under memory pressure).
    pub budget: u64,
    pub failures: u64,
    pub last_plan_unix_ms: u64,
}

/// What the RAM kept off the stick and what is at risk now
/// (`companion::health`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HealthStats {
    /// The daemon counts bytes written (off: `MADOS_PERSISTENCE_HEALTH=off`,
    /// no fanotify, or a daemon of an older release).
    pub tracking: bool,
    /// Some tmpfs dir could not be watched: its bytes are not in
    /// `tmpfs_written` (the daemon's log names it).
    pub tmpfs_uncounted: bool,
    pub tier_written: u64,
    pub tmpfs_written: u64,
    /// Bytes this boot's syncs wrote to the stick.
    pub synced: u64,
    /// The oldest change not yet synced (Unix ms; 0: none).
    pub oldest_dirty_unix_ms: u64,
    /// When the daemon syncs next at the latest (Unix ms; 0: no tier).
    pub next_sync_unix_ms: u64,
    pub tracked_files: u64,
    pub overflows: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// The daemon's pid; 0 once it stopped.
    pub pid: u64,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub tier_full: bool,
    pub stopped: bool,
    pub cleanup_runs: u64,
    pub cleanup_files: u64,
    pub cleanup_bytes: u64,
    pub deleted_open_bytes: u64,
    pub deleted_open_files: u64,
    pub tier_budget: u64,
    pub tier_used: u64,
    pub last_cleanup_unix_ms: u64,
    pub tiers: Vec<TierStats>,
    pub pin: PinStats,
    pub health: HealthStats,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn put_name(w: &mut [u64], name: &str) {
    let mut end = name.len().min(NAME_WORDS * 8);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = [0u8; NAME_WORDS * 8];
    b[..end].copy_from_slice(&name.as_bytes()[..end]);
    for (i, c) in b.chunks_exact(8).enumerate() {
        w[i] = u64::from_le_bytes(c.try_into().unwrap());
    }
}

fn get_name(w: &[u64]) -> String {
    let b: Vec<u8> = w[..NAME_WORDS]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The block's words for `s` (the sequence word left 0). Tiers past
/// `MAX_TIERS` are not shown.
pub fn encode(s: &Stats) -> [u64; WORDS] {
    let mut w = [0u64; WORDS];
    let n = s.tiers.len().min(MAX_TIERS);
    w[0] = MAGIC;
    w[1] = VERSION;
    w[3] = s.pid;
    w[4] = s.started_unix_ms;
    w[5] = s.updated_unix_ms;
    w[6] = n as u64;
    w[7] = u64::from(s.tier_full) | (u64::from(s.stopped) << 1) | (u64::from(s.pin.enabled) << 2);
    w[8] = s.cleanup_runs;
    w[9] = s.cleanup_files;
    w[10] = s.cleanup_bytes;
    w[11] = s.deleted_open_bytes;
    w[12] = s.deleted_open_files;
    w[13] = s.tier_budget;
    w[14] = s.tier_used;
    w[15] = s.last_cleanup_unix_ms;
    for (i, t) in s.tiers.iter().take(n).enumerate() {
        let o = HEADER + i * SLOT;
        put_name(&mut w[o..o + NAME_WORDS], &t.dir);
        let v = &mut w[o + NAME_WORDS..o + SLOT];
        v.copy_from_slice(&[
            t.ram_bytes,
            t.dirty_files,
            t.dirty_bytes,
            t.last_sync_unix_ms,
            t.last_sync_us,
            t.last_sync_bytes,
            t.syncs,
            t.sync_errors,
        ]);
    }
    let p = &s.pin;
    w[PIN_AT..HEALTH_AT].copy_from_slice(&[
        p.tracked_files,
        p.open_events,
        p.overflows,
        p.pinned_files,
        p.pinned_bytes,
        p.budget,
        p.failures,
        p.last_plan_unix_ms,
    ]);
    let h = &s.health;
    w[HEALTH_AT..].copy_from_slice(&[
        h.tier_written,
        h.tmpfs_written,
        h.synced,
        h.oldest_dirty_unix_ms,
        h.next_sync_unix_ms,
        h.tracked_files,
        h.overflows,
        // flags: bit 0 tracking, bit 1 a tmpfs dir not counted
        u64::from(h.tracking) | (u64::from(h.tmpfs_uncounted) << 1),
    ]);
    w
}

/// Read a block's words back; refuses another magic or version and a tier
/// count past the slots (the file is input like any other).
pub fn decode(w: &[u64; WORDS]) -> Result<Stats> {
    if w[0] != MAGIC {
        bail!("not a mados-persistence stats block (bad magic)");
    }
    if w[1] != VERSION && w[1] != 2 {
        bail!(
            "stats block version {} (this program reads {VERSION})",
            w[1]
        );
    }
    let n = usize::try_from(w[6]).unwrap_or(usize::MAX);
    if n > MAX_TIERS {
        bail!("stats block claims {n} tiers (at most {MAX_TIERS})");
    }
    let tiers = (0..n)
        .map(|i| {
            let o = HEADER + i * SLOT;
            let v = &w[o + NAME_WORDS..o + SLOT];
            TierStats {
                dir: get_name(&w[o..o + NAME_WORDS]),
                ram_bytes: v[0],
                dirty_files: v[1],
                dirty_bytes: v[2],
                last_sync_unix_ms: v[3],
                last_sync_us: v[4],
                last_sync_bytes: v[5],
                syncs: v[6],
                sync_errors: v[7],
            }
        })
        .collect();
    Ok(Stats {
        pid: w[3],
        started_unix_ms: w[4],
        updated_unix_ms: w[5],
        tier_full: w[7] & 1 != 0,
        stopped: w[7] & 2 != 0,
        cleanup_runs: w[8],
        cleanup_files: w[9],
        cleanup_bytes: w[10],
        deleted_open_bytes: w[11],
        deleted_open_files: w[12],
        tier_budget: w[13],
        tier_used: w[14],
        last_cleanup_unix_ms: w[15],
        tiers,
        pin: PinStats {
            enabled: w[7] & 4 != 0,
            tracked_files: w[PIN_AT],
            open_events: w[PIN_AT + 1],
            overflows: w[PIN_AT + 2],
            pinned_files: w[PIN_AT + 3],
            pinned_bytes: w[PIN_AT + 4],
            budget: w[PIN_AT + 5],
            failures: w[PIN_AT + 6],
            last_plan_unix_ms: w[PIN_AT + 7],
        },
        // a version 2 block's words past the pinning are the zeros `read` padded
        health: HealthStats {
            tier_written: w[HEALTH_AT],
            tmpfs_written: w[HEALTH_AT + 1],
            synced: w[HEALTH_AT + 2],
            oldest_dirty_unix_ms: w[HEALTH_AT + 3],
            next_sync_unix_ms: w[HEALTH_AT + 4],
            tracked_files: w[HEALTH_AT + 5],
            overflows: w[HEALTH_AT + 6],
            tracking: w[1] >= 3 && w[HEALTH_AT + 7] & 1 != 0,
            tmpfs_uncounted: w[1] >= 3 && w[HEALTH_AT + 7] & 2 != 0,
        },
    })
}

/// A shared mapping of the block's file.
struct Map {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

impl Map {
    fn new(f: &fs::File, write: bool) -> Result<Map> {
        Self::new_len(f, write, BYTES)
    }

    /// A mapping of `len` bytes (`BYTES`, or a version 2 block's).
    fn new_len(f: &fs::File, write: bool, len: usize) -> Result<Map> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        let prot = if write {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of BYTES bytes of a file at least
        // that long (checked by the callers); only accessed as atomics.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).unwrap(),
                prot,
                MapFlags::MAP_SHARED,
                f.as_fd(),
                0,
            )
        }
        .context("mapping the stats block")?;
        Ok(Map { ptr, len })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes long (a multiple of 8),
        // page-aligned, lives as long as self, and every access goes
        // through AtomicU64.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const AtomicU64, self.len / 8) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; no reference outlives self.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// The daemon's side: the only writer.
pub struct Writer {
    map: Map,
    _file: fs::File,
}

impl Writer {
    /// Make a new block at `path` (built aside and renamed in, so a reader
    /// never maps a half-made file) holding `s`.
    pub fn create(path: &Path, s: &Stats) -> Result<Writer> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("new");
        let _ = fs::remove_file(&tmp);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.set_len(BYTES as u64)
            .with_context(|| format!("sizing {}", tmp.display()))?;
        let w = Writer {
            map: Map::new(&f, true)?,
            _file: f,
        };
        w.publish(s);
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(w)
    }

    /// Publish `s`: sequence odd, the words, sequence even. Never blocks.
    pub fn publish(&self, s: &Stats) {
        let new = encode(s);
        let words = self.map.words();
        let seq = words[W_SEQ].load(Ordering::Relaxed);
        words[W_SEQ].store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, v) in new.iter().enumerate() {
            if i != W_SEQ {
                words[i].store(*v, Ordering::Relaxed);
            }
        }
        words[W_SEQ].store((seq | 1).wrapping_add(1), Ordering::Release);
    }
}

/// A consistent copy of the words, or `None` if the writer was busy every
/// time in `tries` attempts.
fn snapshot(words: &[AtomicU64], tries: usize) -> Option<[u64; WORDS]> {
    for _ in 0..tries {
        let s1 = words[W_SEQ].load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let mut out = [0u64; WORDS];
        for (o, w) in out.iter_mut().zip(words.iter()) {
            *o = w.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if words[W_SEQ].load(Ordering::Relaxed) == s1 {
            return Some(out);
        }
    }
    None
}

/// Read the block at `path`: `Ok(None)` when there is none (no daemon has
/// run this boot).
pub fn read(path: &Path) -> Result<Option<Stats>> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let len = f.metadata()?.len();
    if len != BYTES as u64 && len != BYTES_V2 as u64 {
        bail!(
            "{} is {len} bytes, not the {BYTES} of stats layout {VERSION}",
            path.display()
        );
    }
    let map = Map::new_len(&f, false, len as usize)?;
    // a reader preempted mid-copy tries again; after a pause if it must
    let w = (0..20)
        .find_map(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            snapshot(map.words(), 10_000)
        })
        .with_context(|| format!("{}: the daemon kept writing it", path.display()))?;
    decode(&w).map(Some)
}

/// Whether the daemon that wrote `s` is alive: its pid runs this same
/// program (the same `comm` as the reader's; a reused pid runs another).
pub fn daemon_alive(s: &Stats) -> bool {
    if s.pid == 0 || s.stopped {
        return false;
    }
    let comm = |p: &str| fs::read_to_string(p).ok().map(|c| c.trim().to_string());
    match (
        comm(&format!("/proc/{}/comm", s.pid)),
        comm("/proc/self/comm"),
    ) {
        (Some(theirs), Some(ours)) => !ours.is_empty() && theirs == ours,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stats {
        Stats {
            pid: 4242,
            started_unix_ms: 1_700_000_000_000,
            updated_unix_ms: 1_700_000_005_000,
            tier_full: true,
            stopped: false,
            cleanup_runs: 3,
            cleanup_files: 17,
            cleanup_bytes: 1 << 20,
            deleted_open_bytes: 5 << 20,
            deleted_open_files: 2,
            tier_budget: 1 << 30,
            tier_used: 12345,
            last_cleanup_unix_ms: 9,
            tiers: vec![
                TierStats {
                    dir: "/var/log".into(),
                    ram_bytes: 4096,
                    dirty_files: 2,
                    dirty_bytes: 100,
                    last_sync_unix_ms: 1_700_000_004_000,
                    last_sync_us: 1500,
                    last_sync_bytes: 8192,
                    syncs: 4,
                    sync_errors: 1,
                },
                TierStats {
                    dir: "/home/live/.cache".into(),
                    ..Default::default()
                },
            ],
            pin: PinStats {
                enabled: true,
                tracked_files: 812,
                open_events: 90_000,
                overflows: 1,
                pinned_files: 14,
                pinned_bytes: 93 << 20,
                budget: 512 << 20,
                failures: 2,
                last_plan_unix_ms: 1_700_000_004_500,
            },
            health: HealthStats {
                tracking: true,
                tmpfs_uncounted: true,
                tier_written: 90 << 20,
                tmpfs_written: 300 << 20,
                synced: 12 << 20,
                oldest_dirty_unix_ms: 1_700_000_003_000,
                next_sync_unix_ms: 1_700_000_030_000,
                tracked_files: 55,
                overflows: 1,
            },
        }
    }

    #[test]
    fn a_version_2_block_is_read_without_health() {
        // a daemon started before an upgrade keeps its older, shorter block
        let dir = std::env::temp_dir().join(format!("mados-stats-v2-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut w = encode(&sample());
        w[1] = 2;
        let b: Vec<u8> = w[..BYTES_V2 / 8]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        fs::write(dir.join("v2"), &b).unwrap();
        let back = read(&dir.join("v2")).unwrap().unwrap();
        assert_eq!(back.health, HealthStats::default());
        assert_eq!(back.pin, sample().pin);
        assert_eq!(back.tiers, sample().tiers);
        // any other length is refused
        fs::write(dir.join("odd"), &b[..b.len() - 8]).unwrap();
        assert!(read(&dir.join("odd")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
    }

    #[test]
    fn refuses_foreign_blocks() {
        let mut w = encode(&sample());
        w[0] ^= 1;
        assert!(decode(&w).unwrap_err().to_string().contains("magic"));
        let mut w = encode(&sample());
        w[1] = 1; // the layout before the pinning words
        assert!(decode(&w).unwrap_err().to_string().contains("version 1"));
        let mut w = encode(&sample());
        w[6] = u64::MAX;
        assert!(decode(&w).unwrap_err().to_string().contains("tiers"));
    }

    #[test]
    fn long_names_cut_at_a_character_boundary() {
        let mut s = sample();
        // 63 ASCII bytes then a 2-byte character: it does not fit whole
        s.tiers[1].dir = format!("/{}é/x", "a".repeat(62));
        let back = decode(&encode(&s)).unwrap();
        assert_eq!(back.tiers[1].dir, format!("/{}", "a".repeat(62)));
        s.tiers = (0..12)
            .map(|i| TierStats {
                dir: format!("/t{i}"),
                ..Default::default()
            })
            .collect();
        assert_eq!(decode(&encode(&s)).unwrap().tiers.len(), MAX_TIERS);
    }

    #[test]
    fn a_reader_never_sees_a_torn_block() {
        // one writer publishing blocks whose every number is the same
        // value; readers must only ever see blocks made of one value
        let dir = std::env::temp_dir().join(format!("mados-stats-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(STATS_FILE);
        let block = |v: u64| Stats {
            pid: v,
            started_unix_ms: v,
            updated_unix_ms: v,
            cleanup_runs: v,
            tiers: vec![TierStats {
                dir: "/var/log".into(),
                ram_bytes: v,
                syncs: v,
                ..Default::default()
            }],
            pin: PinStats {
                pinned_bytes: v,
                ..Default::default()
            },
            ..Default::default()
        };
        let w = Writer::create(&p, &block(0)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                // stops the writer however this thread ends (a failed
                // assertion included)
                struct Stop(std::sync::Arc<std::sync::atomic::AtomicBool>);
                impl Drop for Stop {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::Relaxed);
                    }
                }
                let _stop = Stop(stop);
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..3000 {
                    let s = read(&p).unwrap().unwrap();
                    let v = s.pid;
                    assert!(
                        [s.started_unix_ms, s.updated_unix_ms, s.cleanup_runs]
                            .iter()
                            .chain(
                                [s.tiers[0].ram_bytes, s.tiers[0].syncs, s.pin.pinned_bytes].iter()
                            )
                            .all(|&x| x == v),
                        "torn read: {s:?}"
                    );
                    seen.insert(v);
                }
                seen.len()
            })
        };
        let mut v = 0u64;
        while !stop.load(Ordering::Relaxed) {
            v += 1;
            w.publish(&block(v));
            // the daemon publishes about once a second; here as often as a
            // reader can still finish a copy between two publishes
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(50) {
                std::hint::spin_loop();
            }
        }
        let distinct = reader.join().unwrap();
        assert!(distinct > 1, "the reader saw only one version");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn alive_only_when_the_pid_runs_this_program() {
        let me = Stats {
            pid: u64::from(std::process::id()),
            ..Default::default()
        };
        assert!(daemon_alive(&me));
        assert!(!daemon_alive(&Stats {
            stopped: true,
            ..me.clone()
        }));
        assert!(!daemon_alive(&Stats {
            pid: 0,
            ..me.clone()
        }));
        // a pid now used by another program
        let mut other = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let o = Stats {
            pid: u64::from(other.id()),
            ..Default::default()
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let alive = daemon_alive(&o);
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(!alive);
    }

    #[test]
    fn missing_and_wrong_sized_files() {
        let dir = std::env::temp_dir().join(format!("mados-stats2-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir.join("none")).unwrap(), None);
        fs::write(dir.join("short"), b"MADOSTAT").unwrap();
        assert!(read(&dir.join("short")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
