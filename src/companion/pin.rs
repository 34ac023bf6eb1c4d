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
//! Driven by `companion::pinset` in the daemon (`companion::pinning`).

use crate::companion::heat::FileId;
use anyhow::{Context, Result, bail};
use nix::sys::mman::{MapFlags, ProtFlags, mlock, mmap, munlock, munmap};
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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

impl Pin {
    /// Map and lock the regular file at `path` (not following a symlink).
    pub fn new(path: &Path) -> Result<Pin> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            // O_NONBLOCK: a path that names a FIFO by now (replaced by
            // anyone who can write there) must not hang the daemon
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let m = f.metadata()?;
        if !m.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let (id, size, mtime_ns) = ident(&m);
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
        Ok(Pin {
            path: path.to_path_buf(),
            id,
            size,
            mtime_ns,
            addr,
            len,
        })
    }

    /// Whether `path` still names the pinned content (same inode, size and
    /// mtime). A file replaced or rewritten needs a new pin.
    pub fn current(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
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
