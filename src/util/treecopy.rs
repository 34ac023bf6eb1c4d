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

use crate::util::safefs::{self, Dir, Kind, Stat, gone};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct Report {
    /// Entries copied (files, dirs, links, nodes).
    pub entries: u64,
    pub bytes: u64,
    /// What was not carried, each with the reason.
    pub not_carried: Vec<String>,
}

struct Ctx<'a> {
    from: &'a Path,
    /// The copy's root: a hardlink's other names are linked from it.
    to: &'a Dir,
    /// (dev, ino) of a multiply-linked source → its first copy's path.
    links: HashMap<(u64, u64), PathBuf>,
    r: Report,
}

impl Ctx<'_> {
    fn label(&self, rel: &Path) -> String {
        self.from.join(rel).display().to_string()
    }
    fn raced(&mut self, rel: &Path, e: impl std::fmt::Display) {
        let l = self.label(rel);
        self.r
            .not_carried
            .push(format!("{l}: changed while it was saved ({e})"));
    }
}

/// Copy the tree `from` into `to` (created if missing), merging over what
/// `to` holds: an entry replaces one of another type at the same path, and
/// an opaque directory replaces the directory it lands on. `from` may be
/// a tree users write while it is copied (a RAM session's uppers, `/home`):
/// it is read by fd through `util::safefs` (no symlink followed, a file
/// read only if it is still the regular file listed, its attributes from
/// that fd, never a FIFO or device opened); what changed meanwhile, and a
/// filesystem mounted inside it, is reported as not carried.
pub fn copy(from: &Path, to: &Path) -> Result<Report> {
    let s = Dir::open(from).with_context(|| format!("opening {}", from.display()))?;
    let d = Dir::open_or_create(to).with_context(|| format!("opening {}", to.display()))?;
    let mut c = Ctx {
        from,
        to: &d,
        links: HashMap::new(),
        r: Report::default(),
    };
    copy_dir(&mut c, &s, &d, Path::new(""))?;
    Ok(c.r)
}

fn copy_dir(c: &mut Ctx, s: &Dir, d: &Dir, rel: &Path) -> Result<()> {
    let names = s
        .list()
        .with_context(|| format!("listing {}", c.label(rel)))?;
    for name in names {
        let r = rel.join(&name);
        match s.lstat(&name) {
            Ok(Some(st)) => copy_entry(c, s, d, &name, &st, &r)?,
            Ok(None) => c.raced(&r, "removed"),
            Err(e) => return Err(e).with_context(|| format!("reading {}", c.label(&r))),
        }
    }
    let st = s.stat()?;
    let xattrs = match s.own_xattrs() {
        Ok(x) => x,
        Err(e) => {
            let l = c.label(rel);
            c.r.not_carried.push(format!("{l}: attributes ({e})"));
            vec![]
        }
    };
    let l = c.label(rel);
    d.set_own_attrs(&st, &xattrs, &mut c.r.not_carried, &l);
    c.r.entries += 1;
    Ok(())
}

fn copy_entry(c: &mut Ctx, s: &Dir, d: &Dir, name: &OsStr, st: &Stat, rel: &Path) -> Result<()> {
    let k = safefs::kind(st);
    let label = c.label(rel);
    if k == Kind::Dir {
        let sd = match s.dir(Path::new(name)) {
            Ok(sd) => sd,
            Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                c.r.not_carried.push(format!(
                    "{label}: another filesystem is mounted there (not saved)"
                ));
                return Ok(());
            }
            Err(e) if gone(&e) => {
                c.raced(rel, e);
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("opening {label}")),
        };
        let existing = d.lstat(name)?;
        if existing.is_some_and(|x| safefs::kind(&x) != Kind::Dir)
            || (existing.is_some() && sd.is_opaque())
        {
            d.remove_all(name)
                .with_context(|| format!("replacing {}", rel.display()))?;
        }
        if d.lstat(name)?.is_none() {
            d.mkdir(name, 0o700)
                .with_context(|| format!("creating {}", rel.display()))?;
        }
        let dd = d
            .dir(Path::new(name))
            .with_context(|| format!("opening the copy of {}", rel.display()))?;
        return copy_dir(c, &sd, &dd, rel);
    }
    d.remove_all(name)
        .with_context(|| format!("replacing {}", rel.display()))?;
    if st.st_nlink > 1 {
        if let Some(first) = c.links.get(&(st.st_dev, st.st_ino)).cloned() {
            let (fp, fname) = safefs::split(&first).expect("a linked entry has a name");
            c.to.dir(fp)
                .and_then(|fd| fd.link(fname, d, name))
                .with_context(|| format!("linking {} to {}", rel.display(), first.display()))?;
            c.r.entries += 1;
            return Ok(());
        }
        c.links.insert((st.st_dev, st.st_ino), rel.to_path_buf());
    }
    match k {
        Kind::File => {
            let (f, fst) = match s.open_read(name, Some(st)) {
                Ok(x) => x,
                Err(e) if gone(&e) => {
                    c.raced(rel, e);
                    return Ok(());
                }
                Err(e) => return Err(e).with_context(|| format!("opening {label}")),
            };
            let xattrs = safefs::file_xattrs(&f).unwrap_or_else(|e| {
                c.r.not_carried.push(format!("{label}: attributes ({e})"));
                vec![]
            });
            let to = d
                .create(name, 0o600)
                .with_context(|| format!("creating the copy of {}", rel.display()))?;
            // holes stay holes (a user's sparse file would fill the stick)
            let (n, _) =
                crate::util::fsutil::copy_sparse(&f, Some(&to), 0, fst.st_size as u64, None)
                    .with_context(|| format!("copying {label}"))?;
            safefs::set_attrs_fd(&to, &fst, &xattrs, &mut c.r.not_carried, &label);
            c.r.bytes += n;
        }
        Kind::Symlink => {
            let target = match s.readlink(name) {
                Ok(t) => t,
                Err(e) if gone(&e) || e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    c.raced(rel, e);
                    return Ok(());
                }
                Err(e) => return Err(e).with_context(|| format!("reading the link {label}")),
            };
            d.symlink(&target, name)
                .with_context(|| format!("creating the symlink {}", rel.display()))?;
            let xattrs = s.xattrs(name).unwrap_or_default();
            d.set_entry_attrs(name, st, &xattrs, &mut c.r.not_carried, &label);
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            d.mknod(name, st)
                .with_context(|| format!("creating the node {}", rel.display()))?;
            let xattrs = s.xattrs(name).unwrap_or_default();
            d.set_entry_attrs(name, st, &xattrs, &mut c.r.not_carried, &label);
        }
        Kind::Socket | Kind::Dir => {
            c.r.not_carried
                .push(format!("{label}: a socket (recreated by its program)"));
            return Ok(());
        }
    }
    c.r.entries += 1;
    Ok(())
}
