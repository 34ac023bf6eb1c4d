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
//! never read from the stick), and only changed entries are written; a
//! rename in the upper is a rename in the stage.

use crate::boot::tier::Tier;
use crate::util::overlayfs::{self, fsync_dir, is_opaque, is_whiteout};
use crate::util::treecopy;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub generation: u64,
    pub entries: BTreeMap<String, Rec>,
}

impl Manifest {
    pub fn load(p: &Path) -> Option<Manifest> {
        serde_json::from_slice(&fs::read(p).ok()?).ok()
    }
    pub fn save(&self, p: &Path) -> Result<()> {
        crate::util::fsutil::write_atomic(p, &serde_json::to_vec(self)?)
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
    /// What could not be carried, with the reason (sockets).
    pub not_carried: Vec<String>,
    /// How long the sync took (set by `companion::sync_all`).
    pub micros: u64,
}

fn kind_of(p: &Path, m: &fs::Metadata) -> char {
    let ft = m.file_type();
    if is_whiteout(p, m) {
        'w'
    } else if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else {
        'n'
    }
}

fn ns(s: i64, n: i64) -> i128 {
    s as i128 * 1_000_000_000 + n as i128
}

fn rec_of(p: &Path, m: &fs::Metadata) -> Rec {
    Rec {
        kind: kind_of(p, m),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
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

/// The upper's entries, parents before children.
fn walk(upper: &Path) -> Result<Vec<(String, fs::Metadata)>> {
    let mut out = vec![];
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            upper.to_path_buf()
        } else {
            upper.join(&rel)
        };
        let mut names: Vec<String> = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            // removed while we walk: it is gone in the upper
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        names.sort();
        let mut subdirs = vec![];
        for n in names {
            let r = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            let Ok(m) = fs::symlink_metadata(upper.join(&r)) else {
                continue;
            };
            if m.is_dir() {
                subdirs.push(r.clone());
            }
            out.push((r, m));
        }
        // pre-order: a directory is pushed before its children are listed
        stack.extend(subdirs.into_iter().rev());
    }
    // the stack order gives parents first; sort keeps that and is stable
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

struct Ctx<'a> {
    tmp: &'a Path,
    /// Files written to tmp but not yet durable: installed (renamed into
    /// the stage) only after one `syncfs` has made all of them durable.
    deferred: Vec<(PathBuf, PathBuf)>,
    /// The same, by stage path: a hardlink to one links to its tmp.
    deferred_at: HashMap<PathBuf, PathBuf>,
    dirty: BTreeSet<PathBuf>,
    seq: u64,
    r: Report,
}

impl Ctx<'_> {
    fn tmp_path(&mut self) -> PathBuf {
        self.seq += 1;
        self.tmp.join(format!("t{}", self.seq))
    }

    fn defer(&mut self, tmp: PathBuf, dst: PathBuf) {
        self.deferred_at.insert(dst.clone(), tmp.clone());
        self.deferred.push((tmp, dst));
    }

    fn dirty_parent(&mut self, p: &Path) {
        if let Some(d) = p.parent() {
            self.dirty.insert(d.to_path_buf());
        }
    }

    /// Put the prepared `tmp` at `dst`: a rename, or an atomic exchange
    /// when `dst` is a directory (then the old tree is removed from tmp).
    fn install(&mut self, tmp: &Path, dst: &Path) -> Result<()> {
        let below_dir = fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir());
        if below_dir {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                tmp,
                nix::fcntl::AT_FDCWD,
                dst,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .with_context(|| format!("swapping {} into {}", tmp.display(), dst.display()))?;
            self.dirty.insert(self.tmp.to_path_buf());
            overlayfs::remove_all(tmp)?;
        } else {
            fs::rename(tmp, dst)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
        }
        self.dirty_parent(dst);
        Ok(())
    }
}

/// Sync one tier. `manifest` is what the last sync left (empty after a
/// boot, or lost: then everything is rewritten once). Returns only when
/// every change is durable on the partition.
pub fn sync_tier(t: &Tier, manifest: &mut Manifest) -> Result<Report> {
    let upper = Path::new(&t.upper);
    let stage = Path::new(&t.stage);
    let tmp = Path::new(&t.tmp);
    if !upper.is_dir() {
        bail!("the tier's upper {} is not there", upper.display());
    }
    fs::create_dir_all(stage).with_context(|| format!("creating {}", stage.display()))?;
    // leftovers of an interrupted sync; an empty tmp dir stays (removing
    // and making it again would cost a journal commit on every sync)
    match fs::symlink_metadata(tmp) {
        Ok(m) if m.is_dir() => {
            for e in fs::read_dir(tmp).with_context(|| format!("listing {}", tmp.display()))? {
                overlayfs::remove_all(&e?.path())?;
            }
        }
        _ => {
            overlayfs::remove_all(tmp)?;
            fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        }
    }
    let entries = walk(upper)?;
    let now: BTreeSet<&str> = entries.iter().map(|(r, _)| r.as_str()).collect();
    let mut c = Ctx {
        tmp,
        deferred: vec![],
        deferred_at: HashMap::new(),
        dirty: BTreeSet::new(),
        seq: 0,
        r: Report {
            entries: entries.len() as u64,
            ..Default::default()
        },
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
    let mut renames: HashMap<String, (PathBuf, Rec)> = HashMap::new();
    for (rel, m) in &entries {
        if !m.is_file() || m.nlink() != 1 {
            continue;
        }
        if manifest.entries.get(rel).is_some_and(|o| o.ino == m.ino()) {
            continue;
        }
        let Some(from) = by_ino.get(&m.ino()) else {
            continue;
        };
        let fo = &manifest.entries[*from];
        let from_now = fs::symlink_metadata(upper.join(from)).ok();
        if fo.size == m.len()
            && fo.mtime_ns == ns(m.mtime(), m.mtime_nsec())
            && from_now.is_none_or(|f| f.ino() != m.ino())
            && stage_matches(&stage.join(from), fo)
        {
            let tp = c.tmp_path();
            if fs::hard_link(stage.join(from), &tp).is_ok() {
                renames.insert(rel.clone(), (tp, fo.clone()));
            }
        }
    }
    let mut next: BTreeMap<String, Rec> = BTreeMap::new();
    let mut first_link: HashMap<u64, String> = HashMap::new();
    let mut dirs_changed = vec![];
    for (rel, m) in &entries {
        let src = upper.join(rel);
        let dst = stage.join(rel);
        let mut rec = rec_of(&src, m);
        let old = manifest.entries.get(rel);
        // a hardlink's other names: link to the first in the stage
        if rec.kind == 'f' && m.nlink() > 1 {
            if let Some(first) = first_link.get(&m.ino()).cloned() {
                // the first name may still be a tmp file waiting for syncfs:
                // link to that, and wait with it
                let pending = c.deferred_at.get(&stage.join(&first)).cloned();
                let f = pending.clone().unwrap_or_else(|| stage.join(&first));
                let same = fs::symlink_metadata(&dst)
                    .ok()
                    .zip(fs::symlink_metadata(&f).ok())
                    .is_some_and(|(a, b)| a.ino() == b.ino());
                if !same {
                    let tp = c.tmp_path();
                    fs::hard_link(&f, &tp).with_context(|| format!("linking {}", dst.display()))?;
                    if pending.is_some() {
                        c.defer(tp, dst.clone());
                    } else {
                        c.install(&tp, &dst)?;
                    }
                    c.r.changed += 1;
                }
                rec.synced_len = next[&first].synced_len;
                rec.crc = next[&first].crc;
                next.insert(rel.clone(), rec);
                continue;
            }
            first_link.insert(m.ino(), rel.clone());
        }
        if let Some(o) = old
            && same_identity(o, &rec)
            && stage_matches(&dst, o)
        {
            next.insert(rel.clone(), o.clone());
            continue;
        }
        match rec.kind {
            'd' => {
                let below = fs::symlink_metadata(&dst).ok();
                if below.as_ref().is_none_or(|b| !b.is_dir()) {
                    let tp = c.tmp_path();
                    fs::create_dir(&tp).with_context(|| format!("creating {}", tp.display()))?;
                    if below.is_some() {
                        c.install(&tp, &dst)?;
                    } else {
                        fs::rename(&tp, &dst)?;
                        c.dirty_parent(&dst);
                    }
                }
                // attributes after the children: they change its mtime
                dirs_changed.push(rel.clone());
                c.r.changed += 1;
            }
            'f' if renames.contains_key(rel) => {
                let (tp, fo) = renames.remove(rel).unwrap();
                c.install(&tp, &dst)?;
                set_attrs(&src, &dst, m, &mut c.r.not_carried)?;
                rec.synced_len = fo.synced_len;
                rec.crc = fo.crc;
                c.r.renamed += 1;
                c.r.changed += 1;
            }
            'f' => {
                let (len, crc) = copy_file(&mut c, &src, &dst, m, old)?;
                rec.synced_len = len;
                rec.crc = crc;
            }
            'l' | 'w' | 'n' => {
                let tp = c.tmp_path();
                make_node(&src, &tp, m, &mut c.r)?;
                c.install(&tp, &dst)?;
                c.r.changed += 1;
            }
            _ => unreachable!(),
        }
        next.insert(rel.clone(), rec);
    }
    // what the stage has and the upper no longer does
    let gone: Vec<&String> = manifest
        .entries
        .keys()
        .filter(|r| !now.contains(r.as_str()))
        .collect();
    // nothing changed since the last sync: the stage and its generation
    // record stay as that sync left them (an empty sync writes nothing,
    // and then has nothing deferred, no dir to set, nothing gone)
    if c.r.changed == 0
        && c.r.bytes == 0
        && gone.is_empty()
        && next == manifest.entries
        && manifest.generation > 0
    {
        // still checked: syncfs reports a writeback error of the filesystem
        let f = fs::File::open(stage).with_context(|| format!("opening {}", stage.display()))?;
        nix::unistd::syncfs(&f).context("syncfs on the persistence partition")?;
        return Ok(c.r);
    }
    // the next generation record, written beside its place now so that it
    // is durable with the file contents and switched in the same commit as
    // the renames (ext4's journal commits transactions in order, so it can
    // never be durable before them)
    let base = Path::new(&t.base);
    let gen_tmp = base.join("generation.json.tmp");
    let g = Generation {
        generation: manifest.generation + 1,
        finished: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        entries: c.r.entries,
    };
    write_new(&gen_tmp, &serde_json::to_vec_pretty(&g)?)?;
    // the new file contents (and appended tails, and the record), all
    // durable at once: one syncfs rather than an fsync each, one journal
    // commit; only then renamed into the stage
    let f = fs::File::open(tmp).with_context(|| format!("opening {}", tmp.display()))?;
    nix::unistd::syncfs(&f).context("syncfs on the persistence partition")?;
    for (tp, dst) in std::mem::take(&mut c.deferred) {
        c.install(&tp, &dst)?;
    }
    // directory attributes, deepest first (setting one changes no parent)
    for rel in dirs_changed.iter().rev() {
        let (src, dst) = (upper.join(rel), stage.join(rel));
        if let Ok(m) = fs::symlink_metadata(&src) {
            set_attrs(&src, &dst, &m, &mut c.r.not_carried)?;
            sync_opaque(&src, &dst)?;
            c.dirty.insert(dst.clone());
            c.dirty_parent(&dst);
        }
    }
    // removals, deepest first
    for rel in gone.iter().rev() {
        let dst = stage.join(rel);
        if fs::symlink_metadata(&dst).is_ok() {
            overlayfs::remove_all(&dst)?;
            c.dirty_parent(&dst);
            c.r.removed += 1;
            c.r.changed += 1;
        }
    }
    // the generation switched last
    fs::rename(&gen_tmp, base.join("generation.json"))
        .with_context(|| format!("switching the generation record in {}", base.display()))?;
    c.dirty.insert(base.to_path_buf());
    // durable: every changed directory (the first fsync commits them all),
    // then the whole filesystem, checked
    let dirty = std::mem::take(&mut c.dirty);
    for d in dirty.iter().filter(|d| d.exists()) {
        fsync_dir(d)?;
    }
    fsync_dir(stage)?;
    let f = fs::File::open(stage).with_context(|| format!("opening {}", stage.display()))?;
    nix::unistd::syncfs(&f).context("syncfs on the persistence partition")?;
    manifest.generation = g.generation;
    manifest.entries = next;
    Ok(c.r)
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
}

pub fn pending(t: &Tier, manifest: &Manifest) -> Result<Pending> {
    let upper = Path::new(&t.upper);
    let entries = walk(upper)?;
    let mut p = Pending::default();
    let mut seen = BTreeSet::new();
    for (rel, m) in &entries {
        seen.insert(rel.as_str());
        p.ram = p.ram.saturating_add(m.blocks().saturating_mul(512));
        let rec = rec_of(&upper.join(rel), m);
        match manifest.entries.get(rel) {
            Some(o) if same_identity(o, &rec) => {}
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
/// makes the entry be written again).
fn stage_matches(dst: &Path, o: &Rec) -> bool {
    match fs::symlink_metadata(dst) {
        Ok(m) => match o.kind {
            'f' => m.is_file() && m.len() == o.synced_len,
            'd' => m.is_dir(),
            'l' => m.file_type().is_symlink(),
            _ => !m.is_dir(),
        },
        Err(_) => false,
    }
}

fn sync_opaque(src: &Path, dst: &Path) -> Result<()> {
    let want = is_opaque(src);
    if want != is_opaque(dst) {
        if want {
            xattr::set(dst, "trusted.overlay.opaque", b"y")
                .with_context(|| format!("marking {} opaque", dst.display()))?;
        } else {
            for n in ["trusted.overlay.opaque", "user.overlay.opaque"] {
                let _ = xattr::remove(dst, n);
            }
        }
    }
    Ok(())
}

const CHUNK: usize = 1 << 20;

/// Copy a changed file: only the new tail when it grew and its synced
/// bytes are unchanged, else the whole file (holes kept) through tmp.
fn copy_file(
    c: &mut Ctx,
    src: &Path,
    dst: &Path,
    m: &fs::Metadata,
    old: Option<&Rec>,
) -> Result<(u64, u32)> {
    let mut from = match fs::File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e).with_context(|| format!("opening {}", src.display())),
    };
    if let Some(o) = old
        && o.kind == 'f'
        && o.ino == m.ino()
        && o.synced_len > 0
        && m.len() >= o.synced_len
        && fs::symlink_metadata(dst).is_ok_and(|d| d.is_file() && d.len() == o.synced_len)
        && crc_of(&mut from, o.synced_len)? == o.crc
    {
        // an append: the tail only, fdatasync'ed
        let mut to = fs::OpenOptions::new()
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(dst)
            .with_context(|| format!("opening {}", dst.display()))?;
        from.seek(SeekFrom::Start(o.synced_len))?;
        let mut h = crc32fast::Hasher::new_with_initial_len(o.crc, o.synced_len);
        // durable with the rest at the syncfs below, before the
        // generation switches (an fdatasync each would cost a commit each)
        let n = pump(&mut from, &mut to, m.len() - o.synced_len, &mut h)?;
        crate::util::fsutil::start_writeback(&to);
        set_attrs(src, dst, m, &mut c.r.not_carried)?;
        if n > 0 || m.len() != o.size {
            c.r.appended += 1;
            c.r.bytes += n;
            c.r.changed += 1;
        }
        return Ok((o.synced_len + n, h.finalize()));
    }
    let tp = c.tmp_path();
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tp)
        .with_context(|| format!("creating {}", tp.display()))?;
    let mut h = crc32fast::Hasher::new();
    let (len, written) = copy_sparse(&mut from, &mut to, m.len(), &mut h)?;
    crate::util::fsutil::start_writeback(&to);
    drop(to);
    set_attrs(src, &tp, m, &mut c.r.not_carried)?;
    c.defer(tp, dst.to_path_buf());
    c.r.bytes += written;
    c.r.changed += 1;
    Ok((len, h.finalize()))
}

/// Write `data` to a new file at `p` (a leftover of a cut sync replaced),
/// without following a symlink; durable at the caller's syncfs.
fn write_new(p: &Path, data: &[u8]) -> Result<()> {
    let _ = fs::remove_file(p);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(p)
        .and_then(|mut f| f.write_all(data))
        .with_context(|| format!("writing {}", p.display()))
}

fn crc_of(f: &mut fs::File, len: u64) -> Result<u32> {
    f.seek(SeekFrom::Start(0))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(!h.clone().finalize()); // shorter than synced: not an append
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize())
}

fn pump(
    from: &mut fs::File,
    to: &mut fs::File,
    max: u64,
    h: &mut crc32fast::Hasher,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < max {
        let want = (max - done).min(CHUNK as u64) as usize;
        let n = from.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(done)
}

/// Copy the data regions of `from` (SEEK_DATA/SEEK_HOLE), leave holes as
/// holes, and set the length. Returns the length copied and the bytes
/// written.
fn copy_sparse(
    from: &mut fs::File,
    to: &mut fs::File,
    len: u64,
    h: &mut crc32fast::Hasher,
) -> Result<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    let mut pos: u64 = 0;
    let mut written = 0u64;
    let zeros = vec![0u8; CHUNK];
    while pos < len {
        let data = match lseek(&*from, pos as i64, Whence::SeekData) {
            Ok(d) => (d as u64).min(len),
            Err(nix::errno::Errno::ENXIO) => len, // only a hole to the end
            Err(_) => pos,                        // no SEEK_DATA: copy it all
        };
        // the hole [pos, data): hashed as zeros, not written
        let mut z = data - pos;
        while z > 0 {
            let k = z.min(CHUNK as u64) as usize;
            h.update(&zeros[..k]);
            z -= k as u64;
        }
        if data >= len {
            pos = len;
            break;
        }
        let hole = match lseek(&*from, data as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(_) => len,
        };
        from.seek(SeekFrom::Start(data))?;
        to.seek(SeekFrom::Start(data))?;
        let n = pump(from, to, hole - data, h)?;
        written += n;
        pos = data + n;
        if n < hole - data {
            break; // the file shrank while we read it
        }
    }
    to.set_len(pos)?;
    Ok((pos, written))
}

fn make_node(src: &Path, tp: &Path, m: &fs::Metadata, r: &mut Report) -> Result<()> {
    let ft = m.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, tp)
            .with_context(|| format!("creating the symlink {}", tp.display()))?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        treecopy::make_node(tp, m)?;
    } else {
        // a socket: its program makes it again; an empty file holds its place
        r.not_carried.push(format!(
            "{}: a socket (recreated by its program)",
            src.display()
        ));
        fs::File::create(tp)?;
        return Ok(());
    }
    set_attrs(src, tp, m, &mut r.not_carried)
}

/// Owner, mode, attributes, times as `util::treecopy` carries them (the
/// opaque mark included; `sync_opaque` also clears a stale one).
fn set_attrs(src: &Path, dst: &Path, m: &fs::Metadata, not: &mut Vec<String>) -> Result<()> {
    treecopy::attrs(src, dst, m, not);
    Ok(())
}
