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
use std::os::unix::fs::{FileExt, MetadataExt};
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

/// A hot-set path opened: no symlink followed anywhere on the way, only a
/// regular file, never a device or a FIFO (`pin::open_regular`). The set is
/// read from the partition: untrusted.
fn open_ro(path: &Path) -> Option<(std::fs::File, std::fs::Metadata)> {
    match crate::companion::pin::open_regular(path) {
        Ok(x) => Some(x),
        Err(e) => {
            log::debug!("hot set: {e:#}");
            None
        }
    }
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

/// Pages looked at a step: the `mincore` vector is this many bytes.
const WINDOW_PAGES: usize = 4096;

/// The resident runs of `f` (`size` bytes), in file order, each passed to
/// `run` as `[off, end)`: only the file's data (`SEEK_DATA`/`SEEK_HOLE`:
/// a hole costs no read, and a huge sparse file no time), one window of
/// `WINDOW_PAGES` mapped at a time, so the memory used is the same
/// whatever the file's size. False when a window could not be mapped.
fn resident_runs(f: &std::fs::File, size: u64, mut run: impl FnMut(u64, u64)) -> bool {
    use nix::unistd::{Whence, lseek};
    let page = page_size();
    let window = WINDOW_PAGES as u64 * page;
    let mut vec = vec![0u8; WINDOW_PAGES];
    let mut open_run: Option<u64> = None;
    let mut at = 0u64;
    while at < size {
        let Ok(off) = i64::try_from(at) else { break };
        // the next data at or after `at`, and where it ends
        let data = match lseek(f, off, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break, // only holes left
            Err(_) => at,                           // no SEEK_DATA: all data
        };
        let hole = lseek(f, data as i64, Whence::SeekHole).map_or(size, |h| (h as u64).min(size));
        let mut w = data / page * page;
        while w < hole {
            let len = window.min(size - w);
            let Some(nz) = usize::try_from(len).ok().and_then(NonZeroUsize::new) else {
                return false;
            };
            // SAFETY: a fresh shared read-only mapping of one window;
            // nothing is read through it.
            let Ok(addr) = (unsafe {
                nix::sys::mman::mmap(
                    None,
                    nz,
                    nix::sys::mman::ProtFlags::PROT_READ,
                    nix::sys::mman::MapFlags::MAP_SHARED,
                    f,
                    w as i64,
                )
            }) else {
                return false;
            };
            // SAFETY: `vec` has a byte for each page of the window.
            let r = unsafe { nix::libc::mincore(addr.as_ptr(), nz.get(), vec.as_mut_ptr()) };
            // SAFETY: the mapping made above, unmapped once.
            let _ = unsafe { nix::sys::mman::munmap(addr, nz.get()) };
            if r != 0 {
                return false;
            }
            for (i, b) in vec[..(len.div_ceil(page) as usize)].iter().enumerate() {
                let p = w + i as u64 * page;
                match (b & 1 == 1, open_run) {
                    (true, None) => open_run = Some(p),
                    (false, Some(s)) => {
                        run(s, p.min(size));
                        open_run = None;
                    }
                    _ => {}
                }
            }
            w += len;
        }
        // a hole ends any run
        if let Some(s) = open_run.take() {
            run(s, w.min(size));
        }
        at = w.max(hole);
    }
    if let Some(s) = open_run {
        run(s, size);
    }
    true
}

/// A tracked file as the hot set keeps it: its identity now and the ranges
/// of it in RAM now. None: gone, not a regular file, empty. Its memory is
/// bounded whatever the file's size (`resident_runs`).
pub fn capture(path: &str, heat: f64) -> Option<HotFile> {
    let (f, m) = open_ro(Path::new(path))?;
    if m.len() == 0 {
        return None;
    }
    let mut ranges = hotset::Ranges::default();
    if !resident_runs(&f, m.len(), |a, b| ranges.push(a, b)) {
        return None;
    }
    Some(HotFile {
        path: path.to_string(),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: mtime_ns(&m),
        heat,
        ranges: ranges.finish(m.len()),
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
            match open_ro(Path::new(&h.path)).and_then(|(f, _)| Some((same(&f, h)?, f))) {
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
                    Some((f, _)) if same(&f, &files[i]) == Some(id) => f,
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
            let Some((f, meta)) = open_ro(Path::new(&path)) else {
                continue;
            };
            let want: u64 = ranges.iter().map(|r| r.1).sum();
            if spent.saturating_add(want) > cap {
                continue;
            }
            // what of the hot ranges is resident: the overlap of each
            // resident run with them (at most `MAX_RANGES` each)
            let mut resident = 0u64;
            resident_runs(&f, meta.len(), |a, b| {
                for &(off, len) in &ranges {
                    let (lo, hi) = (a.max(off), b.min(off.saturating_add(len)));
                    resident += hi.saturating_sub(lo);
                }
            });
            let resident = resident.min(want);
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
    use std::path::PathBuf;

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

    /// Opens of `p` (inotify `IN_OPEN`) counted until dropped.
    struct Opens(i32);

    impl Opens {
        fn watch(p: &Path) -> Opens {
            use std::os::unix::ffi::OsStrExt;
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: plain syscalls on a fresh fd and a C string.
            unsafe {
                let fd = nix::libc::inotify_init1(nix::libc::IN_NONBLOCK | nix::libc::IN_CLOEXEC);
                assert!(fd >= 0);
                assert!(nix::libc::inotify_add_watch(fd, c.as_ptr(), nix::libc::IN_OPEN) >= 0);
                Opens(fd)
            }
        }

        fn count(&self) -> usize {
            let mut n = 0;
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: into a buffer we own.
                let r = unsafe { nix::libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
                if r <= 0 {
                    return n;
                }
                let mut at = 0usize;
                while at + 16 <= r as usize {
                    n += 1;
                    at +=
                        16 + u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                }
            }
        }
    }

    impl Drop for Opens {
        fn drop(&mut self) {
            // SAFETY: our fd, closed once.
            unsafe { nix::libc::close(self.0) };
        }
    }

    /// The review: `hotset.json` lies on the partition (untrusted) and the
    /// read-ahead opened what it named (`O_NOFOLLOW` on the last component
    /// only; `O_NONBLOCK` and `fstat` kept a FIFO or a node from being
    /// waited on or read, not from being opened). Fails without the fix:
    /// `capture` of `<d>/linkdir/file` (a symlinked dir on the way)
    /// returned the file behind it (the test stopped at that check).
    #[test]
    fn a_crafted_hot_set_opens_no_device_fifo_or_symlink() {
        let d = tempfile_dir();
        std::fs::create_dir(d.join("real")).unwrap();
        let file = d.join("real/file");
        std::fs::write(&file, vec![1u8; 8192]).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("linkdir")).unwrap();
        std::os::unix::fs::symlink(&file, d.join("link")).unwrap();
        // a FIFO nobody writes to: an open without O_NONBLOCK never returns
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut named = vec![
            d.join("linkdir/file"),
            d.join("link"),
            fifo.clone(),
            PathBuf::from("/dev/null"),
        ];
        let mut watched = vec![Opens::watch(&file), Opens::watch(&fifo)];
        // a device node of our own (mknod needs root)
        let node = d.join("node");
        if nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        )
        .is_ok()
        {
            watched.push(Opens::watch(&node));
            named.push(node);
        }
        let ino = std::fs::metadata(&file).unwrap().ino();
        let set = hotset::HotSet {
            version: hotset::VERSION,
            files: named
                .iter()
                .map(|p| HotFile {
                    path: p.display().to_string(),
                    ino,
                    size: 8192,
                    mtime_ns: 0,
                    heat: 1.0,
                    ranges: vec![(0, 8192)],
                })
                .collect(),
            ..Default::default()
        };
        let (set, dropped) = hotset::parse(&serde_json::to_vec(&set).unwrap()).unwrap();
        assert_eq!((set.files.len(), dropped), (named.len(), 0));
        let shared: SharedRef = Default::default();
        start_pass(
            Arc::new(set.files.clone()),
            true,
            1 << 30,
            Duration::from_secs(10),
            shared.clone(),
        )
        .join()
        .unwrap();
        for p in &named {
            assert!(
                capture(p.to_str().unwrap(), 1.0).is_none(),
                "{}",
                p.display()
            );
        }
        for (w, what) in watched
            .iter()
            .zip(["the file behind a symlink", "the FIFO", "the node"])
        {
            assert_eq!(w.count(), 0, "{what} was opened");
        }
        let s = shared.lock().unwrap();
        assert_eq!(s.measure.read_files, 0);
        assert_eq!(s.measure.skipped, named.len() as u64);
        drop(s);
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
