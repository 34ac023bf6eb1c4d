//! Sync of a RAM tier: carry what the tier's overlay changed (its tmpfs
//! upper) to the tier's stage directory on the persistence partition,
//! crash-safely; `boot` folds the stage into the lower at the next boot
//! (`util::overlayfs::fold`).
//!
//! The stage mirrors the upper: after a sync, stage == upper (whiteouts,
//! opaque dirs, files, links, nodes, owners, modes, times, xattrs). The
//! lower's directories are never changed while the overlay is mounted;
//! only a copied-up file's lower inode may take a tail (`onto_lower`).
//!
//! Crash safety, per entry: a file is written to the tier's `tmp/`; once
//! every changed file is written, one `syncfs` makes them all durable (one
//! journal commit, not one per file), and only then are they renamed into
//! place (or swapped with `RENAME_EXCHANGE` when a directory is replaced),
//! so after a cut at any instant every entry of the stage is its last
//! synced version or a newer one, never torn. An append (the upper's file
//! still holds the synced bytes, checked by a SHA-256 content digest,
//! `Content`) writes only the new tail in place; a cut leaves the synced
//! prefix whole. After a boot the stage is empty (folded into the lower)
//! and the first append copies a log up whole into the upper: the record
//! of each larger synced file kept in `generation.json` (`Held`: length,
//! digest, inode) lets the sync link the lower's file into the stage and
//! append only the tail there too (`onto_lower`); anything that does not
//! agree is copied whole. The next generation
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
//! root's only, never read from the stick; only the records in
//! `generation.json` are, as untrusted input), and only changed entries
//! are written; a rename in the upper is a rename in the stage.
//!
//! An append costs one read of the whole file in RAM: the digest of the
//! synced prefix, compared, then carried on over the tail as it is
//! written, which gives the next record's digest (never the file read
//! twice; a prefix that differs is read again by the whole copy, which
//! hashes what it writes). No midstate is stored to skip the prefix: the
//! prefix must be read to be checked, and a check by a weaker, cheaper
//! hash would let a user's crafted prefix pass and the record then vouch
//! for bytes the stick does not hold. The price: SHA-256 (`sha2`, built
//! at opt-level 3, the CPU's SHA extensions detected at run time) read
//! 600–740 MB/s on the busy 2-core build machine where crc32fast read
//! 6 GB/s (`speed::digest_throughput`): a 100 MiB log's append costs
//! about 150 ms of CPU a sync instead of about 20.
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
use sha2::{Digest as _, Sha256};
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
    /// Bytes of the file in the stage, and their `Content` digest in hex
    /// (files only; empty: none).
    pub synced_len: u64,
    #[serde(default)]
    pub digest: String,
    /// The stage's file as this sync left it (files only): what the
    /// record on the partition names (`Held`).
    #[serde(default)]
    pub stick: Option<Stick>,
}

/// A file on the partition: its inode, the inode's generation number
/// (`FS_IOC_GETVERSION`: ext4 gives every new inode another one, so an
/// inode number used again is not the same file) and its mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stick {
    pub ino: u64,
    pub igen: u32,
    pub mtime_ns: i128,
}

/// The manifest's format: a manifest of another one (or none) is no
/// manifest, and the next sync rewrites everything once (but what the
/// record on the partition vouches for: `Held`).
const MANIFEST_VERSION: u32 = 3;

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
    /// What the partition holds of each larger file the tier synced, by
    /// `safefs::encode`d path: what lets the first sync after a boot
    /// append only a copied-up log's new tail (`Held`).
    #[serde(default)]
    pub files: BTreeMap<String, Held>,
}

/// One file as a sync left it on the partition (in the stage; at the
/// next boot, after the fold, in the lower): `len` bytes whose `Content`
/// digest is `sha256`, in the inode `ino` of generation `igen` with that
/// mtime. Written with the generation record and switched with it, after
/// the data is durable: it never names more than the partition holds.
///
/// Read back it is untrusted input (the partition is a stick anyone may
/// have had in hand): a record that does not parse, or an entry that is
/// not well formed, is no record, and that file is copied whole. Acting on
/// one needs more than the record: the lower's file must be that inode
/// (number and generation), of that length and mtime, with no other name,
/// and the upper's first `len` bytes must have that digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub len: u64,
    pub sha256: String,
    pub ino: u64,
    pub igen: u32,
    pub mtime_ns: i128,
}

/// A file smaller than this is copied whole after a boot (a few blocks;
/// no record is kept for it).
pub const HELD_MIN: u64 = 64 << 10;
/// At most this many records, the largest files first: about 200 bytes
/// each, rewritten with the generation record by every sync that
/// changes anything (a /var/log has a few dozen files this large).
pub const HELD_MAX: usize = 1024;
/// `generation.json` is read up to this size; a larger one is no record.
const GENERATION_MAX: u64 = 4 << 20;

impl Held {
    fn well_formed(&self) -> bool {
        self.len >= HELD_MIN
            && i64::try_from(self.len).is_ok()
            && self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// The records of the last sync, from the bytes of `generation.json`
/// (untrusted): garbage, a record too large, or a key that is not a clean
/// relative path gives none or drops that entry.
pub fn parse_held(b: &[u8]) -> BTreeMap<String, Held> {
    if b.len() as u64 > GENERATION_MAX {
        return BTreeMap::new();
    }
    let Ok(g) = serde_json::from_slice::<Generation>(b) else {
        return BTreeMap::new();
    };
    g.files
        .into_iter()
        .filter(|(k, h)| {
            h.well_formed()
                && safefs::decode(k).is_some_and(|p| {
                    !p.as_os_str().is_empty()
                        && p.as_os_str().len() <= MAX_REL
                        && safefs::check_rel(&p).is_ok()
                })
        })
        .take(HELD_MAX)
        .collect()
}

fn load_held(base: &Dir) -> BTreeMap<String, Held> {
    match base.open_read(OsStr::new("generation.json"), None) {
        Ok((f, st)) if (st.st_size as u64) <= GENERATION_MAX => {
            use std::io::Read;
            let mut b = vec![];
            match f.take(GENERATION_MAX + 1).read_to_end(&mut b) {
                Ok(_) => parse_held(&b),
                Err(_) => BTreeMap::new(),
            }
        }
        _ => BTreeMap::new(),
    }
}

/// A file's content digest: SHA-256 over its 4 KiB blocks, each block
/// that is not all zeros as its index (8 bytes, little-endian) and its
/// bytes, then the length. All-zero blocks (a hole, or written zeros)
/// are left out, so a hole costs O(1) however long (a user's exabyte-long
/// sparse file is hashed as quickly as an empty one) and the digest does
/// not depend on where the filesystem keeps holes; the encoding is
/// injective (the index orders the blocks, the length gives the last
/// one's size), so two contents with one digest would be a SHA-256
/// collision. Strong because a user writes the content: with a CRC a
/// crafted prefix could pass for the synced one. Fed in order; `finish`
/// does not consume it, so the digest of a prefix and then of the whole
/// file take one pass.
#[derive(Clone)]
pub struct Content {
    h: Sha256,
    block: Vec<u8>,
    /// Index of the block `block` holds the start of.
    idx: u64,
    len: u64,
}

const BLOCK: usize = 4096;

impl Default for Content {
    fn default() -> Self {
        let mut h = Sha256::new();
        h.update(b"mados-persistence content v1, 4096-byte blocks\0");
        Content {
            h,
            block: Vec::with_capacity(BLOCK),
            idx: 0,
            len: 0,
        }
    }
}

impl Content {
    /// One whole block: hashed unless all zeros.
    fn whole(&mut self, b: &[u8]) {
        // data blocks stop at their first non-zero byte
        if b.iter().any(|&x| x != 0) {
            self.h.update(self.idx.to_le_bytes());
            self.h.update(b);
        }
        self.idx = self.idx.wrapping_add(1);
    }

    fn flush(&mut self) {
        let block = std::mem::take(&mut self.block);
        self.whole(&block);
        self.block = block;
        self.block.clear();
    }

    pub fn update(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.block.is_empty() && b.len() >= BLOCK {
                // whole blocks straight from the caller's buffer
                let (head, rest) = b.split_at(BLOCK);
                self.whole(head);
                self.len = self.len.saturating_add(BLOCK as u64);
                b = rest;
                continue;
            }
            let n = (BLOCK - self.block.len()).min(b.len());
            self.block.extend_from_slice(&b[..n]);
            self.len = self.len.saturating_add(n as u64);
            b = &b[n..];
            if self.block.len() == BLOCK {
                self.flush();
            }
        }
    }

    pub fn zeros(&mut self, mut n: u64) {
        if !self.block.is_empty() {
            let k = n.min((BLOCK - self.block.len()) as u64);
            self.block.resize(self.block.len() + k as usize, 0);
            self.len = self.len.saturating_add(k);
            n -= k;
            if self.block.len() == BLOCK {
                self.flush();
            }
        }
        if n == 0 {
            return;
        }
        let whole = n / BLOCK as u64;
        self.idx = self.idx.wrapping_add(whole);
        self.len = self.len.saturating_add(whole * BLOCK as u64);
        let rest = (n % BLOCK as u64) as usize;
        self.block.resize(rest, 0);
        self.len = self.len.saturating_add(rest as u64);
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of what was fed so far, in hex.
    pub fn finish(&self) -> String {
        let mut h = self.h.clone();
        if self.block.iter().any(|&x| x != 0) {
            h.update(self.idx.to_le_bytes());
            h.update(&self.block);
        }
        h.update(b"len");
        h.update(self.len.to_le_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl crate::util::fsutil::Hashing for Content {
    fn data(&mut self, b: &[u8]) {
        self.update(b);
    }
    fn zeros(&mut self, n: u64) {
        Content::zeros(self, n);
    }
}

nix::ioctl_read!(fs_ioc_getversion, b'v', 1, nix::libc::c_long);

/// The inode generation number of an open file (`FS_IOC_GETVERSION`; 0
/// where the filesystem has none).
fn igen(f: &fs::File) -> u32 {
    use std::os::fd::AsRawFd;
    let mut v: nix::libc::c_long = 0;
    // SAFETY: the ioctl writes one long into `v`, on a valid open fd.
    match unsafe { fs_ioc_getversion(f.as_raw_fd(), &mut v) } {
        Ok(_) => v as u32,
        Err(_) => 0,
    }
}

/// The stage's file as written, read back from its fd.
fn stick_of(f: &fs::File) -> std::io::Result<Stick> {
    let st = nix::sys::stat::fstat(f).map_err(std::io::Error::from)?;
    Ok(Stick {
        ino: st.st_ino,
        igen: igen(f),
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
    })
}

/// The lower's file at a path, as `lstat` (and its fd) saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub regular: bool,
    pub nlink: u64,
    pub size: u64,
    pub stick: Stick,
}

/// Pure: may a copied-up file of `upper_len` bytes, with no file of this
/// boot's syncs in the stage, take only its tail after what the last
/// boot's sync left in the lower (`base`), as the record `h` says? `Ok`
/// with the length the upper's prefix digest must then be checked over;
/// else why not (the file is copied whole).
pub fn tail_after_lower(
    h: &Held,
    base: Option<&Base>,
    upper_len: u64,
) -> std::result::Result<u64, &'static str> {
    if !h.well_formed() {
        return Err("the record is not well formed");
    }
    if upper_len < h.len {
        return Err("shorter than what was synced");
    }
    let Some(b) = base else {
        return Err("not in the lower");
    };
    if !b.regular {
        return Err("not a regular file in the lower");
    }
    if b.nlink != 1 {
        return Err("another name links the lower's file");
    }
    if b.stick.ino != h.ino || b.stick.igen != h.igen {
        return Err("another file in the lower");
    }
    if b.size != h.len {
        return Err("the lower's file has another length (a sync cut short?)");
    }
    if b.stick.mtime_ns != h.mtime_ns {
        return Err("the lower's file was changed since");
    }
    Ok(h.len)
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// Entries written, appended, linked, renamed or removed in the stage.
    pub changed: u64,
    /// Bytes of file data written to the stick.
    pub bytes: u64,
    pub appended: u64,
    /// Of the appends, those onto what the last boot's sync left (a file
    /// copied up whole into the RAM upper: only its new tail written).
    pub resumed: u64,
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
    /// A directory with the opaque mark (it hides the lower's).
    opaque: bool,
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
        digest: String::new(),
        stick: None,
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
    let mut opaque = BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let d = match up.dir(&rel) {
            Ok(d) => d,
            // removed or replaced while we walk: what is there now is seen
            // by the next sync
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e).with_context(|| format!("opening {}", rel.display())),
        };
        if d.is_opaque() {
            opaque.insert(rel.clone());
        }
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
                opaque: false,
            });
        }
        // pre-order: a directory is pushed before its children are listed
        stack.extend(subdirs.into_iter().rev());
    }
    // parents first (a parent's path is a prefix of its children's)
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    for e in out.iter_mut().filter(|e| e.kind == 'd') {
        e.opaque = opaque.contains(&e.rel);
    }
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
    /// Files on the partition appended to by this sync (in the stage, or
    /// the lower's file linked into it), with the length the last sync
    /// left: cut back to it if this sync fails.
    appended_at: &'a mut Vec<Appended>,
    /// The tier's lower (the last boot's syncs, folded): what a copied-up
    /// file may be appended onto. `None` when it cannot be opened.
    lower: Option<DirCache<'a>>,
    /// The records of the last sync on the partition (`Held`).
    held: &'a BTreeMap<String, Held>,
}

/// A file on the partition appended to in place, and the length to cut
/// it back to if the sync fails.
pub(crate) struct Appended {
    /// The lower's file (linked into tmp or the stage), else the stage's.
    in_lower: bool,
    rel: PathBuf,
    len: u64,
    /// The file itself, as it was appended to: cut back through this fd,
    /// never by its path again (a bind tier's lower runs through a user's
    /// dirs, which may have been swapped for a symlink meanwhile).
    file: fs::File,
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
    let mut appended_at: Vec<Appended> = vec![];
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
fn undo_failed(t: &Tier, appended_at: &[Appended]) {
    for a in appended_at {
        // by the fd appended to: its path may lead elsewhere now
        if let Err(e) = a.file.set_len(a.len) {
            log::warn!(
                "cutting {} in the {} of {} back to its synced {} bytes: {e}",
                a.rel.display(),
                if a.in_lower { "lower" } else { "stage" },
                t.dir,
                a.len
            );
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
    appended_at: &mut Vec<Appended>,
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
    let held = load_held(&base);
    // Appends onto the lower's own file only where no user can reach
    // that file between two boots: the tier's own `lower` under its base
    // (the partition's root is root's alone). A bind tier's lower is a dir
    // of a user's home, theirs to write in a boot without the tier: its
    // owner could rewrite a file in place and set its mtime back (inode,
    // generation and length unchanged), and the record would then vouch
    // for bytes the stick does not hold; such a tier copies whole after a
    // boot (tests/root_attack_tier.rs).
    let lower = if Path::new(&t.lower) == Path::new(&t.base).join("lower") {
        Dir::open_no_symlinks(Path::new(&t.lower)).ok()
    } else {
        None
    };
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
        lower: lower.as_ref().map(DirCache::new),
        held: &held,
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
            rec.digest = next[&fk].digest.clone();
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
                        rec.digest = fo.digest.clone();
                        rec.stick = stick_of(&f).ok();
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
                Copied::Done(len, digest, stick) => {
                    rec.synced_len = len;
                    rec.digest = digest;
                    rec.stick = stick;
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
        files: held_next(&held, &next, &entries),
    };
    // root's only (0600): its records name users' files
    let gen_tmp = OsStr::new("generation.json.tmp");
    base.remove_all(gen_tmp)?;
    base.create(gen_tmp, 0o600)
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

/// The records the next generation holds: each larger file this sync
/// leaves in the stage (`next`, with a single name), and each record of
/// the last one for a path the upper does not touch (that file is still
/// the lower's as the last boot left it: no entry of the upper there, nor
/// above it but plain dirs); the `HELD_MAX` largest.
fn held_next(
    old: &BTreeMap<String, Held>,
    next: &BTreeMap<String, Rec>,
    entries: &[Ent],
) -> BTreeMap<String, Held> {
    let by_key: HashMap<&str, &Ent> = entries.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut out: Vec<(String, Held)> = vec![];
    for (k, r) in next {
        let Some(e) = by_key.get(k.as_str()) else {
            continue;
        };
        let Some(st) = r.stick else {
            continue;
        };
        let h = Held {
            len: r.synced_len,
            sha256: r.digest.clone(),
            ino: st.ino,
            igen: st.igen,
            mtime_ns: st.mtime_ns,
        };
        if r.kind == 'f' && e.st.st_nlink == 1 && h.well_formed() {
            out.push((k.clone(), h));
        }
    }
    for (k, h) in old {
        if by_key.contains_key(k.as_str()) {
            continue;
        }
        let Some(rel) = safefs::decode(k) else {
            continue;
        };
        let shadowed = rel.ancestors().skip(1).any(|a| {
            by_key
                .get(safefs::encode(a).as_str())
                .is_some_and(|e| e.kind != 'd' || e.opaque)
        });
        if !shadowed {
            out.push((k.clone(), h.clone()));
        }
    }
    out.sort_by(|a, b| b.1.len.cmp(&a.1.len).then_with(|| a.0.cmp(&b.0)));
    out.truncate(HELD_MAX);
    out.into_iter().collect()
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
/// An append counts only its new tail, after a boot too (a file the last
/// boot's record covers: its size past the record's length).
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
    // a file not synced this boot that the last boot's record covers
    // counts its tail (an estimate from sizes: the sync checks the rest)
    let held = Dir::open(Path::new(&t.base))
        .map(|b| load_held(&b))
        .unwrap_or_default();
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
            None if rec.kind == 'f' && held.get(&e.key).is_some_and(|h| h.len <= rec.size) => {
                p.files += 1;
                p.bytes = p.bytes.saturating_add(rec.size - held[&e.key].len);
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
    /// In the stage (or in tmp, to be renamed in): its synced length, the
    /// `Content` digest of those bytes, and the stage's file.
    Done(u64, String, Option<Stick>),
    /// It changed since the walk: the next sync carries it.
    Raced,
    /// It cannot be carried (reported): the stage keeps what it had.
    NotCarried,
}

/// The `Content` digest of `f`'s first `len` bytes (holes without reading
/// them), to compare and to go on from; `None` when it is shorter.
fn digest_prefix(f: &fs::File, len: u64) -> std::io::Result<Option<Content>> {
    // (past its end `copy_sparse` sees one hole: zeros, not "shorter")
    if (f.metadata()?.len()) < len {
        return Ok(None);
    }
    let mut h = Content::default();
    let (pos, _) = copy_sparse(f, None, 0, len, Some(&mut h))?;
    Ok((pos == len).then_some(h))
}

/// A file on the partition that holds the synced prefix and takes the
/// tail: `to`, `at` bytes long, the digest of those bytes so far;
/// `lower`: the lower's file, just linked into the stage, else the
/// stage's own file.
struct Onto {
    to: fs::File,
    at: u64,
    h: Content,
    lower: bool,
}

/// A file this boot's syncs have not put in the stage, copied up whole
/// into the upper from what the last boot's sync left in the lower: when
/// the record says that file is the lower's (`tail_after_lower`) and the
/// upper's first bytes have the recorded digest, the lower's file is
/// linked into the stage (the same inode, checked again through the new
/// name) to take only the tail. `None`: copy it whole.
///
/// Linked in place, not through tmp and a rename after the syncfs: the
/// stage's name is the lower's file itself, so a cut at any point leaves
/// the one file the lower has (its synced bytes whole, and maybe some of
/// the tail), never a torn replacement; the next boot's fold finds the
/// stage's name and the lower's to be one file and drops the stage's.
/// The lower's directories are never changed while the overlay is
/// mounted; the file gains a name and a tail, and the overlay does not
/// read it any more (it was copied up, and `metacopy=off`).
fn onto_lower(
    c: &mut Ctx,
    e: &Ent,
    from: &fs::File,
    len: u64,
    xattrs: &[(OsString, Vec<u8>)],
) -> Result<Option<Onto>> {
    let held = c.held;
    let Some(h) = held.get(&e.key) else {
        return Ok(None);
    };
    if len < h.len {
        return Ok(None);
    }
    let (parent, name) = split(&e.rel);
    // nothing of this boot's syncs there: else the manifest decides
    let Ok(sd) = c.stage.get(parent) else {
        return Ok(None);
    };
    if !matches!(sd.lstat(name), Ok(None)) {
        return Ok(None);
    }
    let Some(lower) = c.lower.as_mut() else {
        return Ok(None);
    };
    let Ok(ld) = lower.get(parent) else {
        return Ok(None);
    };
    let Ok(Some(lst)) = ld.lstat(name) else {
        return Ok(None);
    };
    let mut base = Base {
        regular: false,
        nlink: lst.st_nlink,
        size: lst.st_size as u64,
        stick: Stick {
            ino: lst.st_ino,
            igen: 0,
            mtime_ns: ns(lst.st_mtime, lst.st_mtime_nsec),
        },
    };
    let mut lower_xattrs = vec![];
    if safefs::kind(&lst) == Kind::File
        && let Ok((lf, fst)) = ld.open_read(name, Some(&lst))
    {
        base = Base {
            regular: true,
            nlink: fst.st_nlink,
            size: fst.st_size as u64,
            stick: Stick {
                ino: fst.st_ino,
                igen: igen(&lf),
                mtime_ns: ns(fst.st_mtime, fst.st_mtime_nsec),
            },
        };
        lower_xattrs = safefs::file_xattrs(&lf).unwrap_or_default();
    }
    let want = match tail_after_lower(h, Some(&base), len) {
        Ok(n) => n,
        Err(why) => {
            log::debug!("{}: copied whole: {why}", e.rel.display());
            return Ok(None);
        }
    };
    // an attribute the upper's file no longer has would stay behind
    if lower_xattrs
        .iter()
        .any(|(n, _)| !xattrs.iter().any(|(m, _)| m == n))
    {
        log::debug!(
            "{}: copied whole: an attribute was removed",
            e.rel.display()
        );
        return Ok(None);
    }
    let Some(hash) = digest_prefix(from, want)? else {
        return Ok(None);
    };
    if hash.finish() != h.sha256 {
        log::debug!(
            "{}: copied whole: its first {want} bytes are not what was synced",
            e.rel.display()
        );
        return Ok(None);
    }
    if ld.link(name, sd, name).is_err() {
        return Ok(None);
    }
    let linked = sd.open_write(name).ok().filter(|(f, st)| {
        st.st_dev == lst.st_dev
            && st.st_ino == h.ino
            && st.st_size as u64 == h.len
            && st.st_nlink == 2
            && igen(f) == h.igen
    });
    c.dirty.insert(parent.to_path_buf());
    let Some((to, _)) = linked else {
        sd.unlink(name)
            .with_context(|| format!("removing {} from the stage", e.rel.display()))?;
        return Ok(None);
    };
    Ok(Some(Onto {
        to,
        at: want,
        h: hash,
        lower: true,
    }))
}

/// Copy a changed file: only the new tail when it grew and its synced
/// bytes are unchanged (in this boot's stage file, or after a boot in the
/// lower's: `onto_lower`), else the whole file through tmp; holes stay
/// holes either way and cost nothing (a user's exabyte-long sparse file
/// is as quick as an empty one). The source is read from the fd
/// `open_src` checked; the digest is of the bytes written, read once.
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
    let mut onto = None;
    if let Some(o) = old
        && o.kind == 'f'
        && o.ino == st.st_ino
        && o.synced_len > 0
        && len >= o.synced_len
        && o.digest.len() == 64
        && stage_matches(&mut c.stage, &e.rel, o)
        && let Some(h) = digest_prefix(&from, o.synced_len)?
        && h.finish() == o.digest
    {
        // an append: the tail only, into the stage's own file
        let (to, tst) = c
            .stage
            .get(parent)
            .and_then(|d| d.open_write(name))
            .with_context(|| format!("opening {} in the stage", e.rel.display()))?;
        if tst.st_size as u64 == o.synced_len {
            onto = Some(Onto {
                to,
                at: o.synced_len,
                h,
                lower: false,
            });
        }
    }
    if onto.is_none() {
        onto = onto_lower(c, e, &from, len, &xattrs)?;
    }
    if let Some(Onto {
        to,
        at,
        mut h,
        lower,
    }) = onto
    {
        c.appended_at.push(Appended {
            in_lower: lower,
            rel: e.rel.clone(),
            len: at,
            file: to
                .try_clone()
                .with_context(|| format!("appending {label}"))?,
        });
        // durable with the rest at the syncfs below, before the
        // generation switches (an fdatasync each would cost a commit each)
        let (pos, written) = match copy_sparse(&from, Some(&to), at, len, Some(&mut h)) {
            Ok(x) => x,
            Err(err) if too_big(c, &err) => {
                // the file back to what was synced (a lower's file keeps
                // its new name in the stage: the same file, dropped by the
                // fold, or replaced by the next sync)
                to.set_len(at)?;
                return Ok(Copied::NotCarried);
            }
            Err(err) => return Err(err).with_context(|| format!("appending {label}")),
        };
        crate::util::fsutil::start_writeback(&to);
        safefs::set_attrs_fd(&to, &st, &xattrs, &mut c.r.not_carried, &label);
        let stick = stick_of(&to).ok();
        if lower {
            c.r.appended += 1;
            c.r.resumed += 1;
            c.r.bytes += written;
            c.r.changed += 1;
        } else if pos > at || old.is_some_and(|o| len != o.size) {
            c.r.appended += 1;
            c.r.bytes += written;
            c.r.changed += 1;
        }
        return Ok(Copied::Done(pos, h.finish(), stick));
    }
    let tn = c.tmp_name();
    let to = c
        .tmp
        .create(&tn, 0o600)
        .with_context(|| format!("creating a file in {}", t.tmp))?;
    let mut h = Content::default();
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
    let stick = stick_of(&to).ok();
    drop(to);
    c.defer(tn, &e.rel);
    c.r.bytes += written;
    c.r.changed += 1;
    Ok(Copied::Done(n, h.finish(), stick))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> String {
        let mut c = Content::default();
        c.update(b);
        c.finish()
    }

    #[test]
    fn the_content_digest_goes_on_from_a_prefix_and_skips_zero_blocks_in_o1() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // fed in odd pieces, or the prefix's digest taken on the way: the same
        let mut c = Content::default();
        let mut at_prefix = String::new();
        for (i, piece) in data.chunks(777).enumerate() {
            c.update(piece);
            if i == 40 {
                at_prefix = c.finish();
            }
        }
        assert_eq!(c.finish(), digest(&data));
        assert_eq!(at_prefix, digest(&data[..41 * 777]));
        assert_eq!(c.len(), data.len() as u64);
        // one byte more, one byte changed, a zero more: all different
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(digest(&longer), digest(&data));
        let mut changed = data.clone();
        changed[50_000] ^= 1;
        assert_ne!(digest(&changed), digest(&data));
        assert_ne!(digest(b""), digest(&[0]));
        assert_ne!(digest(&[0; 4096]), digest(&[0; 8192]));
        // a hole is its zeros, wherever it starts and ends
        for (head, hole, tail) in [(0usize, 5000u64, 10usize), (100, 4096, 1), (4096, 3, 9000)] {
            let mut a = Content::default();
            a.update(&data[..head]);
            a.zeros(hole);
            a.update(&data[..tail]);
            let mut flat = data[..head].to_vec();
            flat.extend(std::iter::repeat_n(0, hole as usize));
            flat.extend_from_slice(&data[..tail]);
            assert_eq!(a.finish(), digest(&flat), "{head} {hole} {tail}");
        }
        // an exabyte of zeros costs nothing
        let t0 = std::time::Instant::now();
        let mut huge = Content::default();
        huge.update(b"head");
        huge.zeros(1 << 60);
        huge.update(b"tail");
        let _ = huge.finish();
        assert_eq!(huge.len(), (1 << 60) + 8);
        assert!(t0.elapsed().as_millis() < 100, "{:?}", t0.elapsed());
    }

    #[test]
    fn a_sparse_file_and_its_dense_copy_have_one_digest() {
        let d = crate::util::testutil::tmp("digest-sparse");
        let sparse = fs::File::create(d.join("s")).unwrap();
        sparse.set_len(3 << 20).unwrap();
        nix::sys::uio::pwrite(&sparse, b"middle", 1 << 20).unwrap();
        let mut flat = vec![0u8; 3 << 20];
        flat[1 << 20..(1 << 20) + 6].copy_from_slice(b"middle");
        fs::write(d.join("f"), &flat).unwrap();
        let f = fs::File::open(d.join("f")).unwrap();
        let s = fs::File::open(d.join("s")).unwrap();
        let a = digest_prefix(&s, 3 << 20).unwrap().unwrap().finish();
        let b = digest_prefix(&f, 3 << 20).unwrap().unwrap().finish();
        assert_eq!(a, b);
        assert_eq!(a, digest(&flat));
        assert!(
            digest_prefix(&s, (3 << 20) + 1).unwrap().is_none(),
            "shorter"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    fn held() -> Held {
        Held {
            len: 1 << 20,
            sha256: "ab".repeat(32),
            ino: 12,
            igen: 7,
            mtime_ns: 1_700_000_000_000_000_000,
        }
    }

    fn base() -> Base {
        Base {
            regular: true,
            nlink: 1,
            size: 1 << 20,
            stick: Stick {
                ino: 12,
                igen: 7,
                mtime_ns: 1_700_000_000_000_000_000,
            },
        }
    }

    #[test]
    fn a_copied_up_file_takes_its_tail_only_when_everything_agrees() {
        let h = held();
        assert_eq!(
            tail_after_lower(&h, Some(&base()), (1 << 20) + 5),
            Ok(1 << 20)
        );
        assert_eq!(tail_after_lower(&h, Some(&base()), 1 << 20), Ok(1 << 20));
        let no = |b: Option<&Base>, len: u64| tail_after_lower(&h, b, len).unwrap_err();
        assert_eq!(
            no(Some(&base()), (1 << 20) - 1),
            "shorter than what was synced"
        );
        assert_eq!(no(None, 2 << 20), "not in the lower");
        let with = |f: &dyn Fn(&mut Base)| {
            let mut b = base();
            f(&mut b);
            tail_after_lower(&h, Some(&b), 2 << 20).unwrap_err()
        };
        assert!(with(&|b| b.regular = false).contains("not a regular"));
        assert!(with(&|b| b.nlink = 2).contains("another name"));
        assert!(with(&|b| b.stick.ino = 13).contains("another file"));
        // the inode number used again by another file
        assert!(with(&|b| b.stick.igen = 8).contains("another file"));
        // a sync cut short after its append: the lower is longer than the record
        assert!(with(&|b| b.size += 4096).contains("another length"));
        assert!(with(&|b| b.stick.mtime_ns += 1).contains("changed since"));
        // a record that is not well formed is none
        let bad = Held {
            sha256: "zz".repeat(32),
            ..held()
        };
        assert!(tail_after_lower(&bad, Some(&base()), 2 << 20).is_err());
        let small = Held {
            len: HELD_MIN - 1,
            ..held()
        };
        let mut b = base();
        b.size = small.len;
        assert!(tail_after_lower(&small, Some(&b), 2 << 20).is_err());
    }

    #[test]
    fn the_record_on_the_partition_is_untrusted_input() {
        let good = |k: &str, h: &Held| {
            serde_json::json!({"generation": 3, "finished": 1, "entries": 2,
                "files": {k: h}})
            .to_string()
        };
        let key = safefs::encode(Path::new("var/log"));
        let ok2 = parse_held(good(&key, &held()).as_bytes());
        assert_eq!(ok2.len(), 1, "{ok2:?}");
        assert_eq!(ok2[&key], held());
        // an old record without files, garbage, truncated, too large
        assert!(parse_held(br#"{"generation": 1, "finished": 1, "entries": 0}"#).is_empty());
        assert!(parse_held(b"\xff\xfe garbage").is_empty());
        let g = good(&key, &held());
        assert!(parse_held(&g.as_bytes()[..g.len() / 2]).is_empty());
        let mut big = g.clone().into_bytes();
        big.resize(GENERATION_MAX as usize + 1, b' ');
        assert!(parse_held(&big).is_empty());
        // hostile entries are dropped one by one
        for (k, h) in [
            (
                key.clone(),
                Held {
                    sha256: "AB".repeat(32),
                    ..held()
                },
            ),
            (
                key.clone(),
                Held {
                    sha256: "ab".repeat(31),
                    ..held()
                },
            ),
            (
                key.clone(),
                Held {
                    len: u64::MAX,
                    ..held()
                },
            ),
            (key.clone(), Held { len: 0, ..held() }),
            (safefs::encode(Path::new("../etc/shadow")), held()),
            (safefs::encode(Path::new("/etc/shadow")), held()),
            (String::new(), held()),
        ] {
            assert!(
                parse_held(good(&k, &h).as_bytes()).is_empty(),
                "{k:?} {h:?}"
            );
        }
        // numbers out of range: the whole record does not parse
        let neg = g.replace("\"ino\":12", "\"ino\":-1");
        assert_ne!(neg, g);
        assert!(parse_held(neg.as_bytes()).is_empty());
    }
}

#[cfg(test)]
mod speed {
    /// `cargo test --release --lib companion::sync::speed -- --ignored
    /// --nocapture`: the content digest's throughput on this CPU.
    #[test]
    #[ignore]
    fn digest_throughput() {
        let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        let t0 = std::time::Instant::now();
        let mut c = super::Content::default();
        c.update(&data);
        let d = c.finish();
        let s = t0.elapsed().as_secs_f64();
        use sha2::Digest as _;
        let t2 = std::time::Instant::now();
        let raw = sha2::Sha256::digest(&data);
        let s3 = t2.elapsed().as_secs_f64();
        eprintln!("plain sha256: {:.0} MB/s ({raw:x?})", 64.0 * 1.048576 / s3);
        let mut crc = crc32fast::Hasher::new();
        let t1 = std::time::Instant::now();
        crc.update(&data);
        let x = crc.finalize();
        let s2 = t1.elapsed().as_secs_f64();
        eprintln!(
            "content digest: {:.0} MB/s; crc32fast: {:.0} MB/s ({d} {x})",
            64.0 * 1.048576 / s,
            64.0 * 1.048576 / s2
        );
    }
}
