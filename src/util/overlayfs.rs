//! overlayfs layers as data, and `fold`: apply a diff layer (an overlay's
//! upper, or a copy of one) onto the directory below it, offline.
//!
//! What an entry in a layer means (kernel `Documentation/filesystems/
//! overlayfs.rst`): a whiteout hides the name below (a char device 0/0, or
//! a zero-size file with `trusted.overlay.whiteout` / `user.overlay.whiteout`);
//! an opaque directory (`overlay.opaque=y`) hides everything below it; any
//! other entry replaces the one below, and a plain directory merges.
//!
//! `fold` is how the RAM tier's synced changes reach its lower directory at
//! boot, and how a lower is handed back to the persistent overlay when the
//! tier is turned off. Every step is a rename or a removal on one
//! filesystem, so a cut at any instant leaves each entry old or new, and
//! running `fold` again finishes the job (it is idempotent).
//!
//! Written here, not taken from a crate: no crate applies overlayfs
//! semantics (whiteouts, opaque dirs) to a directory tree.

use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

const WHITEOUT_XATTRS: [&str; 2] = ["trusted.overlay.whiteout", "user.overlay.whiteout"];
const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// Whether the entry at `p` (with `m` its lstat) is an overlayfs whiteout.
pub fn is_whiteout(p: &Path, m: &fs::Metadata) -> bool {
    let ft = m.file_type();
    (ft.is_char_device() && m.rdev() == 0)
        || (ft.is_file()
            && m.len() == 0
            && WHITEOUT_XATTRS
                .iter()
                .any(|n| xattr::get(p, n).ok().flatten().is_some()))
}

/// Whether `dir` is an opaque overlay directory (hides what is below it).
pub fn is_opaque(dir: &Path) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|n| xattr::get(dir, n).ok().flatten().as_deref() == Some(b"y"))
}

/// What an overlay's merged view shows at `rel` (plain components below
/// the mount point), judged from its upper layer alone.
#[derive(Debug, PartialEq, Eq)]
pub enum InUpper {
    /// The upper has nothing there and hides nothing: the lower shows.
    Lower,
    /// The upper hides it (a whiteout, an opaque dir without it, or a
    /// non-directory where a directory would be): the name does not exist.
    Hidden,
    /// The upper's own entry (not followed if it is a symlink).
    Entry(std::path::PathBuf),
}

/// Read offline: no symlink in the upper is followed.
pub fn in_upper(upper: &Path, rel: &Path) -> InUpper {
    let parts: Vec<_> = rel.components().collect();
    let mut cur = upper.to_path_buf();
    let mut opaque = false;
    for (i, c) in parts.iter().enumerate() {
        cur.push(c);
        let m = match fs::symlink_metadata(&cur) {
            Ok(m) => m,
            Err(_) if opaque => return InUpper::Hidden,
            Err(_) => return InUpper::Lower,
        };
        if is_whiteout(&cur, &m) {
            return InUpper::Hidden;
        }
        if i + 1 == parts.len() {
            return InUpper::Entry(cur);
        }
        if !m.is_dir() {
            return InUpper::Hidden;
        }
        opaque |= is_opaque(&cur);
    }
    InUpper::Lower
}

fn clear_opaque(dir: &Path) -> Result<()> {
    for n in OPAQUE_XATTRS {
        if xattr::get(dir, n).ok().flatten().is_some() {
            op()?;
            xattr::remove(dir, n).with_context(|| format!("clearing {n} on {}", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Tests: fail (as a cut would stop) after this many changes.
    static CUT_AFTER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Called before every change `fold` makes; in tests, the simulated cut.
fn op() -> Result<()> {
    #[cfg(test)]
    if let Some(n) = CUT_AFTER.get() {
        if n == 0 {
            anyhow::bail!("cut");
        }
        CUT_AFTER.set(Some(n - 1));
    }
    Ok(())
}

/// Remove `p` whatever it is (a tree too, entry by entry, not following
/// symlinks); absent is fine.
pub fn remove_all(p: &Path) -> Result<()> {
    let m = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    if m.is_dir() {
        for e in fs::read_dir(p).with_context(|| format!("listing {}", p.display()))? {
            remove_all(&e?.path())?;
        }
        op()?;
        fs::remove_dir(p)
    } else {
        op()?;
        fs::remove_file(p)
    }
    .with_context(|| format!("removing {}", p.display()))
}

fn rename(s: &Path, d: &Path) -> Result<()> {
    op()?;
    fs::rename(s, d).with_context(|| format!("moving {} to {}", s.display(), d.display()))
}

/// Create a whiteout (char device 0/0) at `p`, replacing what is there.
pub fn make_whiteout(p: &Path) -> Result<()> {
    use nix::sys::stat::{Mode, SFlag, mknod};
    remove_all(p)?;
    mknod(p, SFlag::S_IFCHR, Mode::empty(), 0)
        .with_context(|| format!("creating the whiteout {}", p.display()))
}

pub fn fsync_dir(p: &Path) -> Result<()> {
    fs::File::open(p)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", p.display()))
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldReport {
    /// Entries moved down (files, links, nodes, whole directories).
    pub moved: u64,
    /// Names removed below (replaced or whited out).
    pub removed: u64,
}

/// How to fold.
pub struct FoldOptions<'a> {
    /// Something lies below `dst` that a whiteout or an opaque dir must go
    /// on hiding (the live image under a tier's lower): keep them. Without
    /// (a plain directory on the partition) a whiteout is only a removal.
    pub keep_whiteouts: bool,
    /// Paths relative to `src` left where they are (not folded).
    pub skip: &'a [String],
}

/// Move every entry of the layer `src` down onto `dst` with overlayfs
/// semantics, leaving `src` empty (its skipped entries and its own
/// directory stay). Neither may be in use by a mounted overlay.
pub fn fold(src: &Path, dst: &Path, o: &FoldOptions) -> Result<FoldReport> {
    let mut r = FoldReport::default();
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    fold_dir(src, dst, "", o, &mut r)?;
    Ok(r)
}

fn fold_dir(src: &Path, dst: &Path, rel: &str, o: &FoldOptions, r: &mut FoldReport) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(src)
        .with_context(|| format!("listing {}", src.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    let mut changed = false;
    for name in names {
        let rel_e = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        if o.skip.contains(&rel_e) {
            continue;
        }
        let (s, d) = (src.join(&name), dst.join(&name));
        let m = fs::symlink_metadata(&s).with_context(|| format!("reading {}", s.display()))?;
        let below = fs::symlink_metadata(&d).ok();
        changed = true;
        if is_whiteout(&s, &m) {
            if below.is_some() {
                remove_all(&d)?;
                r.removed += 1;
            }
            if o.keep_whiteouts {
                rename(&s, &d)?;
            } else {
                remove_all(&s)?;
            }
        } else if m.is_dir() && (is_opaque(&s) || below.as_ref().is_none_or(|b| !b.is_dir())) {
            // replaces what is below: remove that first, then (with nothing
            // below to hide) drop the opaque mark, then one rename. A cut
            // before the rename is finished by the next run the same way.
            if below.is_some() {
                remove_all(&d)?;
                r.removed += 1;
            }
            if !o.keep_whiteouts {
                clear_opaque(&s)?;
            }
            rename(&s, &d)?;
            r.moved += 1;
        } else if m.is_dir() {
            fold_dir(&s, &d, &rel_e, o, r)?;
            copy_dir_attrs(&s, &d, &m)?;
            if o.skip.iter().any(|k| k.starts_with(&format!("{rel_e}/"))) {
                continue; // a skipped entry stays inside
            }
            op()?;
            fs::remove_dir(&s).with_context(|| format!("removing {}", s.display()))?;
        } else {
            if below.as_ref().is_some_and(|b| b.is_dir()) {
                remove_all(&d)?;
                r.removed += 1;
            }
            rename(&s, &d)?;
            r.moved += 1;
        }
    }
    if changed {
        fsync_dir(dst)?;
        fsync_dir(src)?;
    }
    Ok(())
}

/// A merged directory takes the layer's owner, mode, attributes and times.
fn copy_dir_attrs(s: &Path, d: &Path, m: &fs::Metadata) -> Result<()> {
    op()?;
    std::os::unix::fs::lchown(d, Some(m.uid()), Some(m.gid()))
        .with_context(|| format!("setting the owner of {}", d.display()))?;
    fs::set_permissions(d, fs::Permissions::from_mode(m.mode() & 0o7777))
        .with_context(|| format!("setting the mode of {}", d.display()))?;
    if let Ok(names) = xattr::list(s) {
        for n in names {
            if OPAQUE_XATTRS.iter().any(|o| n == *o) {
                continue; // merged, not opaque
            }
            if let Ok(Some(v)) = xattr::get(s, &n) {
                xattr::set(d, &n, &v).with_context(|| {
                    format!("setting {} on {}", n.to_string_lossy(), d.display())
                })?;
            }
        }
    }
    set_times(d, m)
}

pub fn set_times(p: &Path, m: &fs::Metadata) -> Result<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &TimeSpec::new(m.atime(), m.atime_nsec()),
        &TimeSpec::new(m.mtime(), m.mtime_nsec()),
        UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("setting the times of {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::util::testutil::is_root;

    fn tmp(name: &str) -> std::path::PathBuf {
        crate::util::testutil::tmp(&format!("ovl-{name}"))
    }

    #[test]
    fn fold_moves_files_and_merges_dirs() {
        let t = tmp("merge");
        let (src, dst) = (t.join("src"), t.join("dst"));
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::create_dir_all(dst.join("a/keep")).unwrap();
        fs::write(src.join("a/b/new"), "new").unwrap();
        fs::write(src.join("a/f"), "v2").unwrap();
        fs::write(dst.join("a/f"), "v1").unwrap();
        fs::write(dst.join("a/keep/x"), "x").unwrap();
        // a file replacing a directory below
        fs::write(src.join("d"), "file").unwrap();
        fs::create_dir_all(dst.join("d/sub")).unwrap();
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
        let r = fold(
            &src,
            &dst,
            &FoldOptions {
                keep_whiteouts: true,
                skip: &[],
            },
        )
        .unwrap();
        assert_eq!(fs::read_to_string(dst.join("a/b/new")).unwrap(), "new");
        assert_eq!(fs::read_to_string(dst.join("a/f")).unwrap(), "v2");
        assert_eq!(fs::read_to_string(dst.join("a/keep/x")).unwrap(), "x");
        assert_eq!(fs::read_to_string(dst.join("d")).unwrap(), "file");
        assert_eq!(
            fs::metadata(dst.join("a")).unwrap().mode() & 0o777,
            0o700,
            "a merged dir takes the layer's mode"
        );
        assert_eq!(fs::read_dir(&src).unwrap().count(), 0, "src left empty");
        assert_eq!(r.moved, 3);
        assert_eq!(r.removed, 1);
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn fold_skips_what_it_is_told_to() {
        let t = tmp("skip");
        let (src, dst) = (t.join("src"), t.join("dst"));
        fs::create_dir_all(src.join("journal/x")).unwrap();
        fs::write(src.join("journal/x/j"), "j").unwrap();
        fs::write(src.join("syslog"), "s").unwrap();
        fold(
            &src,
            &dst,
            &FoldOptions {
                keep_whiteouts: true,
                skip: &["journal".into()],
            },
        )
        .unwrap();
        assert!(src.join("journal/x/j").exists());
        assert!(!dst.join("journal").exists());
        assert_eq!(fs::read_to_string(dst.join("syslog")).unwrap(), "s");
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn what_the_upper_shows_at_a_path() {
        let t = tmp("inupper");
        let up = t.join("upper");
        fs::create_dir_all(up.join("a/b")).unwrap();
        fs::write(up.join("a/b/f"), "x").unwrap();
        fs::create_dir_all(up.join("o")).unwrap();
        std::os::unix::fs::symlink("/etc", up.join("l")).unwrap();
        fs::write(up.join("file"), "").unwrap();
        let rel = |s: &str| std::path::PathBuf::from(s);
        assert_eq!(
            in_upper(&up, &rel("a/b/f")),
            InUpper::Entry(up.join("a/b/f"))
        );
        assert_eq!(in_upper(&up, &rel("a/b/g")), InUpper::Lower);
        assert_eq!(in_upper(&up, &rel("a/c/g")), InUpper::Lower);
        assert_eq!(
            in_upper(&up, &rel("l/passwd")),
            InUpper::Hidden,
            "a symlink is not followed"
        );
        assert_eq!(in_upper(&up, &rel("file/x")), InUpper::Hidden);
        if is_root() {
            make_whiteout(&up.join("a/w")).unwrap();
            assert_eq!(in_upper(&up, &rel("a/w/x")), InUpper::Hidden);
            assert_eq!(in_upper(&up, &rel("a/w")), InUpper::Hidden);
            xattr::set(up.join("o"), "trusted.overlay.opaque", b"y").unwrap();
            assert_eq!(in_upper(&up, &rel("o/x")), InUpper::Hidden);
        }
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        if !is_root() {
            eprintln!("skipped: whiteouts (mknod) and trusted.* attributes need root");
            return;
        }
        for keep in [true, false] {
            let t = tmp(&format!("wh-{keep}"));
            let (src, dst) = (t.join("src"), t.join("dst"));
            fs::create_dir_all(src.join("op")).unwrap();
            fs::create_dir_all(dst.join("op/old")).unwrap();
            fs::create_dir_all(dst.join("gone")).unwrap();
            fs::write(dst.join("gone/f"), "f").unwrap();
            fs::write(src.join("op/new"), "n").unwrap();
            xattr::set(src.join("op"), "trusted.overlay.opaque", b"y").unwrap();
            make_whiteout(&src.join("gone")).unwrap();
            make_whiteout(&src.join("never-below")).unwrap();
            fold(
                &src,
                &dst,
                &FoldOptions {
                    keep_whiteouts: keep,
                    skip: &[],
                },
            )
            .unwrap();
            assert!(!dst.join("op/old").exists(), "the opaque dir replaced");
            assert!(dst.join("op/new").exists());
            assert_eq!(is_opaque(&dst.join("op")), keep);
            let g = fs::symlink_metadata(dst.join("gone"));
            assert_eq!(
                g.as_ref().is_ok_and(|m| is_whiteout(&dst.join("gone"), m)),
                keep,
                "whiteout kept only with something below: {g:?}"
            );
            assert!(g.is_ok() == keep);
            assert_eq!(fs::read_dir(&src).unwrap().count(), 0);
            fs::remove_dir_all(&t).unwrap();
        }
    }

    /// A tree of every kind of change, as (layer, below).
    fn scene(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (src, dst) = (t.join("src"), t.join("dst"));
        let _ = fs::remove_dir_all(t);
        fs::create_dir_all(src.join("op")).unwrap();
        fs::create_dir_all(src.join("m/deep")).unwrap();
        fs::write(src.join("op/n"), "n").unwrap();
        xattr::set(src.join("op"), "trusted.overlay.opaque", b"y").unwrap();
        fs::write(src.join("m/deep/f"), "f2").unwrap();
        fs::write(src.join("m/g"), "g").unwrap();
        fs::write(src.join("file-over-dir"), "x").unwrap();
        make_whiteout(&src.join("wh")).unwrap();
        std::os::unix::fs::symlink("target", src.join("ln")).unwrap();
        fs::create_dir_all(dst.join("op/a/b")).unwrap();
        fs::write(dst.join("op/a/b/c"), "old").unwrap();
        fs::create_dir_all(dst.join("m/deep")).unwrap();
        fs::write(dst.join("m/deep/f"), "f1").unwrap();
        fs::write(dst.join("m/keep"), "k").unwrap();
        fs::create_dir_all(dst.join("file-over-dir/s")).unwrap();
        fs::create_dir_all(dst.join("wh/s")).unwrap();
        (src, dst)
    }

    /// The tree under `p` as text (kinds, contents, opaque marks).
    fn listing(p: &Path) -> Vec<String> {
        let mut out = vec![];
        fn walk(base: &Path, p: &Path, out: &mut Vec<String>) {
            let mut es: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            es.sort();
            for e in es {
                let m = fs::symlink_metadata(&e).unwrap();
                let rel = e.strip_prefix(base).unwrap().display().to_string();
                if is_whiteout(&e, &m) {
                    out.push(format!("{rel} whiteout"));
                } else if m.is_dir() {
                    out.push(format!("{rel}/ opaque={}", is_opaque(&e)));
                    walk(base, &e, out);
                } else if m.file_type().is_symlink() {
                    out.push(format!("{rel} -> {}", fs::read_link(&e).unwrap().display()));
                } else {
                    out.push(format!("{rel} = {}", fs::read_to_string(&e).unwrap()));
                }
            }
        }
        walk(p, p, &mut out);
        out
    }

    #[test]
    fn a_fold_cut_after_any_change_is_finished_by_the_next() {
        if !is_root() {
            eprintln!("skipped: whiteouts need root");
            return;
        }
        let t = tmp("cut");
        let o = FoldOptions {
            keep_whiteouts: true,
            skip: &[],
        };
        let (src, dst) = scene(&t);
        fold(&src, &dst, &o).unwrap();
        let want = listing(&dst);
        assert!(want.contains(&"op/ opaque=true".to_string()), "{want:?}");
        assert!(!want.iter().any(|l| l.starts_with("op/a")), "{want:?}");
        let mut cuts = 0;
        for n in 0.. {
            let (src, dst) = scene(&t);
            CUT_AFTER.set(Some(n));
            let first = fold(&src, &dst, &o);
            CUT_AFTER.set(None);
            if first.is_ok() {
                break; // n is past the last change
            }
            cuts += 1;
            fold(&src, &dst, &o).unwrap();
            assert_eq!(listing(&dst), want, "cut after {n} changes");
            assert!(
                listing(&src).is_empty(),
                "cut after {n}: {:?}",
                listing(&src)
            );
        }
        assert!(cuts > 10, "only {cuts} cut points");
        fs::remove_dir_all(&t).unwrap();
    }
}
