//! Sync of a RAM tier: carry what the tier's overlay changed (its tmpfs
//! upper) to the tier's stage directory on the persistence partition,
//! crash-safely; `boot` folds the stage into the lower at the next boot
//! (`util::overlayfs::fold`).
//!
//! The stage mirrors the upper: after a sync, stage == upper (whiteouts,
//! opaque dirs, files, links, nodes, owners, modes, times, xattrs). The
//! lower is never written while the overlay is mounted.
//!
//! Crash safety, per entry: a file is written to the tier's `tmp/`; once
//! every changed file is written, one `syncfs` makes them all durable (one
//! journal commit, not one per file), and only then are they renamed into
//! place (or swapped with `RENAME_EXCHANGE` when a directory is replaced),
//! so after a cut at any instant every entry of the stage is its last
//! synced version or a newer one, never torn. An append (the upper's file
//! still holds the synced bytes, checked by CRC) writes only the new tail
//! in place; a cut leaves the synced prefix whole. The next generation
//! record is written beside `generation.json` with the data and renamed
//! over it after every other change; directories that changed are fsynced
//! and a final `syncfs` is checked. So a sync costs two journal commits
//! whatever it carries (the data, then the names), and writeback of each
//! copied file is started as it is written (`fsutil::start_writeback`) so
//! that ext4 allocates its blocks before the first commit, not in a third
//! (measured: two on 6.18, three on Debian's 6.1; bench/README.md).
//!
//! What it costs follows what changed: the upper (RAM) is walked, the
//! stage is compared against the manifest of the last sync (kept in /run,
//! root's only, never read from the stick), and only changed entries are
//! written; a rename in the upper is a rename in the stage.
//!
//! The upper is any user's to change while the sync runs, so every file
//! operation here goes through `util::safefs`: by directory fd, no symlink
//! followed, a file read only if it is still the regular file the walk
//! saw (attributes from `fstat` of the fd read), never a FIFO or device
//! opened. An entry that changed under the sync is left for the next one
//! (`Report::raced`). Names are bytes (`OsStr`); the manifest keeps them
//! in `safefs::encode`'s lossless text form.

use crate::boot::tier::Tier;
use crate::util::fsutil::copy_sparse;
use crate::util::safefs::{self, Dir, Kind, Stat, gone};
use anyhow::{Context, Result, bail};
use nix::fcntl::RenameFlags;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the last sync left in the stage, per path relative to the tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rec {
    /// 'f' file, 'd' dir, 'l' symlink, 'w' whiteout, 'n' other node
    pub kind: char,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    /// Bytes of the file in the stage, and their CRC-32 (files only).
    pub synced_len: u64,
    pub crc: u32,
}

/// The manifest's format: a manifest of another one (or none) is no
/// manifest, and the next sync rewrites everything once.
const MANIFEST_VERSION: u32 = 2;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub version: u32,
    pub generation: u64,
    /// By `safefs::encode` of the path relative to the tier.
    pub entries: BTreeMap<String, Rec>,
}

impl Manifest {
    pub fn load(p: &Path) -> Option<Manifest> {
        let b = crate::util::fsutil::read_nofollow(p, 1 << 30).ok()?;
        serde_json::from_slice::<Manifest>(&b)
            .ok()
            .filter(|m| m.version == MANIFEST_VERSION)
    }
    /// Root's only (0600): it names every file of every user in the tier,
    /// with sizes and checksums.
    pub fn save(&self, p: &Path) -> Result<()> {
        let mut m = self.clone();
        m.version = MANIFEST_VERSION;
        crate::util::fsutil::write_atomic_mode(p, &serde_json::to_vec(&m)?, 0o600)
    }
}

/// The generation record on the partition: switched last.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    pub generation: u64,
    /// Seconds since the epoch when the sync was durable.
    pub finished: u64,
    pub entries: u64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// Entries written, appended, linked, renamed or removed in the stage.
    pub changed: u64,
    /// Bytes of file data written to the stick.
    pub bytes: u64,
    pub appended: u64,
    pub renamed: u64,
    pub removed: u64,
    /// Entries in the upper now.
    pub entries: u64,
    /// Entries that changed while this sync read them (replaced, removed,
    /// turned into another kind): left as they were, for the next sync.
    pub raced: u64,
    /// What could not be carried, with the reason (sockets).
    pub not_carried: Vec<String>,
    /// How long the sync took (set by `companion::sync_all`).
    pub micros: u64,
}

/// One entry of the upper as the walk saw it.
struct Ent {
    rel: PathBuf,
    key: String,
    st: Stat,
    kind: char,
}

fn kind_char(d: &Dir, name: &OsStr, st: &Stat) -> char {
    if d.is_whiteout(name, st) {
        return 'w';
    }
    match safefs::kind(st) {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::File => 'f',
        _ => 'n',
    }
}

fn ns(s: i64, n: i64) -> i128 {
    s as i128 * 1_000_000_000 + n as i128
}

fn rec_of(e: &Ent) -> Rec {
    Rec {
        kind: e.kind,
        ino: e.st.st_ino,
        size: e.st.st_size as u64,
        mtime_ns: ns(e.st.st_mtime, e.st.st_mtime_nsec),
        ctime_ns: ns(e.st.st_ctime, e.st.st_ctime_nsec),
        synced_len: 0,
        crc: 0,
    }
}

fn same_identity(a: &Rec, b: &Rec) -> bool {
    a.kind == b.kind
        && a.ino == b.ino
        && a.size == b.size
        && a.mtime_ns == b.mtime_ns
        && a.ctime_ns == b.ctime_ns
}

/// The longest path below the tier the sync carries: a path is resolved
/// by one `openat2`, which takes at most `PATH_MAX` (4096) bytes. What
/// lies deeper is reported, not carried (it failed every sync before).
const MAX_REL: usize = 4000;

/// The upper's entries, parents before children, each listed and
/// lstat'ed through its directory's fd; and what is too deep to carry.
fn walk(up: &Dir) -> Result<(Vec<Ent>, Vec<String>)> {
    let mut out = vec![];
    let mut too_deep = vec![];
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let d = match up.dir(&rel) {
            Ok(d) => d,
            // removed or replaced while we walk: what is there now is seen
            // by the next sync
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e).with_context(|| format!("opening {}", rel.display())),
        };
        let names = match d.list() {
            Ok(n) => n,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", rel.display())),
        };
        let mut subdirs = vec![];
        for n in names {
            let r = rel.join(&n);
            if r.as_os_str().len() > MAX_REL {
                too_deep.push(format!(
                    "{}/…: a path too long (more than {MAX_REL} bytes; not carried, with what is below it)",
                    rel.display()
                ));
                break;
            }
            let Ok(Some(st)) = d.lstat(&n) else {
                continue;
            };
            let kind = kind_char(&d, &n, &st);
            if kind == 'd' {
                subdirs.push(r.clone());
            }
            out.push(Ent {
                key: safefs::encode(&r),
                rel: r,
                st,
                kind,
            });
        }
        // pre-order: a directory is pushed before its children are listed
        stack.extend(subdirs.into_iter().rev());
    }
    // parents first (a parent's path is a prefix of its children's)
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, too_deep))
}

/// The last directory opened below a root, kept for the next entry (the
/// walk's order puts siblings together); forgotten when the tree below
/// the root is rearranged by us.
struct DirCache<'a> {
    root: &'a Dir,
    last: Option<(PathBuf, Dir)>,
}

impl<'a> DirCache<'a> {
    fn new(root: &'a Dir) -> Self {
        DirCache { root, last: None }
    }
    fn get(&mut self, p: &Path) -> std::io::Result<&Dir> {
        if self.last.as_ref().is_none_or(|(q, _)| q != p) {
            let d = self.root.dir(p)?;
            self.last = Some((p.to_path_buf(), d));
        }
        Ok(&self.last.as_ref().unwrap().1)
    }
    fn forget(&mut self) {
        self.last = None;
    }
}

fn split(rel: &Path) -> (&Path, &OsStr) {
    safefs::split(rel).expect("an entry has a name")
}

struct Ctx<'a> {
    up: DirCache<'a>,
    stage: DirCache<'a>,
    tmp: &'a Dir,
    /// Files written to tmp but not yet durable: installed (renamed into
    /// the stage) only after one `syncfs` has made all of them durable.
    deferred: Vec<(OsString, PathBuf)>,
    /// The same, by stage path: a hardlink to one links to its tmp name.
    deferred_at: HashMap<PathBuf, OsString>,
    /// Stage dirs (relative) whose entries changed; `tmp_dirty` for tmp.
    dirty: BTreeSet<PathBuf>,
    tmp_dirty: bool,
    seq: u64,
    r: Report,
    /// Stage files appended to in place by this sync, with the length
    /// the last sync left: cut back to it if this sync fails.
    appended_at: &'a mut Vec<(PathBuf, u64)>,
}

impl Ctx<'_> {
    fn tmp_name(&mut self) -> OsString {
        self.seq += 1;
        OsString::from(format!("t{}", self.seq))
    }

    fn defer(&mut self, tname: OsString, dst: &Path) {
        self.deferred_at.insert(dst.to_path_buf(), tname.clone());
        self.deferred.push((tname, dst.to_path_buf()));
    }

    /// Put tmp's `tname` at `dst` in the stage: a rename, or an atomic
    /// exchange when `dst` or `tname` is a directory (then the old entry
    /// is removed from tmp). Neither side is followed.
    fn install(&mut self, tname: &OsStr, dst: &Path) -> Result<()> {
        let (parent, name) = split(dst);
        self.stage.forget();
        let pd = self
            .stage
            .root
            .dir(parent)
            .with_context(|| format!("opening {} in the stage", parent.display()))?;
        // rename(2) puts a file over a file, a dir over an empty dir; a
        // dir over a non-dir or anything over a dir is an exchange, then
        // the old entry leaves from tmp
        let below = pd.lstat(name)?;
        let is_dir = |st: &Stat| safefs::kind(st) == Kind::Dir;
        let new_dir = self.tmp.lstat(tname)?.is_some_and(|t| is_dir(&t));
        if below.is_some_and(|b| is_dir(&b) || new_dir) {
            self.tmp
                .rename(tname, &pd, name, RenameFlags::RENAME_EXCHANGE)
                .with_context(|| format!("swapping a new {} into the stage", dst.display()))?;
            self.tmp_dirty = true;
            self.tmp
                .remove_all(tname)
                .with_context(|| format!("removing the old {} from tmp", dst.display()))?;
        } else {
            self.tmp
                .rename(tname, &pd, name, RenameFlags::empty())
                .with_context(|| format!("renaming a new {} into the stage", dst.display()))?;
        }
        self.dirty.insert(parent.to_path_buf());
        Ok(())
    }
}

/// Open `rel`'s parent in the upper and the file itself, if it is still
/// the regular file the walk saw. `None` when it changed meanwhile.
fn open_src(c: &mut Ctx, e: &Ent) -> Result<Option<(fs::File, Stat)>> {
    let (parent, name) = split(&e.rel);
    let r =
        c.up.get(parent)
            .and_then(|d| d.open_read(name, Some(&e.st)));
    match r {
        Ok(x) => Ok(Some(x)),
        Err(err) if gone(&err) => Ok(None),
        Err(err) => Err(err).with_context(|| format!("opening {}", e.rel.display())),
    }
}

/// Why a sync could not write, when the stick or its filesystem said so
/// (`ENOSPC`, `EDQUOT`, `EIO`, `EROFS` anywhere in the error's chain): a
/// fixed sentence naming the reason and no file (it goes into
/// `syncs.json`, which everyone may read).
pub fn fault(e: &anyhow::Error) -> Option<&'static str> {
    let code = e.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            .or_else(|| c.downcast_ref::<nix::errno::Errno>().map(|n| *n as i32))
    })?;
    Some(match code {
        nix::libc::ENOSPC => "the persistence partition is full (ENOSPC)",
        nix::libc::EDQUOT => "the disk quota on the persistence partition is used up (EDQUOT)",
        nix::libc::EIO => "the stick reported an I/O error (EIO)",
        nix::libc::EROFS => "the persistence partition is read-only (EROFS)",
        _ => return None,
    })
}

/// Sync one tier. `manifest` is what the last sync left (empty after a
/// boot, or lost: then everything is rewritten once). Returns only when
/// every change is durable on the partition.
///
/// A sync that fails (a full partition, an I/O error) leaves the stage as
/// the last good sync left it or newer, entry by entry: files appended to
/// in place are cut back to their synced length, the tier's `tmp/` and
/// the next generation record are removed (they would hold space the
/// next sync needs), and the manifest is not changed, so the next sync
/// carries everything again. The error names the reason first.
pub fn sync_tier(t: &Tier, manifest: &mut Manifest) -> Result<Report> {
    let mut appended_at = vec![];
    let r = sync_tier_inner(t, manifest, &mut appended_at);
    let Err(e) = r else { return r };
    undo_failed(t, &appended_at);
    Err(match fault(&e) {
        Some(f) => e.context(format!(
            "{f}: what changed in {} since the last sync stays in RAM, not saved; what was synced before is kept",
            t.dir
        )),
        None => e,
    })
}

/// After a failed sync: appended stage files back to their synced length,
/// tmp emptied, the unswitched generation record gone. Each step is
/// tried, a failure only logged (the sync's own error is what counts).
fn undo_failed(t: &Tier, appended_at: &[(PathBuf, u64)]) {
    if let Ok(stage) = Dir::open(Path::new(&t.stage)) {
        for (rel, len) in appended_at {
            let (parent, name) = split(rel);
            let r = stage
                .dir(parent)
                .and_then(|d| d.open_write(name))
                .and_then(|(f, _)| f.set_len(*len));
            if let Err(e) = r {
                log::warn!(
                    "cutting {} in the stage of {} back to its synced {len} bytes: {e}",
                    rel.display(),
                    t.dir
                );
            }
        }
    }
    if let Ok(d) = Dir::open(Path::new(&t.tmp))
        && let Err(e) = d.clear()
    {
        log::warn!("emptying {} after a failed sync: {e}", t.tmp);
    }
    if let Ok(b) = Dir::open(Path::new(&t.base)) {
        let _ = b.remove_all(OsStr::new("generation.json.tmp"));
    }
}

fn sync_tier_inner(
    t: &Tier,
    manifest: &mut Manifest,
    appended_at: &mut Vec<(PathBuf, u64)>,
) -> Result<Report> {
    let upper_p = Path::new(&t.upper);
    let Ok(up) = Dir::open(upper_p) else {
        bail!("the tier's upper {} is not there", upper_p.display());
    };
    let stage = Dir::open_or_create(Path::new(&t.stage))
        .with_context(|| format!("opening the stage {}", t.stage))?;
    let base = Dir::open(Path::new(&t.base)).with_context(|| format!("opening {}", t.base))?;
    // leftovers of an interrupted sync; an empty tmp dir stays (removing
    // and making it again would cost a journal commit on every sync)
    let tmp = open_tmp(Path::new(&t.tmp))?;
    let (entries, too_deep) = walk(&up)?;
    let now: BTreeSet<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    let mut c = Ctx {
        up: DirCache::new(&up),
        stage: DirCache::new(&stage),
        tmp: &tmp,
        deferred: vec![],
        deferred_at: HashMap::new(),
        dirty: BTreeSet::new(),
        tmp_dirty: false,
        seq: 0,
        r: Report {
            entries: entries.len() as u64,
            not_carried: too_deep,
            ..Default::default()
        },
        appended_at,
    };
    // Renames: a file whose inode, size and mtime the last sync carried
    // under another name is hard-linked from there into tmp first (the old
    // name stays until its own turn), then put in place: no data written.
    let by_ino: HashMap<u64, &String> = manifest
        .entries
        .iter()
        .filter(|(_, r)| r.kind == 'f')
        .map(|(p, r)| (r.ino, p))
        .collect();
    let by_key: HashMap<&str, &Ent> = entries.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut renames: HashMap<String, (OsString, Rec)> = HashMap::new();
    for e in &entries {
        if e.kind != 'f' || e.st.st_nlink != 1 {
            continue;
        }
        if manifest
            .entries
            .get(&e.key)
            .is_some_and(|o| o.ino == e.st.st_ino)
        {
            continue;
        }
        let Some(from) = by_ino.get(&e.st.st_ino) else {
            continue;
        };
        let fo = &manifest.entries[*from];
        let Some(from_rel) = safefs::decode(from) else {
            continue;
        };
        if fo.size == e.st.st_size as u64
            && fo.mtime_ns == ns(e.st.st_mtime, e.st.st_mtime_nsec)
            && by_key
                .get(from.as_str())
                .is_none_or(|f| f.st.st_ino != e.st.st_ino)
            && stage_matches(&mut c.stage, &from_rel, fo)
        {
            let tn = c.tmp_name();
            let (fp, fname) = split(&from_rel);
            let linked = c
                .stage
                .get(fp)
                .and_then(|d| d.link(fname, &tmp, &tn))
                .is_ok();
            // what was linked must be the regular file of that size
            if linked
                && tmp
                    .open_read(&tn, None)
                    .is_ok_and(|(_, st)| st.st_size as u64 == fo.synced_len)
            {
                renames.insert(e.key.clone(), (tn, fo.clone()));
            } else if linked {
                tmp.remove_all(&tn)?;
            }
        }
    }
    let mut next: BTreeMap<String, Rec> = BTreeMap::new();
    let mut first_link: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs_changed: Vec<PathBuf> = vec![];
    for e in &entries {
        let mut rec = rec_of(e);
        let old = manifest.entries.get(&e.key);
        // a hardlink's other names: link to the first in the stage
        if rec.kind == 'f'
            && e.st.st_nlink > 1
            && let Some(first) = first_link.get(&e.st.st_ino).cloned()
        {
            link_again(&mut c, &first, &e.rel)?;
            let fk = safefs::encode(&first);
            rec.synced_len = next[&fk].synced_len;
            rec.crc = next[&fk].crc;
            next.insert(e.key.clone(), rec);
            continue;
        }
        if let Some(o) = old
            && same_identity(o, &rec)
            && stage_matches(&mut c.stage, &e.rel, o)
        {
            if rec.kind == 'f' && e.st.st_nlink > 1 {
                first_link.insert(e.st.st_ino, e.rel.clone());
            }
            next.insert(e.key.clone(), o.clone());
            continue;
        }
        let done = match rec.kind {
            'd' => {
                let (parent, name) = split(&e.rel);
                let below = c
                    .stage
                    .get(parent)
                    .with_context(|| format!("opening {} in the stage", parent.display()))?
                    .lstat(name)?;
                if below.is_none_or(|b| safefs::kind(&b) != Kind::Dir) {
                    let tn = c.tmp_name();
                    tmp.mkdir(&tn, 0o700)
                        .with_context(|| format!("creating a dir in {}", t.tmp))?;
                    c.install(&tn, &e.rel)?;
                }
                // attributes after the children: they change its mtime
                dirs_changed.push(e.rel.clone());
                c.r.changed += 1;
                true
            }
            'f' if renames.contains_key(&e.key) => {
                let (tn, fo) = renames.remove(&e.key).unwrap();
                match open_src(&mut c, e)? {
                    Some((src, st)) => {
                        let xattrs = safefs::file_xattrs(&src).unwrap_or_default();
                        let (f, _) = tmp.open_read(&tn, None)?;
                        safefs::set_attrs_fd(&f, &st, &xattrs, &mut c.r.not_carried, &what(t, e));
                        c.install(&tn, &e.rel)?;
                        rec.synced_len = fo.synced_len;
                        rec.crc = fo.crc;
                        c.r.renamed += 1;
                        c.r.changed += 1;
                        true
                    }
                    None => {
                        tmp.remove_all(&tn)?;
                        false
                    }
                }
            }
            'f' => match copy_file(&mut c, t, e, old)? {
                Copied::Done(len, crc) => {
                    rec.synced_len = len;
                    rec.crc = crc;
                    true
                }
                Copied::Raced => false,
                Copied::NotCarried => {
                    if let Some(o) = old {
                        next.insert(e.key.clone(), o.clone());
                    }
                    continue;
                }
            },
            'l' | 'w' | 'n' => {
                let tn = c.tmp_name();
                if make_node(&mut c, t, e, &tn)? {
                    c.install(&tn, &e.rel)?;
                    c.r.changed += 1;
                    true
                } else {
                    false
                }
            }
            _ => unreachable!(),
        };
        if done {
            if rec.kind == 'f' && e.st.st_nlink > 1 {
                first_link.insert(e.st.st_ino, e.rel.clone());
            }
            next.insert(e.key.clone(), rec);
        } else {
            // changed under us: the stage keeps what it had (its record
            // too), and the next sync carries what is there then
            c.r.raced += 1;
            if let Some(o) = old {
                next.insert(e.key.clone(), o.clone());
            }
        }
    }
    for (_, (tn, _)) in renames.drain() {
        tmp.remove_all(&tn)?;
    }
    // what the stage has and the upper no longer does
    let gone_keys: Vec<&String> = manifest
        .entries
        .keys()
        .filter(|r| !now.contains(r.as_str()))
        .collect();
    // nothing changed since the last sync: the stage and its generation
    // record stay as that sync left them (an empty sync writes nothing,
    // and then has nothing deferred, no dir to set, nothing gone)
    if c.r.changed == 0
        && c.r.bytes == 0
        && gone_keys.is_empty()
        && next == manifest.entries
        && manifest.generation > 0
    {
        // still checked: syncfs reports a writeback error of the filesystem
        stage
            .syncfs()
            .context("syncfs on the persistence partition")?;
        return Ok(c.r);
    }
    // the next generation record, written beside its place now so that it
    // is durable with the file contents and switched in the same commit as
    // the renames (ext4's journal commits transactions in order, so it can
    // never be durable before them)
    let g = Generation {
        generation: manifest.generation + 1,
        finished: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        entries: c.r.entries,
    };
    let gen_tmp = OsStr::new("generation.json.tmp");
    base.remove_all(gen_tmp)?;
    base.create(gen_tmp, 0o644)
        .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(&g)?))
        .with_context(|| format!("writing the generation record in {}", t.base))?;
    // the new file contents (and appended tails, and the record), all
    // durable at once: one syncfs rather than an fsync each, one journal
    // commit; only then renamed into the stage
    tmp.syncfs()
        .context("syncfs on the persistence partition")?;
    for (tn, dst) in std::mem::take(&mut c.deferred) {
        c.install(&tn, &dst)?;
    }
    // directory attributes, deepest first (setting one changes no parent)
    for rel in dirs_changed.iter().rev() {
        dir_attrs(&mut c, t, rel)?;
    }
    // removals, deepest first
    for key in gone_keys.iter().rev() {
        let Some(rel) = safefs::decode(key) else {
            continue;
        };
        let (parent, name) = split(&rel);
        // a parent that is not a plain dir of the stage (replaced by a
        // symlink or removed) holds nothing of ours to remove
        let Ok(pd) = stage.dir(parent) else {
            continue;
        };
        if pd.lstat(name)?.is_some() {
            pd.remove_all(name)
                .with_context(|| format!("removing {} from the stage", rel.display()))?;
            c.dirty.insert(parent.to_path_buf());
            c.r.removed += 1;
            c.r.changed += 1;
        }
    }
    // the generation switched last
    base.rename(
        gen_tmp,
        &base,
        OsStr::new("generation.json"),
        RenameFlags::empty(),
    )
    .with_context(|| format!("switching the generation record in {}", t.base))?;
    // durable: every changed directory (the first fsync commits them all),
    // then the whole filesystem, checked
    for d in std::mem::take(&mut c.dirty) {
        match stage.dir(&d) {
            Ok(dd) => dd
                .fsync()
                .with_context(|| format!("syncing the directory {} of the stage", d.display()))?,
            // replaced meanwhile: nothing of ours to sync there
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("opening {}", d.display())),
        }
    }
    if c.tmp_dirty {
        tmp.fsync().context("syncing the tier's tmp")?;
    }
    base.fsync().context("syncing the tier's directory")?;
    stage
        .syncfs()
        .context("syncfs on the persistence partition")?;
    manifest.generation = g.generation;
    manifest.entries = next;
    Ok(c.r)
}

/// The tier's tmp dir, emptied; made again if it is not a plain dir.
fn open_tmp(p: &Path) -> Result<Dir> {
    if let Ok(d) = Dir::open(p) {
        d.clear()
            .with_context(|| format!("emptying {}", p.display()))?;
        return Ok(d);
    }
    let (parent, name) = (
        p.parent().context("tmp has no parent")?,
        p.file_name().context("tmp has no name")?,
    );
    let pd = Dir::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    pd.remove_all(name)?;
    pd.mkdir(name, 0o700)?;
    Dir::open(p).with_context(|| format!("opening {}", p.display()))
}

/// How a source entry is named in what could not be carried.
fn what(t: &Tier, e: &Ent) -> String {
    Path::new(&t.upper).join(&e.rel).display().to_string()
}

/// Another name of a hardlinked file: linked to the first name's stage
/// file (or its tmp file while that waits for the syncfs).
fn link_again(c: &mut Ctx, first: &Path, rel: &Path) -> Result<()> {
    let pending = c.deferred_at.get(first).cloned();
    let (fp, fname) = split(first);
    let (rp, rname) = split(rel);
    let first_st = match &pending {
        Some(tn) => c.tmp.lstat(tn)?,
        None => c
            .stage
            .get(fp)
            .ok()
            .and_then(|d| d.lstat(fname).ok().flatten()),
    };
    let here = c
        .stage
        .get(rp)
        .ok()
        .and_then(|d| d.lstat(rname).ok().flatten());
    if first_st
        .zip(here)
        .is_some_and(|(a, b)| safefs::same(&a, &b))
    {
        return Ok(());
    }
    let tn = c.tmp_name();
    match &pending {
        Some(ft) => c.tmp.link(ft, c.tmp, &tn),
        None => c.stage.get(fp).and_then(|d| d.link(fname, c.tmp, &tn)),
    }
    .with_context(|| format!("linking {}", rel.display()))?;
    if pending.is_some() {
        c.defer(tn, rel);
    } else {
        c.install(&tn, rel)?;
    }
    c.r.changed += 1;
    Ok(())
}

/// A changed directory takes the upper's owner, mode, attributes, times
/// and opaque mark, read from and set on the two dirs' own fds.
fn dir_attrs(c: &mut Ctx, t: &Tier, rel: &Path) -> Result<()> {
    let Ok(src) = c.up.root.dir(rel) else {
        c.r.raced += 1;
        return Ok(()); // gone from the upper: its removal is the next sync's
    };
    let dst = match c.stage.root.dir(rel) {
        Ok(d) => d,
        Err(e) if gone(&e) => {
            c.r.raced += 1;
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("opening {} in the stage", rel.display())),
    };
    let st = src.stat()?;
    let xattrs = src.own_xattrs().unwrap_or_default();
    let label = Path::new(&t.upper).join(rel).display().to_string();
    dst.set_own_attrs(&st, &xattrs, &mut c.r.not_carried, &label);
    let want = src.is_opaque();
    if want != dst.is_opaque() {
        dst.set_opaque(want).with_context(|| {
            format!("setting the opaque mark of {} in the stage", rel.display())
        })?;
    }
    c.dirty.insert(rel.to_path_buf());
    c.dirty
        .insert(rel.parent().unwrap_or(Path::new("")).to_path_buf());
    Ok(())
}

/// What a sync would carry now, from one walk of the upper against the
/// manifest, without writing anything: the "dirty" counts the stats show.
/// An append counts only its new tail.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub files: u64,
    pub bytes: u64,
    /// What the upper takes in RAM (allocated blocks).
    pub ram: u64,
    /// The oldest modification time among the changed entries still in
    /// the upper (Unix ms; 0: none, or only removals).
    pub oldest_ms: u64,
}

pub fn pending(t: &Tier, manifest: &Manifest) -> Result<Pending> {
    let up = Dir::open(Path::new(&t.upper)).with_context(|| format!("opening {}", t.upper))?;
    let (entries, _) = walk(&up)?;
    let mut p = Pending::default();
    let mut seen = BTreeSet::new();
    for e in &entries {
        seen.insert(e.key.as_str());
        p.ram = p
            .ram
            .saturating_add((e.st.st_blocks as u64).saturating_mul(512));
        let rec = rec_of(e);
        match manifest.entries.get(&e.key) {
            Some(o) if same_identity(o, &rec) => continue,
            _ => {}
        }
        let ms = u64::try_from(rec.mtime_ns / 1_000_000).unwrap_or(0);
        if ms > 0 && (p.oldest_ms == 0 || ms < p.oldest_ms) {
            p.oldest_ms = ms;
        }
        match manifest.entries.get(&e.key) {
            Some(o)
                if o.kind == 'f' && rec.kind == 'f' && o.ino == rec.ino && rec.size >= o.size =>
            {
                p.files += 1;
                p.bytes = p
                    .bytes
                    .saturating_add(rec.size - o.synced_len.min(rec.size));
            }
            _ => {
                p.files += 1;
                if rec.kind == 'f' {
                    p.bytes = p.bytes.saturating_add(rec.size);
                }
            }
        }
    }
    p.files += manifest
        .entries
        .keys()
        .filter(|r| !seen.contains(r.as_str()))
        .count() as u64;
    Ok(p)
}

/// The stage still holds what the manifest says (a lost or stale manifest
/// makes the entry be written again); looked at through the stage's fds.
fn stage_matches(stage: &mut DirCache, rel: &Path, o: &Rec) -> bool {
    let (parent, name) = split(rel);
    let Ok(Some(st)) = stage.get(parent).and_then(|d| d.lstat(name)) else {
        return false;
    };
    match o.kind {
        'f' => safefs::kind(&st) == Kind::File && st.st_size as u64 == o.synced_len,
        'd' => safefs::kind(&st) == Kind::Dir,
        'l' => safefs::kind(&st) == Kind::Symlink,
        _ => safefs::kind(&st) != Kind::Dir,
    }
}

/// What became of a changed file.
enum Copied {
    /// In the stage (or in tmp, to be renamed in): its synced length and
    /// the CRC-32 of those bytes.
    Done(u64, u32),
    /// It changed since the walk: the next sync carries it.
    Raced,
    /// It cannot be carried (reported): the stage keeps what it had.
    NotCarried,
}

/// The CRC-32 of `f`'s first `len` bytes (holes hashed as zeros without
/// reading them); `None` when it is shorter.
fn crc_prefix(f: &fs::File, len: u64) -> std::io::Result<Option<u32>> {
    let mut h = crc32fast::Hasher::new();
    let (pos, _) = copy_sparse(f, None, 0, len, Some(&mut h))?;
    Ok((pos == len).then(|| h.finalize()))
}

/// Copy a changed file: only the new tail when it grew and its synced
/// bytes are unchanged, else the whole file through tmp; holes stay
/// holes either way and cost nothing (a user's exabyte-long sparse file
/// is as quick as an empty one). The source is read from the fd
/// `open_src` checked.
fn copy_file(c: &mut Ctx, t: &Tier, e: &Ent, old: Option<&Rec>) -> Result<Copied> {
    let Some((from, st)) = open_src(c, e)? else {
        return Ok(Copied::Raced);
    };
    let len = st.st_size as u64;
    let xattrs = safefs::file_xattrs(&from).unwrap_or_default();
    let label = what(t, e);
    let (parent, name) = split(&e.rel);
    let too_big = |c: &mut Ctx, err: &std::io::Error| {
        let big = err.raw_os_error() == Some(nix::libc::EFBIG);
        if big {
            c.r.not_carried.push(format!(
                "{label}: {len} bytes long, more than a file on the partition may be"
            ));
        }
        big
    };
    if let Some(o) = old
        && o.kind == 'f'
        && o.ino == st.st_ino
        && o.synced_len > 0
        && len >= o.synced_len
        && stage_matches(&mut c.stage, &e.rel, o)
        && crc_prefix(&from, o.synced_len)? == Some(o.crc)
    {
        // an append: the tail only, into the stage's own file
        let (to, tst) = c
            .stage
            .get(parent)
            .and_then(|d| d.open_write(name))
            .with_context(|| format!("opening {} in the stage", e.rel.display()))?;
        if tst.st_size as u64 == o.synced_len {
            c.appended_at.push((e.rel.clone(), o.synced_len));
            let mut h = crc32fast::Hasher::new_with_initial_len(o.crc, o.synced_len);
            // durable with the rest at the syncfs below, before the
            // generation switches (an fdatasync each would cost a commit each)
            let (pos, written) =
                match copy_sparse(&from, Some(&to), o.synced_len, len, Some(&mut h)) {
                    Ok(x) => x,
                    Err(err) if too_big(c, &err) => {
                        // the stage's file back to what was synced
                        to.set_len(o.synced_len)?;
                        return Ok(Copied::NotCarried);
                    }
                    Err(err) => return Err(err).with_context(|| format!("appending {label}")),
                };
            crate::util::fsutil::start_writeback(&to);
            safefs::set_attrs_fd(&to, &st, &xattrs, &mut c.r.not_carried, &label);
            if pos > o.synced_len || len != o.size {
                c.r.appended += 1;
                c.r.bytes += written;
                c.r.changed += 1;
            }
            return Ok(Copied::Done(pos, h.finalize()));
        }
    }
    let tn = c.tmp_name();
    let to = c
        .tmp
        .create(&tn, 0o600)
        .with_context(|| format!("creating a file in {}", t.tmp))?;
    let mut h = crc32fast::Hasher::new();
    let (n, written) = match copy_sparse(&from, Some(&to), 0, len, Some(&mut h)) {
        Ok(x) => x,
        Err(err) if too_big(c, &err) => {
            drop(to);
            c.tmp.remove_all(&tn)?;
            return Ok(Copied::NotCarried);
        }
        Err(err) => return Err(err).with_context(|| format!("copying {label}")),
    };
    crate::util::fsutil::start_writeback(&to);
    safefs::set_attrs_fd(&to, &st, &xattrs, &mut c.r.not_carried, &label);
    drop(to);
    c.defer(tn, &e.rel);
    c.r.bytes += written;
    c.r.changed += 1;
    Ok(Copied::Done(n, h.finalize()))
}

/// A symlink, a whiteout, a FIFO, a device node or a socket's stand-in
/// at tmp's `tn`, like the upper's entry; `false` when that entry changed
/// since the walk. Nothing of the entry is opened.
fn make_node(c: &mut Ctx, t: &Tier, e: &Ent, tn: &OsStr) -> Result<bool> {
    let (parent, name) = split(&e.rel);
    let label = what(t, e);
    let src = match c.up.get(parent) {
        Ok(d) => d,
        Err(err) if gone(&err) => return Ok(false),
        Err(err) => return Err(err).with_context(|| format!("opening {}", parent.display())),
    };
    // still the entry the walk saw
    match src.lstat(name) {
        Ok(Some(now)) if safefs::same(&now, &e.st) && now.st_mode == e.st.st_mode => {}
        Ok(_) => return Ok(false),
        Err(err) if gone(&err) => return Ok(false),
        Err(err) => return Err(err).with_context(|| format!("reading {label}")),
    }
    let xattrs = src.xattrs(name).unwrap_or_default();
    match safefs::kind(&e.st) {
        Kind::Symlink => {
            let target = match src.readlink(name) {
                Ok(t) => t,
                Err(err) if gone(&err) || err.raw_os_error() == Some(nix::libc::EINVAL) => {
                    return Ok(false);
                }
                Err(err) => return Err(err).with_context(|| format!("reading the link {label}")),
            };
            c.tmp
                .symlink(&target, tn)
                .with_context(|| format!("creating a symlink in {}", t.tmp))?;
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            c.tmp
                .mknod(tn, &e.st)
                .with_context(|| format!("creating a node in {}", t.tmp))?;
        }
        Kind::File => {
            // a whiteout of the file form (zero size, the whiteout
            // attribute): made empty, the attribute carried below
            c.tmp.create(tn, 0o600)?;
        }
        _ => {
            // a socket: its program makes it again; an empty file holds
            // its place
            c.r.not_carried
                .push(format!("{label}: a socket (recreated by its program)"));
            c.tmp.create(tn, 0o600)?;
            return Ok(true);
        }
    }
    c.tmp
        .set_entry_attrs(tn, &e.st, &xattrs, &mut c.r.not_carried, &label);
    Ok(true)
}
