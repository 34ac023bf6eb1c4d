//! Temp cleanup: files older than `[cleanup] age` (by mtime, atime and
//! ctime, the newest of the three) are removed from the configured dirs
//! (`/tmp`, `/var/tmp`) every `every` seconds; empty directories too.
//!
//! Never removed: anything a process has open, maps, or uses as its cwd or
//! root (from `/proc/*/fd`, `/proc/*/maps`, `cwd`, `root`) and everything
//! below such a cwd or root (a build running there, a chroot), a file with a
//! lock held on it (`/proc/locks`), sockets and FIFOs, the X11/ICE socket
//! dirs and systemd's private temp dirs (as systemd's `tmp.conf` keeps
//! them). The walk never crosses a mount point and never follows a symlink
//! (a symlink itself is removed when old). `/proc` is read twice for all dirs, before
//! and after the walk, and only what was unused both times goes; the
//! walk and the removal go through `util::safefs`: each parent re-opened
//! by fd below the root (no symlink followed, no mount crossed), the entry
//! checked to be still the same inode and still old, then `unlinkat`ed: a
//! directory swapped for a symlink meanwhile makes the removal stop, not
//! follow.
//!
//! `plan` is pure (entries, the in-use set, the clock → what to remove) and
//! unit-tested; `in_use` and `deleted_open` read /proc; `run` executes.
//!
//! Only a dir in RAM is cleaned (`in_ram`: a tmpfs, or an overlay, as the
//! live root's `/var/tmp` is in RAM mode): the same daemon started on an
//! installed system, or a dir the config names by mistake on a disk, is
//! left alone rather than losing old files a user keeps there.
//!
//! Also here: the space held by deleted-but-open files, with the processes
//! holding it (the "df says full, du says empty" complaint).

use crate::util::safefs::{self, Dir};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// (st_dev, st_ino) of something in use.
pub type Id = (u64, u64);

/// What processes use: `ids` (open, mapped, locked, cwd, root) are never
/// removed; `anchors` (cwds and roots) keep their whole subtree too — a
/// build running in a dir, or a chroot, owns what is below it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InUse {
    pub ids: HashSet<Id>,
    pub anchors: HashSet<Id>,
}

impl InUse {
    fn merge(mut self, o: InUse) -> InUse {
        self.ids.extend(o.ids);
        self.anchors.extend(o.anchors);
        self
    }
}

/// One entry found under a cleanup dir (paths relative to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path below the root as text (for the plan's kept names and
    /// in-use subtrees) and as the bytes it is (for the removal).
    pub rel: String,
    pub path: std::path::PathBuf,
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// The newest of mtime, atime and ctime (Unix seconds).
    pub newest: i64,
    /// Directories: how many entries the walk found in it.
    pub children: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Sockets, FIFOs, device nodes: never removed.
    Special,
}

/// Top-level names kept whatever their age (systemd's tmp.conf).
fn kept_name(rel: &str) -> bool {
    let top = rel.split('/').next().unwrap_or(rel);
    matches!(
        top,
        ".X11-unix" | ".ICE-unix" | ".XIM-unix" | ".font-unix" | ".Test-unix"
    ) || top.starts_with("systemd-private-")
        || (top.starts_with(".X") && top.ends_with("-lock"))
}

/// What to remove, deepest first (pure). `entries` come from one walk of
/// a dir on device `dev`; `in_use` holds what processes use or lock.
pub fn plan(entries: &[Entry], dev: u64, in_use: &InUse, now: i64, age: u64) -> Vec<Entry> {
    let age = i64::try_from(age).unwrap_or(i64::MAX);
    // the anchored dirs by path; an entry is below one when one of its
    // ancestors is in the set: O(depth) look-ups an entry, whatever the
    // number of anchors (a scan of every anchor per entry took seconds a
    // pass at 200k files and 2,000 cwds)
    let anchored: HashSet<&str> = entries
        .iter()
        .filter(|e| e.kind == Kind::Dir && in_use.anchors.contains(&(e.dev, e.ino)))
        .map(|e| e.rel.as_str())
        .collect();
    let under_anchor = |rel: &str| below_anchor(rel, &anchored);
    let old = |e: &Entry| now.saturating_sub(e.newest) >= age;
    let mut out: Vec<Entry> = vec![];
    // children removed per dir, to know which dirs end up empty
    let mut removed_in: BTreeMap<String, usize> = BTreeMap::new();
    let parent = |rel: &str| rel.rsplit_once('/').map(|(p, _)| p.to_string());
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    // deepest first, so a dir is judged after its children
    sorted.sort_by(|a, b| {
        let da = a.rel.matches('/').count();
        let db = b.rel.matches('/').count();
        db.cmp(&da).then(a.rel.cmp(&b.rel))
    });
    for e in sorted {
        if e.dev != dev
            || kept_name(&e.rel)
            || in_use.ids.contains(&(e.dev, e.ino))
            || under_anchor(&e.rel)
        {
            continue;
        }
        let go = match e.kind {
            Kind::Special => false,
            Kind::File | Kind::Symlink => old(e),
            Kind::Dir => old(e) && removed_in.get(&e.rel).copied().unwrap_or(0) == e.children,
        };
        if go {
            if let Some(p) = parent(&e.rel) {
                *removed_in.entry(p).or_default() += 1;
            }
            out.push(e.clone());
        }
    }
    out
}

/// Whether `rel` lies below one of the `anchored` dirs: one set look-up
/// per ancestor of `rel`, whatever the number of anchors.
fn below_anchor(rel: &str, anchored: &HashSet<&str>) -> bool {
    !anchored.is_empty()
        && rel.match_indices('/').any(|(i, _)| {
            #[cfg(test)]
            tests::PROBES.with(|p| p.set(p.get() + 1));
            anchored.contains(&rel[..i])
        })
}

/// Walk `root` without crossing mounts or following symlinks: each dir
/// opened by fd below the root (`util::safefs`), its entries lstat'ed
/// through that fd.
pub fn walk(root: &Path) -> Result<(u64, Vec<Entry>)> {
    let rd = Dir::open(root).with_context(|| format!("opening {}", root.display()))?;
    let dev = rd.stat()?.st_dev;
    let mut out = vec![];
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        // gone, swapped for a symlink, or a mount point: not entered
        let Ok(d) = rd.dir(&rel) else { continue };
        let Ok(names) = d.list() else { continue };
        for name in names {
            let Ok(Some(st)) = d.lstat(&name) else {
                continue;
            };
            let path = rel.join(&name);
            let kind = match safefs::kind(&st) {
                safefs::Kind::Dir => Kind::Dir,
                safefs::Kind::Symlink => Kind::Symlink,
                safefs::Kind::File => Kind::File,
                _ => Kind::Special,
            };
            // a mount point: another device; neither entered nor removed
            if kind == Kind::Dir && st.st_dev == dev {
                stack.push(path.clone());
            }
            out.push(Entry {
                rel: path.to_string_lossy().into_owned(),
                path,
                kind,
                dev: st.st_dev,
                ino: st.st_ino,
                size: u64::try_from(st.st_size).unwrap_or(0),
                newest: st.st_mtime.max(st.st_atime).max(st.st_ctime),
                children: 0,
            });
        }
    }
    // how many entries each dir holds (to know which dirs a pass empties)
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &out {
        if let Some((p, _)) = e.rel.rsplit_once('/') {
            *counts.entry(p.to_string()).or_default() += 1;
        }
    }
    for e in out.iter_mut().filter(|e| e.kind == Kind::Dir) {
        e.children = counts.get(&e.rel).copied().unwrap_or(0);
    }
    Ok((dev, out))
}

fn dev_of(maj: u64, min: u64) -> u64 {
    nix::sys::stat::makedev(maj, min)
}

/// Parse `/proc/<pid>/maps`: the (dev, inode) of every file-backed mapping.
pub fn parse_maps(text: &str) -> Vec<Id> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, _, _, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let ino: u64 = ino.parse().ok()?;
            let (ma, mi) = dev.split_once(':')?;
            let (ma, mi) = (
                u64::from_str_radix(ma, 16).ok()?,
                u64::from_str_radix(mi, 16).ok()?,
            );
            (ino != 0).then(|| (dev_of(ma, mi), ino))
        })
        .collect()
}

/// Parse `/proc/locks`: the (dev, inode) of every locked file.
pub fn parse_locks(text: &str) -> Vec<Id> {
    text.lines()
        .filter_map(|l| {
            // "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a "->"
            // marks a waiter, whose columns shift by one
            let f: Vec<&str> = l.split_whitespace().filter(|w| *w != "->").collect();
            let id = f.get(5)?;
            let mut p = id.split(':');
            let (ma, mi, ino) = (p.next()?, p.next()?, p.next()?);
            Some((
                dev_of(
                    u64::from_str_radix(ma, 16).ok()?,
                    u64::from_str_radix(mi, 16).ok()?,
                ),
                ino.parse().ok()?,
            ))
        })
        .collect()
}

fn pids(proc_: &Path) -> Vec<PathBuf> {
    fs::read_dir(proc_)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Everything processes use now: open files, mappings, cwds, roots, locks.
pub fn in_use(proc_: &Path) -> InUse {
    let mut u = InUse::default();
    let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    for pd in pids(proc_) {
        for l in ["cwd", "root"] {
            if let Some(i) = id(&pd.join(l)) {
                u.ids.insert(i);
                u.anchors.insert(i);
            }
        }
        if let Ok(rd) = fs::read_dir(pd.join("fd")) {
            for fd in rd.flatten() {
                u.ids.extend(id(&fd.path()));
            }
        }
        if let Ok(m) = fs::read_to_string(pd.join("maps")) {
            u.ids.extend(parse_maps(&m));
        }
    }
    if let Ok(l) = fs::read_to_string(proc_.join("locks")) {
        u.ids.extend(parse_locks(&l));
    }
    u
}

/// A deleted file that a process still holds open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeletedOpen {
    pub path: String,
    pub bytes: u64,
    /// "pid comm" of each holder.
    pub holders: Vec<String>,
}

/// Regular files with no name left that processes still hold open (memfds
/// excluded: they never had one), the largest first.
pub fn deleted_open(proc_: &Path) -> Vec<DeletedOpen> {
    let mut by_id: BTreeMap<Id, DeletedOpen> = BTreeMap::new();
    for pd in pids(proc_) {
        let Ok(rd) = fs::read_dir(pd.join("fd")) else {
            continue;
        };
        let comm = fs::read_to_string(pd.join("comm")).unwrap_or_default();
        let who = format!(
            "{} {}",
            pd.file_name().unwrap_or_default().to_string_lossy(),
            comm.trim()
        );
        for fd in rd.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            let Some(path) = t.strip_suffix(" (deleted)") else {
                continue;
            };
            if path.starts_with("/memfd:") {
                continue;
            }
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            if !m.is_file() || m.nlink() != 0 {
                continue;
            }
            let e = by_id
                .entry((m.dev(), m.ino()))
                .or_insert_with(|| DeletedOpen {
                    path: path.to_string(),
                    bytes: m.blocks().saturating_mul(512),
                    holders: vec![],
                });
            if !e.holders.contains(&who) {
                e.holders.push(who.clone());
            }
        }
    }
    let mut v: Vec<DeletedOpen> = by_id.into_values().collect();
    v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.path.cmp(&b.path)));
    v
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub files: u64,
    pub bytes: u64,
    pub errors: Vec<String>,
}

/// One pass over each of `roots`: walk, plan against two reads of /proc
/// (before and after all the walks), remove.
pub fn run(roots: &[&Path], proc_: &Path, now: i64, age: u64) -> Vec<Result<Pass>> {
    // /proc is read once before and once after all the walks
    let before = in_use(proc_);
    let walks: Vec<Result<(u64, Vec<Entry>)>> = roots.iter().map(|r| walk(r)).collect();
    let used = before.merge(in_use(proc_));
    roots
        .iter()
        .zip(walks)
        .map(|(root, w)| {
            let (dev, entries) = w?;
            remove(root, dev, &plan(&entries, dev, &used, now, age), now, age)
        })
        .collect()
}

/// Whether `dir` is in RAM (a tmpfs, or an overlay: the live root), so
/// that the cleanup may act on it; else why not.
pub fn in_ram(dir: &Path) -> std::result::Result<(), String> {
    use nix::sys::statfs::{OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC, statfs};
    match statfs(dir) {
        Ok(s) if s.filesystem_type() == TMPFS_MAGIC => Ok(()),
        Ok(s) if s.filesystem_type() == OVERLAYFS_SUPER_MAGIC => Ok(()),
        Ok(s) => Err(format!(
            "{} is not in RAM (filesystem type {:#x}, not a tmpfs or an overlay): not cleaned",
            dir.display(),
            s.filesystem_type().0
        )),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Remove what `plan` chose under `root`, each entry checked again first:
/// its parent reached by fd below the root (`util::safefs`: no symlink
/// followed, no mount crossed), the entry still the same inode and still
/// old, then removed by the parent's fd.
fn remove(root: &Path, dev: u64, todo: &[Entry], now: i64, age: u64) -> Result<Pass> {
    let rd = Dir::open(root).with_context(|| format!("opening {}", root.display()))?;
    let mut pass = Pass::default();
    let agei = i64::try_from(age).unwrap_or(i64::MAX);
    for e in todo {
        let Some((parent, name)) = safefs::split(&e.path) else {
            continue;
        };
        let r = rd.dir(parent).and_then(|p| {
            let Some(st) = p.lstat(name)? else {
                return Ok(false);
            };
            let newest = st.st_mtime.max(st.st_atime).max(st.st_ctime);
            if st.st_ino != e.ino || st.st_dev != dev || now.saturating_sub(newest) < agei {
                // replaced or touched since the walk: not old any more
                return Ok(false);
            }
            if e.kind == Kind::Dir {
                p.rmdir(name)
            } else {
                p.unlink(name)
            }
            .map(|_| true)
        });
        match r {
            Ok(true) => {
                if e.kind != Kind::Dir {
                    pass.files += 1;
                    pass.bytes = pass.bytes.saturating_add(e.size);
                }
            }
            Ok(false) => {}
            // a dir that got a new entry, or a race with its owner (its
            // parent gone or swapped for a symlink)
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(
                        nix::libc::ENOTEMPTY
                            | nix::libc::ENOENT
                            | nix::libc::ELOOP
                            | nix::libc::ENOTDIR
                            | nix::libc::EXDEV
                    )
                ) => {}
            Err(err) => pass
                .errors
                .push(format!("{}: {err}", root.join(&e.path).display())),
        }
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(rel: &str, kind: Kind, ino: u64, newest: i64, children: usize) -> Entry {
        Entry {
            path: rel.into(),
            rel: rel.into(),
            kind,
            dev: 1,
            ino,
            size: 10,
            newest,
            children,
        }
    }

    fn rels(v: &[Entry]) -> Vec<&str> {
        v.iter().map(|e| e.rel.as_str()).collect()
    }

    #[test]
    fn old_unused_goes_new_or_used_stays() {
        let now = 10_000;
        let entries = vec![
            e("old", Kind::File, 2, 100, 0),
            e("new", Kind::File, 3, 9_900, 0),
            e("open", Kind::File, 4, 100, 0),
            e("sock", Kind::Special, 5, 100, 0),
            e("link", Kind::Symlink, 6, 100, 0),
            e("mnt", Kind::Dir, 7, 100, 0),
        ];
        let mut used = InUse::default();
        used.ids.insert((1, 4));
        let mut mnt = entries.clone();
        mnt[5].dev = 2; // a mount point
        let p = plan(&mnt, 1, &used, now, 600);
        assert_eq!(rels(&p), vec!["link", "old"]);
    }

    #[test]
    fn dirs_go_only_when_emptied_and_deepest_first() {
        let now = 10_000;
        let entries = vec![
            e("a", Kind::Dir, 2, 100, 2),
            e("a/x", Kind::File, 3, 100, 0),
            e("a/b", Kind::Dir, 4, 100, 1),
            e("a/b/y", Kind::File, 5, 100, 0),
            e("c", Kind::Dir, 6, 100, 1),
            e("c/fresh", Kind::File, 7, 9_999, 0),
            e("d", Kind::Dir, 8, 100, 0),
        ];
        let p = plan(&entries, 1, &InUse::default(), now, 600);
        assert_eq!(rels(&p), vec!["a/b/y", "a/b", "a/x", "a", "d"]);
        // a/b open (say, an fd on the dir) keeps a/b and so a
        let mut used = InUse::default();
        used.ids.insert((1, 4));
        let p = plan(&entries, 1, &used, now, 600);
        assert_eq!(rels(&p), vec!["a/b/y", "a/x", "d"]);
        // a/b as a cwd or root keeps its whole subtree too
        used.anchors.insert((1, 4));
        let p = plan(&entries, 1, &used, now, 600);
        assert_eq!(rels(&p), vec!["a/x", "d"]);
    }

    thread_local! {
        /// Look-ups of the anchored set (`below_anchor`) on this thread.
        pub static PROBES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn the_in_use_check_scales_with_many_files_and_anchors() {
        // the review: 200k files and 2,000 cwd anchors took 2.4 s a pass
        // (every file against every anchor: 400 million comparisons). The
        // check is counted, not timed: at most one look-up per ancestor
        // of each entry.
        let now = 10_000;
        let mut entries = vec![];
        let mut used = InUse::default();
        let mut ino = 10;
        for d in 0..4000u64 {
            ino += 1;
            entries.push(e(&format!("d{d}"), Kind::Dir, ino, 100, 50));
            if d % 2 == 0 {
                used.anchors.insert((1, ino));
                used.ids.insert((1, ino));
            }
            for f in 0..50 {
                ino += 1;
                entries.push(e(&format!("d{d}/f{f}"), Kind::File, ino, 100, 0));
            }
        }
        PROBES.with(|p| p.set(0));
        let p = plan(&entries, 1, &used, now, 600);
        let probes = PROBES.with(|p| p.get());
        let ancestors: u64 = entries
            .iter()
            .map(|e| e.rel.matches('/').count() as u64)
            .sum();
        // the unanchored dirs and their files go, nothing below an anchor
        assert_eq!(p.len(), 2000 * 51);
        assert!(p.iter().all(|e| {
            let top: u64 = e.rel[1..].split('/').next().unwrap().parse().unwrap();
            top % 2 == 1
        }));
        assert!(
            probes > 0 && probes <= ancestors,
            "{probes} look-ups for {} entries with {ancestors} ancestors in all",
            entries.len()
        );
    }

    #[test]
    fn the_newest_timestamp_counts_and_kept_names_stay() {
        let entries = vec![
            e(".X11-unix", Kind::Dir, 2, 0, 0),
            e("systemd-private-abc-foo", Kind::Dir, 3, 0, 0),
            e(".X0-lock", Kind::File, 4, 0, 0),
            e("edge", Kind::File, 5, 400, 0),
        ];
        // exactly `age` old goes; a second younger stays
        assert_eq!(
            rels(&plan(&entries, 1, &InUse::default(), 1000, 600)),
            vec!["edge"]
        );
        assert!(plan(&entries, 1, &InUse::default(), 999, 600).is_empty());
    }

    #[test]
    fn proc_parsers() {
        let maps = "7f00-7f01 r-xp 00000000 08:01 1234  /usr/lib/libc.so.6\n\
                    7f02-7f03 rw-p 00000000 00:00 0 \n\
                    7f04-7f05 r--p 00001000 00:1a 99 /tmp/mapped (deleted)\n";
        assert_eq!(
            parse_maps(maps),
            vec![(dev_of(8, 1), 1234), (dev_of(0, 0x1a), 99)]
        );
        let locks = "1: POSIX  ADVISORY  WRITE 1234 00:1a:77 0 EOF\n\
                     1: -> POSIX  ADVISORY  WRITE 1235 00:1a:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 99 fd:00:5 0 EOF\n\
                     garbage line\n";
        assert_eq!(
            parse_locks(locks),
            vec![
                (dev_of(0, 0x1a), 77),
                (dev_of(0, 0x1a), 77),
                (dev_of(0xfd, 0), 5)
            ]
        );
    }
}
