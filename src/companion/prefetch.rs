//! The hot set's executors (`hotset` plans): capturing a file's hot
//! ranges (`mincore` of a fresh mapping), the read-ahead pass at the start
//! of a boot (identity checked, ordered by FIEMAP where the filesystem
//! gives it, read at idle I/O priority within a byte and a time budget),
//! and the probe that times a hot-set file's first use.
//!
//! Both passes run on their own threads, so the daemon's loop (the tier's
//! syncs) never waits on the stick for them; they report through `Shared`.

use crate::companion::heat::FileId;
use crate::companion::hotset::{self, HotFile, Measure};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// What the passes report to the daemon's loop.
#[derive(Debug, Default)]
pub struct Shared {
    pub measure: Measure,
    /// The read-ahead is over (or was not to read).
    pub done: bool,
    /// Files of the set found in place (same identity), as the pass goes:
    /// their id as an open shows it, index in the set, and the time the
    /// read-ahead took to read them (none: not read).
    pub found: Vec<(FileId, usize, Option<u64>)>,
}

pub type SharedRef = Arc<Mutex<Shared>>;

fn open_ro(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        // a FIFO by now must not hang us; a symlink is not followed
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
        .open(path)
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64)
}

/// Which pages of `f` (`size` bytes) are resident now.
fn residency(f: &std::fs::File, size: u64) -> Option<Vec<bool>> {
    let len = usize::try_from(size).ok()?;
    let nz = NonZeroUsize::new(len)?;
    // SAFETY: a fresh shared read-only mapping; nothing is read through it.
    let addr = unsafe {
        nix::sys::mman::mmap(
            None,
            nz,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            f,
            0,
        )
    }
    .ok()?;
    let page = page_size() as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping just made.
    let r = unsafe { nix::libc::mincore(addr.as_ptr(), len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above, unmapped once.
    let _ = unsafe { nix::sys::mman::munmap(addr, len) };
    (r == 0).then(|| vec.iter().map(|b| b & 1 == 1).collect())
}

/// A tracked file as the hot set keeps it: its identity now and the ranges
/// of it in RAM now. None: gone, not a regular file, empty.
pub fn capture(path: &str, heat: f64) -> Option<HotFile> {
    let f = open_ro(Path::new(path)).ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.len() == 0 {
        return None;
    }
    let res = residency(&f, m.len())?;
    Some(HotFile {
        path: path.to_string(),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: mtime_ns(&m),
        heat,
        ranges: hotset::ranges_from_residency(&res, page_size(), m.len()),
    })
}

/// The first physical byte of `f` (FIEMAP), where the filesystem tells it:
/// ext4 does (through an overlay too), squashfs does not.
fn physical(f: &std::fs::File) -> Option<u64> {
    #[repr(C)]
    #[derive(Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    #[derive(Default)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        reserved: u32,
        extent: Extent,
    }
    let mut fm = Fiemap {
        length: u64::MAX,
        count: 1,
        ..Default::default()
    };
    // FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap), 32 bytes without extents
    let req = nix::request_code_readwrite!(b'f', 11, 32);
    // SAFETY: `fm` is a struct fiemap with room for the one extent asked for.
    let r = unsafe { nix::libc::ioctl(f.as_raw_fd(), req as _, &mut fm as *mut Fiemap) };
    (r == 0 && fm.mapped >= 1).then_some(fm.extent.physical)
}

/// This thread's I/O at idle priority: it gets the disk only when nobody
/// else wants it.
fn idle_io() -> bool {
    const IOPRIO_WHO_PROCESS: nix::libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: nix::libc::c_long = 3;
    // SAFETY: ioprio_set on the calling thread (who = 0).
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << 13,
        ) == 0
    }
}

/// Read `ranges` of `f` through the page cache; bytes read.
fn read_ranges(f: &std::fs::File, ranges: &[(u64, u64)], buf: &mut [u8]) -> u64 {
    let mut total = 0u64;
    for &(off, len) in ranges {
        let mut at = off;
        let end = off.saturating_add(len);
        while at < end {
            let want = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            match f.read_at(&mut buf[..want], at) {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    at += n as u64;
                    total += n as u64;
                }
            }
        }
    }
    total
}

/// The read-ahead pass (`read`), or with `read` false only the look-up
/// that lets the daemon time first uses (a boot that does not read ahead
/// is the comparison). Files whose identity changed are skipped.
pub fn start_pass(
    files: Arc<Vec<HotFile>>,
    read: bool,
    budget: u64,
    time: Duration,
    shared: SharedRef,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .measure
            .prefetched = read;
        if read && !idle_io() {
            log::info!("read-ahead: idle I/O priority not available; at normal priority");
        }
        // identity and place first (one file open at a time: a set can hold
        // more files than the open-file limit), then the reads in order
        let same = |f: &std::fs::File, h: &HotFile| -> Option<FileId> {
            let m = f.metadata().ok()?;
            (m.is_file() && (m.ino(), m.len(), mtime_ns(&m)) == (h.ino, h.size, h.mtime_ns))
                .then_some((m.dev(), m.ino()))
        };
        let mut ids: HashMap<usize, FileId> = HashMap::new();
        let mut phys = vec![None; files.len()];
        let mut skipped = 0u64;
        for (i, h) in files.iter().enumerate() {
            match open_ro(Path::new(&h.path))
                .ok()
                .and_then(|f| Some((same(&f, h)?, f)))
            {
                Some((id, f)) => {
                    phys[i] = physical(&f);
                    ids.insert(i, id);
                }
                None => skipped += 1,
            }
        }
        let order = hotset::order(&files, &phys, if read { budget } else { u64::MAX });
        let mut buf = vec![0u8; 1 << 20];
        let mut m = Measure {
            prefetched: read,
            ..Default::default()
        };
        for i in order {
            let Some(id) = ids.remove(&i) else { continue };
            let mut cold = None;
            if read && t0.elapsed() < time {
                let f = match open_ro(Path::new(&files[i].path)) {
                    Ok(f) if same(&f, &files[i]) == Some(id) => f,
                    _ => {
                        skipped += 1;
                        continue;
                    }
                };
                let t = Instant::now();
                let n = read_ranges(&f, &files[i].ranges, &mut buf);
                let us = t.elapsed().as_micros() as u64;
                m.read_files += 1;
                m.read_bytes += n;
                cold = Some(us);
            } else if read {
                m.cut = true;
            }
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            s.found.push((id, i, cold));
        }
        m.skipped = skipped;
        m.read_us = t0.elapsed().as_micros() as u64;
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        s.measure.prefetched = m.prefetched;
        s.measure.read_files = m.read_files;
        s.measure.read_bytes = m.read_bytes;
        s.measure.read_us = m.read_us;
        s.measure.skipped = m.skipped;
        s.measure.cut = m.cut;
        s.done = true;
    })
}

/// A first use to time: the file, its hot ranges, what the read-ahead took
/// to read it (none: it was not read ahead).
pub type FirstUse = (String, Vec<(u64, u64)>, Option<u64>);

/// Times each first use sent to it: which of the hot ranges are in RAM,
/// then a read of them (what an opener waits for), at normal priority.
/// Stops after `cap` bytes in all.
pub fn start_probe(shared: SharedRef, cap: u64) -> mpsc::Sender<FirstUse> {
    let (tx, rx) = mpsc::channel::<FirstUse>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut spent = 0u64;
        for (path, ranges, cold) in rx {
            let Ok(f) = open_ro(Path::new(&path)) else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            let want: u64 = ranges.iter().map(|r| r.1).sum();
            if spent.saturating_add(want) > cap {
                continue;
            }
            let res = residency(&f, meta.len()).unwrap_or_default();
            let page = page_size();
            let resident: u64 = ranges
                .iter()
                .map(|&(off, len)| {
                    let (a, b) = (off / page, off.saturating_add(len).div_ceil(page));
                    (a..b)
                        .filter(|p| res.get(*p as usize).copied().unwrap_or(false))
                        .count() as u64
                        * page
                })
                .sum::<u64>()
                .min(want);
            let t = Instant::now();
            let n = read_ranges(&f, &ranges, &mut buf);
            let us = t.elapsed().as_micros() as u64;
            spent += n;
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            let m = &mut s.measure;
            m.files += 1;
            m.bytes += n;
            m.resident_bytes += resident;
            m.first_use_us += us;
            m.cold_us += cold.unwrap_or(0);
        }
    });
    tx
}

/// This boot's id (the kernel's random boot id).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_reads_identity_and_resident_ranges() {
        let d = tempfile_dir();
        let p = d.join("f");
        std::fs::write(&p, vec![7u8; 3 * 4096 + 5]).unwrap();
        // just written: resident
        let h = capture(p.to_str().unwrap(), 2.0).unwrap();
        assert_eq!(h.size, 3 * 4096 + 5);
        assert_eq!(h.ranges, vec![(0, 3 * 4096 + 5)]);
        assert_eq!(h.ino, std::fs::metadata(&p).unwrap().ino());
        // a FIFO is not waited on, a missing file is none
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(capture(fifo.to_str().unwrap(), 1.0).is_none());
        assert!(capture(d.join("none").to_str().unwrap(), 1.0).is_none());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_pass_reads_what_is_in_place_and_skips_what_changed() {
        let d = tempfile_dir();
        let mut files = vec![];
        for n in ["a", "b", "c"] {
            let p = d.join(n);
            std::fs::write(&p, vec![1u8; 10_000]).unwrap();
            files.push(capture(p.to_str().unwrap(), 1.0).unwrap());
        }
        // b replaced since it was saved
        let b = d.join("b");
        std::fs::remove_file(&b).unwrap();
        std::fs::write(&b, vec![2u8; 10_000]).unwrap();
        let shared: SharedRef = Default::default();
        start_pass(
            Arc::new(files),
            true,
            1 << 30,
            Duration::from_secs(60),
            shared.clone(),
        )
        .join()
        .unwrap();
        let s = shared.lock().unwrap();
        assert!(s.done);
        assert_eq!(s.measure.skipped, 1);
        assert_eq!((s.measure.read_files, s.measure.read_bytes), (2, 20_000));
        let mut idx: Vec<usize> = s.found.iter().map(|f| f.1).collect();
        idx.sort();
        assert_eq!(idx, vec![0, 2]);
        assert!(s.found.iter().all(|f| f.2.is_some()));
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mados-prefetch-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
