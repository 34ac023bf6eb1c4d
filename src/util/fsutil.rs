//! Small filesystem helpers without an external program: copying a tree
//! with owners, modes and symlinks kept (seeding `/home` on a new partition,
//! and saving RAM uppers), atomic file writes, and a writeback hint.

use anyhow::{Context, Result};
use std::fs;

use std::path::Path;

/// Create `to` as a copy of the directory `from`, all or nothing: the copy
/// goes to a temporary sibling (`.NAME.seeding`, a stale one from a cut is
/// removed first), is synced, and is renamed to `to`. `to` must not exist.
/// Its owner and mode are those of the real directory `from` names (when
/// `from` is a symlink, of its target, never the link's 0777). The copy
/// is `util::treecopy`'s (by fd, owners, modes, links, attributes).
pub fn copy_tree_atomic(from: &Path, to: &Path) -> Result<()> {
    let name = to
        .file_name()
        .with_context(|| format!("{} has no name", to.display()))?;
    let tmp = to.with_file_name(format!(".{}.seeding", name.to_string_lossy()));
    crate::util::overlayfs::remove_all(&tmp)
        .with_context(|| format!("removing the stale {}", tmp.display()))?;
    // the live image's dir itself may be a symlink: its target is copied
    let real = fs::canonicalize(from).with_context(|| format!("reading {}", from.display()))?;
    let r = crate::util::treecopy::copy(&real, &tmp)?;
    for n in &r.not_carried {
        log::warn!("seeding {}: {n}", to.display());
    }
    let d = fs::File::open(&tmp)?;
    nix::unistd::syncfs(&d).context("syncing the copy")?;
    fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    if let Some(parent) = to.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

/// Write via a temporary file, fsync, rename, fsync the directory: readers
/// never see half a file, and after a cut the file is the old or the new.
/// The temporary file is created without following a symlink.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o666)
}

/// `write_atomic` with the new file's mode (before the umask): 0o600 for
/// what only root may read.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // a name of this process's own: two writers of the same file (two
    // commands at once) never share a temp file
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    remove_stale_temps(dir, &name);
    Ok(())
}

/// The temp files of `name` that a writer left when it was cut or killed:
/// `.NAME.PID.N.tmp` whose PID runs no more. Those of a live process (a
/// writer at work, or this one's other threads) are kept.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let file = e.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((pid, seq)) = rest.split_once('.') else {
            continue;
        };
        if pid.parse::<u32>().is_err() || seq.parse::<u64>().is_err() {
            continue;
        }
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        // unlink: a symlink of that name is removed itself, never followed
        let _ = fs::remove_file(e.path());
    }
}

/// Read a small control file without following a symlink: only a regular
/// file of at most `max` bytes is read (a file on a stick is untrusted).
pub fn read_nofollow(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if m.len() > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    let mut b = Vec::with_capacity(m.len() as usize);
    f.take(max).read_to_end(&mut b)?;
    Ok(b)
}

/// Whether `path` itself exists (a symlink counts as itself, not its target).
pub fn exists_nofollow(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Start writing back `f`'s dirty pages now, without waiting and without a
/// journal commit (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): ext4 then
/// allocates the blocks now, so the caller's one `syncfs` commits the
/// allocations with everything else instead of in a second transaction.
/// Only a hint: an error is ignored (the `syncfs` that follows is checked).
pub fn start_writeback(f: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a valid, open descriptor; no memory passed.
    let _ = unsafe {
        nix::libc::sync_file_range(f.as_raw_fd(), 0, 0, nix::libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// Fold the CRC-32 of `n` zero bytes into `h` in O(log n) (a hole of a
/// sparse file: an exabyte of them costs microseconds, not years).
pub fn crc_zeros(h: &mut crc32fast::Hasher, n: u64) {
    const BLOCK: usize = 4096;
    let mut block = crc32fast::Hasher::new();
    block.update(&[0u8; BLOCK]);
    let mut k = n / BLOCK as u64;
    // zeros are zeros: the order the blocks are combined in is free
    while k > 0 {
        if k & 1 == 1 {
            h.combine(&block);
        }
        let twice = block.clone();
        block.combine(&twice);
        k >>= 1;
    }
    h.update(&[0u8; BLOCK][..(n % BLOCK as u64) as usize]);
}

/// What `copy_sparse` hashes the bytes it carries into: the data read,
/// and each hole as a run of zeros that is never made (an exabyte-long
/// hole must cost no time, so `zeros` is O(1) or O(log n)).
pub trait Hashing {
    fn data(&mut self, b: &[u8]);
    fn zeros(&mut self, n: u64);
}

impl Hashing for crc32fast::Hasher {
    fn data(&mut self, b: &[u8]) {
        self.update(b);
    }
    fn zeros(&mut self, n: u64) {
        crc_zeros(self, n);
    }
}

/// Copy `[start, len)` of `from` into `to` at the same offsets (`to`:
/// `None` only hashes), reading only the data regions (`SEEK_DATA`/
/// `SEEK_HOLE`): holes stay holes and cost nothing, and are hashed as
/// zeros into `h`. `to` ends at the length copied (`set_len`). Returns the
/// offset reached (less than `len` when `from` shrank meanwhile) and the
/// bytes read from data regions.
pub fn copy_sparse(
    from: &fs::File,
    to: Option<&fs::File>,
    start: u64,
    len: u64,
    mut h: Option<&mut dyn Hashing>,
) -> std::io::Result<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let (mut pos, mut data_bytes) = (start, 0u64);
    let off =
        |v: u64| i64::try_from(v).map_err(|_| std::io::Error::from_raw_os_error(nix::libc::EFBIG));
    while pos < len {
        let data = match lseek(from, off(pos)?, Whence::SeekData) {
            Ok(d) => (d as u64).min(len),
            Err(nix::errno::Errno::ENXIO) => len, // only a hole to the end
            Err(_) => pos,                        // no SEEK_DATA: read it all
        };
        if let Some(h) = h.as_deref_mut() {
            h.zeros(data - pos);
        }
        pos = data;
        if pos >= len {
            break;
        }
        let hole = match lseek(from, off(pos)?, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(_) => len,
        };
        while pos < hole {
            let want = (hole - pos).min(CHUNK as u64) as usize;
            let n = nix::sys::uio::pread(from, &mut buf[..want], off(pos)?)
                .map_err(std::io::Error::from)?;
            if n == 0 {
                break; // the file shrank while we read it
            }
            if let Some(t) = to {
                let mut done = 0;
                while done < n {
                    done += nix::sys::uio::pwrite(t, &buf[done..n], off(pos + done as u64)?)
                        .map_err(std::io::Error::from)?;
                }
            }
            if let Some(h) = h.as_deref_mut() {
                h.data(&buf[..n]);
            }
            pos += n as u64;
            data_bytes += n as u64;
        }
        if pos < hole {
            break;
        }
    }
    if let Some(t) = to {
        t.set_len(pos)?;
    }
    Ok((pos, data_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn holes_are_hashed_as_zeros_without_reading_them() {
        for n in [0u64, 1, 4095, 4096, 4097, 3 << 20, (5 << 20) + 17] {
            let mut a = crc32fast::Hasher::new();
            a.update(b"head");
            let mut b = a.clone();
            crc_zeros(&mut a, n);
            b.update(&vec![0u8; n as usize]);
            assert_eq!(a.finalize(), b.finalize(), "{n} zeros");
        }
        // an exabyte-long sparse file: its copy and hash take no time
        let d = crate::util::testutil::tmp("sparse-huge");
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.join("big"))
            .unwrap();
        f.set_len(1 << 60)
            .unwrap_or_else(|_| f.set_len(1 << 40).unwrap());
        nix::sys::uio::pwrite(&f, b"tail", 1 << 30).unwrap();
        let len = f.metadata().unwrap().len();
        let t0 = std::time::Instant::now();
        let mut h = crc32fast::Hasher::new();
        let (pos, data) = copy_sparse(&f, None, 0, len, Some(&mut h)).unwrap();
        assert_eq!(pos, len);
        assert!(
            data <= 1 << 20,
            "read {data} bytes of a file of 4 data bytes"
        );
        assert!(t0.elapsed().as_secs() < 5, "{:?}", t0.elapsed());
        // a copy keeps the holes and the bytes
        let g = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.join("copy"))
            .unwrap();
        copy_sparse(&f, Some(&g), 0, 4 << 30, None).unwrap();
        let mut got = [0u8; 4];
        nix::sys::uio::pread(&g, &mut got, 1 << 30).unwrap();
        assert_eq!(&got, b"tail");
        use std::os::unix::fs::MetadataExt;
        assert!(g.metadata().unwrap().blocks() < 1024, "holes were written");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_for_root_only_is_never_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let d = crate::util::testutil::tmp("atomic-mode");
        write_atomic_mode(&d.join("pinned.json"), b"{}", 0o600).unwrap();
        let m = fs::metadata(d.join("pinned.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn temps_left_by_a_writer_that_is_gone_are_removed() {
        let d = crate::util::testutil::tmp("atomic-stale");
        let dead = d.join(".f.json.4294967295.3.tmp"); // no such pid
        let alive = d.join(".f.json.1.0.tmp"); // init runs
        let mine = d.join(format!(".f.json.{}.99.tmp", std::process::id()));
        let other = d.join(".g.json.4294967295.0.tmp"); // another file's
        let odd = d.join(".f.json.x.0.tmp"); // not ours
        for p in [&dead, &alive, &mine, &other, &odd] {
            fs::write(p, b"partial").unwrap();
        }
        write_atomic(&d.join("f.json"), b"{}").unwrap();
        assert!(!dead.exists(), "a dead writer's temp was kept");
        for p in [&alive, &mine, &other, &odd] {
            assert!(p.exists(), "{} was removed", p.display());
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writers_of_one_file_at_once_never_share_a_temp_file() {
        // two commands saving the same file (tests run them in parallel)
        let d = crate::util::testutil::tmp("atomic-race");
        let p = d.join("table-backup.json");
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        write_atomic(&p, &[t; 4096]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = fs::read(&p).unwrap();
        assert!(got.len() == 4096 && got.iter().all(|b| *b == got[0]));
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "a temp file was left");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn seeding_is_all_or_nothing_and_takes_the_real_dirs_mode() {
        let base = std::env::temp_dir().join(format!("mados-seed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("real/live")).unwrap();
        fs::write(base.join("real/live/.profile"), "hi").unwrap();
        fs::set_permissions(base.join("real"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("home")).unwrap();
        // a cut left a half copy behind
        fs::create_dir_all(base.join("p/.home.seeding/junk")).unwrap();
        copy_tree_atomic(&base.join("home"), &base.join("p/home")).unwrap();
        let m = fs::metadata(base.join("p/home")).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            0o751,
            "mode of the real dir, not the symlink's"
        );
        assert_eq!(
            fs::read_to_string(base.join("p/home/live/.profile")).unwrap(),
            "hi"
        );
        assert!(
            !base.join("p/home/junk").exists(),
            "the stale half copy was not reused"
        );
        assert!(!base.join("p/.home.seeding").exists());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn control_files_are_not_read_through_symlinks() {
        let base = std::env::temp_dir().join(format!("mados-nofollow-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        fs::write(base.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), base.join("link")).unwrap();
        assert!(read_nofollow(&base.join("link"), 100).is_err());
        assert!(read_nofollow(&base.join("secret"), 100).unwrap() == b"x");
        assert!(read_nofollow(&base.join("secret"), 0).is_err(), "size cap");
        assert!(read_nofollow(&base, 100).is_err(), "a directory");
        // write_atomic replaces a symlink, never writes through it
        write_atomic(&base.join("link"), b"new").unwrap();
        assert_eq!(fs::read(base.join("secret")).unwrap(), b"x");
        assert_eq!(fs::read(base.join("link")).unwrap(), b"new");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn copies_files_dirs_links_and_modes() {
        let base = std::env::temp_dir().join(format!("mados-copy-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (a, b) = (base.join("a"), base.join("b"));
        fs::create_dir_all(a.join("live/.config")).unwrap();
        fs::write(a.join("live/.config/x"), "hello").unwrap();
        fs::set_permissions(a.join("live"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(".config/x", a.join("live/link")).unwrap();
        copy_tree_atomic(&a, &b).unwrap();
        assert_eq!(
            fs::read_to_string(b.join("live/.config/x")).unwrap(),
            "hello"
        );
        assert_eq!(
            fs::read_link(b.join("live/link")).unwrap(),
            Path::new(".config/x")
        );
        assert_eq!(fs::metadata(b.join("live")).unwrap().mode() & 0o777, 0o700);
        write_atomic(&b.join("new/state.json"), b"{}").unwrap();
        assert_eq!(fs::read(b.join("new/state.json")).unwrap(), b"{}");
        fs::remove_dir_all(&base).unwrap();
    }
}
