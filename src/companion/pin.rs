//! Keeping a file's pages in RAM (the executor for `heat::plan`): the file
//! is mapped read-only and shared, and the mapping locked (`mlock`, which
//! reads in what is not resident); unpinning unlocks and unmaps. Reads of
//! the file by anyone are then served from the page cache.
//!
//! What vmtouch's users ask for is kept: a failed `mlock` (the memlock
//! limit, memory pressure) fails that one file, never the rest;
//! `raise_memlock` lifts `RLIMIT_MEMLOCK` to the budget first; `current`
//! tells a pin whose path now names another file (replaced by a rename) or
//! changed content (size or mtime), so the caller can pin the new one and
//! release the old pages.
//!
//! Every path here is one users can change (their files, their dirs):
//! `open_regular` never follows a symlink in any component and never opens
//! anything but a regular file (the review's pty trick: a parent dir
//! swapped for a symlink to /dev/pts made the daemon take a terminal).
//!
//! Driven by `companion::pinset` in the daemon (`companion::pinning`).

use crate::companion::heat::FileId;
use anyhow::{Context, Result, bail};
use nix::sys::mman::{MapFlags, ProtFlags, mlock, mmap, munlock, munmap};
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// A locked mapping of one file, released when dropped.
#[derive(Debug)]
pub struct Pin {
    pub path: PathBuf,
    pub id: FileId,
    pub size: u64,
    pub mtime_ns: i128,
    addr: NonNull<c_void>,
    len: usize,
}

// The mapping is owned by this value alone; nothing reads through `addr`.
unsafe impl Send for Pin {}

fn ident(m: &std::fs::Metadata) -> (FileId, u64, i128) {
    (
        (m.dev(), m.ino()),
        m.len(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    )
}

/// Why `path` could not be resolved or opened, with a word for the cases
/// a user's tree gives (a symlink on the way, an old kernel).
fn context(path: &Path, e: std::io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        anyhow::anyhow!(
            "opening {}: a symlink on the way (not followed)",
            path.display()
        )
    } else {
        anyhow::Error::from(e).context(format!("opening {}", path.display()))
    }
}

/// What `path` names now, without following a symlink anywhere on the
/// way and without opening it (`util::safefs::resolve_path`).
pub fn stat_nofollow(path: &Path) -> Result<std::fs::Metadata> {
    let fd = crate::util::safefs::resolve_path(path).map_err(|e| context(path, e))?;
    Ok(std::fs::File::from(fd).metadata()?)
}

/// Open the regular file at `path` for reading, as the daemon must open
/// any path users can change (a hot path, a hot-set entry read from the
/// partition): `util::safefs::open_regular_path` (no symlink followed in
/// any component, a regular file by `fstat` before it is opened, through
/// that very inode, `O_NOCTTY|O_NONBLOCK`). A device node, a FIFO or a
/// socket is never opened; a swapped parent dir is refused.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata)> {
    let (f, _) = crate::util::safefs::open_regular_path(path).map_err(|e| context(path, e))?;
    let m = f.metadata()?;
    Ok((f, m))
}

impl Pin {
    /// Map and lock the regular file at `path` (`open_regular`), whatever
    /// its size. The daemon uses `new_within`.
    pub fn new(path: &Path) -> Result<Pin> {
        Pin::new_within(path, u64::MAX)?
            .with_context(|| format!("{} is too large to map", path.display()))
    }

    /// Map and lock the regular file at `path` if its size (`fstat` of the
    /// open file) is at most `max` bytes; `None` when it is larger. What is
    /// mapped and locked is that size: a file grown since is not mapped
    /// past it, so the locked bytes never exceed `max`.
    pub fn new_within(path: &Path, max: u64) -> Result<Option<Pin>> {
        let (f, m) = open_regular(path)?;
        let (id, size, mtime_ns) = ident(&m);
        if size > max {
            return Ok(None);
        }
        let len = usize::try_from(size).context("file too large to map")?;
        let Some(nz) = NonZeroUsize::new(len) else {
            bail!("{} is empty", path.display());
        };
        // SAFETY: a fresh shared read-only mapping of a file we opened;
        // nothing is read through it here.
        let addr = unsafe { mmap(None, nz, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, &f, 0) }
            .with_context(|| format!("mapping {}", path.display()))?;
        // SAFETY: `addr`/`len` is the mapping just made.
        if let Err(e) = unsafe { mlock(addr, len) } {
            // SAFETY: as above; unmapped once, here.
            let _ = unsafe { munmap(addr, len) };
            return Err(e).with_context(|| format!("locking {} ({len} bytes)", path.display()));
        }
        Ok(Some(Pin {
            path: path.to_path_buf(),
            id,
            size,
            mtime_ns,
            addr,
            len,
        }))
    }

    /// Whether `path` still names the pinned content (same inode, size and
    /// mtime). A file replaced or rewritten needs a new pin.
    pub fn current(&self) -> bool {
        stat_nofollow(&self.path)
            .is_ok_and(|m| m.is_file() && ident(&m) == (self.id, self.size, self.mtime_ns))
    }

    /// Pages of the mapping resident in RAM now (`mincore`).
    pub fn resident_pages(&self) -> Result<usize> {
        let page =
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.map_or(4096, |p| p as usize);
        let mut vec = vec![0u8; self.len.div_ceil(page)];
        // SAFETY: `vec` has one byte per page of the mapping.
        let r = unsafe { nix::libc::mincore(self.addr.as_ptr(), self.len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("mincore");
        }
        Ok(vec.iter().filter(|b| **b & 1 == 1).count())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made and nobody else holds.
        unsafe {
            let _ = munlock(self.addr, self.len);
            let _ = munmap(self.addr, self.len);
        }
    }
}

/// Let this process lock `bytes`: raise `RLIMIT_MEMLOCK` to it (the hard
/// limit too, which needs `CAP_SYS_RESOURCE`), else as far as the hard
/// limit allows. Returns the soft limit now in force. (With
/// `CAP_IPC_LOCK`, as root usually has, the limit does not apply at all.)
pub fn raise_memlock(bytes: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK)?;
    if soft >= bytes {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_MEMLOCK, bytes, hard.max(bytes)).is_ok() {
        return Ok(bytes);
    }
    let to = bytes.min(hard);
    setrlimit(Resource::RLIMIT_MEMLOCK, to, hard).context("raising RLIMIT_MEMLOCK")?;
    Ok(to)
}

/// Memory this process has locked now (`VmLck`), in KiB.
pub fn locked_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_lck_kb() -> u64 {
        locked_kib().unwrap()
    }

    #[test]
    fn a_pinned_file_is_resident_and_locked_until_dropped() {
        if !crate::util::testutil::is_root() {
            eprintln!("skipped: mlock of 1 MiB needs root (RLIMIT_MEMLOCK)");
            return;
        }
        let d = crate::util::testutil::tmp("pin");
        let f = d.join("hot");
        std::fs::write(&f, vec![7u8; 1 << 20]).unwrap();
        assert!(raise_memlock(64 << 20).unwrap() >= 2 << 20);
        let before = vm_lck_kb();
        let p = Pin::new(&f).unwrap();
        assert_eq!(p.resident_pages().unwrap(), (1 << 20) / 4096);
        assert!(vm_lck_kb() >= before + 1024, "locked: {} kB", vm_lck_kb());
        assert!(p.current());
        // replaced by a rename (an editor, a package manager): not current
        let new = d.join("hot.new");
        std::fs::write(&new, vec![8u8; 1 << 20]).unwrap();
        std::fs::rename(&new, &f).unwrap();
        assert!(!p.current());
        drop(p);
        assert!(vm_lck_kb() < before + 1024);
        // what cannot be pinned fails alone, with the reason
        std::fs::write(d.join("empty"), b"").unwrap();
        assert!(format!("{:#}", Pin::new(&d.join("empty")).unwrap_err()).contains("empty"));
        std::os::unix::fs::symlink(&f, d.join("link")).unwrap();
        assert!(
            Pin::new(&d.join("link")).is_err(),
            "a symlink is not followed"
        );
        // a FIFO in its place (anyone may make one in /tmp): refused, not
        // waited on
        nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert!(
            format!("{:#}", Pin::new(&d.join("fifo")).unwrap_err()).contains("not a regular file")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
