//! overlayfs layers as data, and `fold`: apply a diff layer (an overlay's
//! upper, or a copy of one) onto the directory below it, offline.
//!
//! What an entry in a layer means (kernel `Documentation/filesystems/
//! overlayfs.rst`): a whiteout hides the name below (a char device 0/0, or
//! a zero-size file with `trusted.overlay.whiteout`; the `user.overlay.*`
//! forms count only on overlays mounted with `userxattr`, which ours are
//! not: there they are a user's ordinary attributes, never marks);
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

use crate::util::safefs::{self, Dir, Kind, Stat};
use anyhow::{Context, Result};
use nix::fcntl::RenameFlags;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::util::safefs::{OPAQUE_XATTRS, WHITEOUT_XATTRS};

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

/// The parent of a path root chose and its last name.
fn parent_and_name(p: &Path) -> Result<(Dir, &std::ffi::OsStr)> {
    let name = p
        .file_name()
        .with_context(|| format!("{} has no name", p.display()))?;
    let parent = p.parent().unwrap_or(Path::new("/"));
    let d = Dir::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    Ok((d, name))
}

/// Remove `p` whatever it is (a tree too, entry by entry by fd, never
/// following a symlink, never leaving its filesystem); absent is fine.
/// `p`'s parent is a path root chose; below it nothing is trusted.
pub fn remove_all(p: &Path) -> Result<()> {
    let (d, name) = match parent_and_name(p) {
        Ok(x) => x,
        Err(_) if fs::symlink_metadata(p).is_err() => return Ok(()),
        Err(e) => return Err(e),
    };
    op()?;
    d.remove_all(name)
        .with_context(|| format!("removing {}", p.display()))
}

/// Create a whiteout (char device 0/0) at `p`, replacing what is there.
pub fn make_whiteout(p: &Path) -> Result<()> {
    let (d, name) = parent_and_name(p)?;
    d.remove_all(name)
        .with_context(|| format!("removing {}", p.display()))?;
    d.make_whiteout(name)
        .with_context(|| format!("creating the whiteout {}", p.display()))
}

/// fsync the directory `p` (opened as a directory, never followed: a
/// FIFO or a symlink there is an error, never a hang).
pub fn fsync_dir(p: &Path) -> Result<()> {
    Dir::open(p)
        .and_then(|d| d.fsync())
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
/// directory stay). Neither may be in use by a mounted overlay. Both are
/// paths root chose (`dst` is created if missing); below them, see
/// `fold_at`.
pub fn fold(src: &Path, dst: &Path, o: &FoldOptions) -> Result<FoldReport> {
    let s = Dir::open(src).with_context(|| format!("opening {}", src.display()))?;
    let d = Dir::open_or_create(dst).with_context(|| format!("opening {}", dst.display()))?;
    fold_at(&s, &d, o).with_context(|| format!("folding {} into {}", src.display(), dst.display()))
}

/// `fold` on two open directories. Everything below them is reached by
/// fd (`util::safefs`): a symlink on either side is moved or removed as
/// itself, never followed, and no other filesystem is entered. Both may
/// hold trees users wrote (a bind tier's lower is in a user's home).
pub fn fold_at(src: &Dir, dst: &Dir, o: &FoldOptions) -> Result<FoldReport> {
    let mut r = FoldReport::default();
    fold_dir(src, dst, Path::new(""), o, &mut r)?;
    Ok(r)
}

fn fold_dir(src: &Dir, dst: &Dir, rel: &Path, o: &FoldOptions, r: &mut FoldReport) -> Result<()> {
    let names = src
        .list()
        .with_context(|| format!("listing {}", rel.display()))?;
    let mut changed = false;
    for name in names {
        let rel_e = rel.join(&name);
        let rel_s = rel_e.to_string_lossy();
        if o.skip.iter().any(|k| *k == rel_s) {
            continue;
        }
        let Some(st) = src
            .lstat(&name)
            .with_context(|| format!("reading {}", rel_e.display()))?
        else {
            continue;
        };
        let below = dst.lstat(&name)?;
        let below_dir = below.is_some_and(|b| safefs::kind(&b) == Kind::Dir);
        let is_dir = safefs::kind(&st) == Kind::Dir;
        changed = true;
        // a whiteout moved down is no entry moved
        let mv = |r: &mut FoldReport, entry: bool| -> Result<()> {
            op()?;
            src.rename(&name, dst, &name, RenameFlags::empty())
                .with_context(|| format!("moving {} down", rel_e.display()))?;
            r.moved += u64::from(entry);
            Ok(())
        };
        let rm_below = |r: &mut FoldReport| -> Result<()> {
            if below.is_some() {
                op()?;
                dst.remove_all(&name)
                    .with_context(|| format!("removing {} below", rel_e.display()))?;
                r.removed += 1;
            }
            Ok(())
        };
        if src.is_whiteout(&name, &st) {
            rm_below(r)?;
            if o.keep_whiteouts {
                mv(r, false)?;
            } else {
                op()?;
                src.remove_all(&name)?;
            }
        } else if is_dir {
            let sd = src
                .dir(Path::new(&name))
                .with_context(|| format!("opening {}", rel_e.display()))?;
            if sd.is_opaque() || !below_dir {
                // replaces what is below: remove that first, then (with
                // nothing below to hide) drop the opaque mark, then one
                // rename. A cut before the rename is finished by the next
                // run the same way.
                rm_below(r)?;
                if !o.keep_whiteouts && sd.is_opaque() {
                    op()?;
                    sd.set_opaque(false).with_context(|| {
                        format!("clearing the opaque mark of {}", rel_e.display())
                    })?;
                }
                mv(r, true)?;
            } else {
                let dd = dst
                    .dir(Path::new(&name))
                    .with_context(|| format!("opening {} below", rel_e.display()))?;
                // its times as the layer has them, before moving its
                // entries out changes them
                let sst = sd
                    .stat()
                    .with_context(|| format!("reading {}", rel_e.display()))?;
                fold_dir(&sd, &dd, &rel_e, o, r)?;
                copy_dir_attrs(&sd, &sst, &dd, &rel_e)?;
                let prefix = format!("{rel_s}/");
                if o.skip.iter().any(|k| k.starts_with(&prefix)) {
                    continue; // a skipped entry stays inside
                }
                op()?;
                src.rmdir(&name)
                    .with_context(|| format!("removing {}", rel_e.display()))?;
            }
        } else if below.is_some_and(|b| safefs::same(&b, &st)) {
            // the same file under both names (a sync appended to the
            // lower's file through a link in the stage): rename(2) would
            // do nothing and leave the stage's name; it goes instead
            op()?;
            src.unlink(&name)
                .with_context(|| format!("dropping {}, already below", rel_e.display()))?;
            r.moved += 1;
        } else {
            if below_dir {
                rm_below(r)?;
            }
            mv(r, true)?;
        }
    }
    if changed {
        dst.fsync()
            .with_context(|| format!("syncing {} below", rel.display()))?;
        src.fsync()
            .with_context(|| format!("syncing {}", rel.display()))?;
    }
    Ok(())
}

/// A merged directory takes the layer's owner, mode, attributes (not the
/// opaque mark: merged, not opaque) and times, by fd.
fn copy_dir_attrs(s: &Dir, st: &Stat, d: &Dir, rel: &Path) -> Result<()> {
    op()?;
    let xattrs: Vec<_> = s
        .own_xattrs()
        .with_context(|| format!("reading the attributes of {}", rel.display()))?
        .into_iter()
        .filter(|(n, _)| !safefs::OPAQUE_XATTRS.iter().any(|o| n == *o))
        .collect();
    let mut not = vec![];
    d.set_own_attrs(st, &xattrs, &mut not, &rel.display().to_string());
    if !not.is_empty() {
        anyhow::bail!(
            "setting the attributes of {}: {}",
            rel.display(),
            not.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    fn a_file_already_below_under_the_same_inode_leaves_the_layer() {
        // a sync appended to the lower's file through a link in the stage
        let t = tmp("same-inode");
        let (src, dst) = (t.join("src"), t.join("dst"));
        fs::create_dir_all(src.join("d")).unwrap();
        fs::create_dir_all(dst.join("d")).unwrap();
        fs::write(dst.join("d/log"), "synced, then a tail").unwrap();
        fs::hard_link(dst.join("d/log"), src.join("d/log")).unwrap();
        fs::write(dst.join("top"), "top").unwrap();
        fs::hard_link(dst.join("top"), src.join("top")).unwrap();
        let r = fold(
            &src,
            &dst,
            &FoldOptions {
                keep_whiteouts: true,
                skip: &[],
            },
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(dst.join("d/log")).unwrap(),
            "synced, then a tail"
        );
        assert_eq!(fs::metadata(dst.join("d/log")).unwrap().nlink(), 1);
        assert_eq!(fs::metadata(dst.join("top")).unwrap().nlink(), 1);
        assert_eq!(
            fs::read_dir(&src).unwrap().count(),
            0,
            "src left empty (rename(2) of a name onto its own inode does nothing)"
        );
        assert_eq!(r.moved, 2);
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_merged_dir_keeps_the_layers_times() {
        // moving its entries down changes the layer dir's mtime: the one
        // it had before is what the merged dir takes
        let t = tmp("merged-times");
        let (src, dst) = (t.join("src"), t.join("dst"));
        fs::create_dir_all(src.join("a")).unwrap();
        fs::create_dir_all(dst.join("a")).unwrap();
        fs::write(src.join("a/f"), "f").unwrap();
        let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &src.join("a"),
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        fold(
            &src,
            &dst,
            &FoldOptions {
                keep_whiteouts: true,
                skip: &[],
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(dst.join("a")).unwrap().mtime(), 1_000_000);
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
