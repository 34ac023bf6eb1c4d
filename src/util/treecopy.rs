//! A faithful copy of a directory tree, for saving an overlay's upper layer
//! (a RAM session) onto the persistence partition: regular files, dirs,
//! symlinks, hardlinks (kept as links), char/block devices and FIFOs (both
//! overlayfs whiteout forms: the char device 0/0 and the zero-size file
//! with `trusted.overlay.whiteout`), every extended attribute (opaque dirs'
//! `trusted.overlay.opaque`, `security.capability`, ACLs), owners, modes and
//! times. What cannot be carried (sockets, an attribute the target refuses)
//! is listed in the report, never silently dropped.
//!
//! Written here rather than with a crate: the copy crates (fs_extra,
//! copy_dir) copy contents and permissions only, with no xattrs, device
//! nodes or hardlinks. Extended attributes go through the `xattr` crate.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct Report {
    /// Entries copied (files, dirs, links, nodes).
    pub entries: u64,
    pub bytes: u64,
    /// What was not carried, each with the reason.
    pub not_carried: Vec<String>,
}

/// Whether `dir` is an opaque overlay directory (hides what is below it).
fn opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|n| xattr::get(dir, n).ok().flatten().as_deref() == Some(b"y"))
}

/// Copy the tree `from` into `to` (created if missing), merging over what
/// `to` holds: an entry replaces one of another type at the same path, and
/// an opaque directory replaces the directory it lands on.
pub fn copy(from: &Path, to: &Path) -> Result<Report> {
    let mut r = Report::default();
    let mut links = HashMap::new();
    let meta = fs::metadata(from).with_context(|| format!("reading {}", from.display()))?;
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    copy_dir(from, to, &meta, &mut links, &mut r)?;
    Ok(r)
}

fn copy_dir(
    from: &Path,
    to: &Path,
    meta: &fs::Metadata,
    links: &mut HashMap<(u64, u64), PathBuf>,
    r: &mut Report,
) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(from)
        .with_context(|| format!("listing {}", from.display()))?
        .collect::<std::io::Result<_>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let m = fs::symlink_metadata(&src).with_context(|| format!("reading {}", src.display()))?;
        copy_entry(&src, &dst, &m, links, r)?;
    }
    attrs(from, to, meta, &mut r.not_carried);
    r.entries += 1;
    Ok(())
}

fn clear(dst: &Path) -> Result<()> {
    match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dst),
        Ok(_) => fs::remove_file(dst),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("replacing {}", dst.display()))
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    m: &fs::Metadata,
    links: &mut HashMap<(u64, u64), PathBuf>,
    r: &mut Report,
) -> Result<()> {
    let ft = m.file_type();
    if ft.is_dir() {
        let existing = fs::symlink_metadata(dst).ok();
        if existing.as_ref().is_some_and(|x| !x.is_dir()) || (existing.is_some() && opaque(src)) {
            clear(dst)?;
        }
        if fs::symlink_metadata(dst).is_err() {
            fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
        }
        return copy_dir(src, dst, m, links, r);
    }
    clear(dst)?;
    if m.nlink() > 1 && !ft.is_dir() {
        if let Some(first) = links.get(&(m.dev(), m.ino())) {
            fs::hard_link(first, dst)
                .with_context(|| format!("linking {} to {}", dst.display(), first.display()))?;
            r.entries += 1;
            return Ok(());
        }
        links.insert((m.dev(), m.ino()), dst.to_path_buf());
    }
    if ft.is_file() {
        fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
        r.bytes += m.len();
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)
            .with_context(|| format!("creating the symlink {}", dst.display()))?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        make_node(dst, m)?;
    } else {
        r.not_carried.push(format!(
            "{}: a socket (recreated by its program)",
            src.display()
        ));
        return Ok(());
    }
    attrs(src, dst, m, &mut r.not_carried);
    r.entries += 1;
    Ok(())
}

/// A char/block device or FIFO at `dst` like the one `m` describes (a
/// char device 0/0 is an overlay whiteout).
pub fn make_node(dst: &Path, m: &fs::Metadata) -> Result<()> {
    use nix::sys::stat::{Mode, SFlag, mknod};
    let ft = m.file_type();
    let kind = if ft.is_char_device() {
        SFlag::S_IFCHR
    } else if ft.is_block_device() {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFIFO
    };
    mknod(
        dst,
        kind,
        Mode::from_bits_truncate(m.mode() & 0o7777),
        m.rdev() as nix::libc::dev_t,
    )
    .with_context(|| format!("creating the node {}", dst.display()))
}

/// Owner, then mode (chown clears set-id bits), then extended attributes
/// (`security.capability` too is cleared by chown), then times.
/// What cannot be carried is pushed to `not_carried`, never fatal.
pub fn attrs(src: &Path, dst: &Path, m: &fs::Metadata, not_carried: &mut Vec<String>) {
    let link = m.file_type().is_symlink();
    if let Err(e) = std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid())) {
        not_carried.push(format!(
            "{}: owner {}:{} ({e})",
            src.display(),
            m.uid(),
            m.gid()
        ));
    }
    if !link && let Err(e) = fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))
    {
        not_carried.push(format!(
            "{}: mode {:o} ({e})",
            src.display(),
            m.mode() & 0o7777
        ));
    }
    match xattr::list(src) {
        Ok(names) => {
            for n in names {
                let v = match xattr::get(src, &n) {
                    Ok(Some(v)) => v,
                    Ok(None) => continue,
                    Err(e) => {
                        not_carried.push(format!(
                            "{}: attribute {} ({e})",
                            src.display(),
                            n.to_string_lossy()
                        ));
                        continue;
                    }
                };
                if let Err(e) = xattr::set(dst, &n, &v) {
                    not_carried.push(format!(
                        "{}: attribute {} ({e})",
                        src.display(),
                        n.to_string_lossy()
                    ));
                }
            }
        }
        Err(e) => not_carried.push(format!("{}: attributes ({e})", src.display())),
    }
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let at = TimeSpec::new(m.atime(), m.atime_nsec());
    let mt = TimeSpec::new(m.mtime(), m.mtime_nsec());
    if let Err(e) = utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &at,
        &mt,
        UtimensatFlags::NoFollowSymlink,
    ) {
        not_carried.push(format!("{}: times ({e})", src.display()));
    }
}
