//! Overlays set aside on the partition (`set-aside/<name>/overlays`, by
//! `iso_build::reconcile` when the stick was re-flashed, or by a restore
//! below), and bringing one back.
//!
//! Each set-aside dir holds `set-aside.json` (`Meta`: the ISO build its
//! overlays were made on and when they were set aside), written before the
//! overlays are moved in; a dir from an older release has none, and its
//! build is known only from its name (`iso_build::dir_name`). Everything
//! in `set-aside/` is untrusted: names, the JSON, the trees. It is reached
//! by fd (`util::safefs`), the JSON read as a regular file of bounded size.
//!
//! A restore is a request (`.mados/restore.json`, from
//! `mados-persistence set-aside restore`) carried out by a boot before it
//! layers, and only when the booted build is the one the chosen overlays
//! were made on; otherwise the request stays and the boot says why. The
//! move is planned (`plan`, pure, from what `observe` saw) and carried out
//! step by step (`execute`). The one step that changes what is layered is
//! atomic: `overlays` exchanged with `set-aside/<name>/overlays`
//! (`renameat2(RENAME_EXCHANGE)`), or moved in when there is none. Before
//! it the request is rewritten as started, naming the set-aside dir the
//! current overlays go to and the inode of the tree coming back; after a
//! cut the next boot tells by that inode whether the exchange happened:
//! if it did, it finishes the bookkeeping (the old overlays into their own
//! dir, the chosen dir removed); if not, it goes on (same build) or rolls
//! back (another build: the empty dir removed, the request unstarted).
//! Every rename is followed by an fsync of the dirs it touched.

use crate::boot::iso_build::{self, IsoBuild};
use crate::util::fsutil;
use crate::util::safefs::{self, Dir, Kind};
use anyhow::{Context, Result, bail};
use nix::fcntl::RenameFlags;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::path::Path;

pub const META: &str = "set-aside.json";
pub const REQUEST: &str = ".mados/restore.json";
const OVERLAYS: &str = "overlays";
/// What `delete` renames a set-aside dir to before removing it.
const DELETING: &str = ".deleting-";
/// Larger metadata or requests are not read (they are a few hundred bytes).
const MAX_JSON: u64 = 64 << 10;
/// Labels and UUIDs longer than this are not a build we made.
const MAX_FIELD: usize = 256;

/// `set-aside/<name>/set-aside.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub build: IsoBuild,
    /// Seconds since the epoch.
    pub at: u64,
}

/// Which build a set-aside dir's overlays were made on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "known_from", rename_all = "lowercase")]
pub enum Origin {
    /// Its `set-aside.json`.
    Record { build: IsoBuild },
    /// Only its name (`<label>_<uuid>`, with `_` for unsafe characters,
    /// maybe `-N`): a build matches when its `dir_name` is that.
    Name { base: String },
}

impl Origin {
    pub fn matches(&self, b: &IsoBuild) -> bool {
        match self {
            Origin::Record { build } => build == b,
            Origin::Name { base } => iso_build::dir_name(b) == *base,
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Origin::Record { build } => format!("{} ({})", build.label, build.uuid),
            Origin::Name { base } => format!("{base} (from its name)"),
        }
    }
}

/// The name without a `-N` suffix `free_name` may have added.
fn base_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => name,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io_ctx(e: std::io::Error, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(e).context(what.to_string())
}

/// A small JSON file below `dir`, as a regular file (never a FIFO, device
/// or symlink) of at most `MAX_JSON` bytes; absent is `Ok(None)`.
fn read_json_at<T: for<'de> Deserialize<'de>>(dir: &Dir, name: &str) -> Result<Option<T>> {
    let n = OsStr::new(name);
    if dir.lstat(n)?.is_none() {
        return Ok(None);
    }
    let (f, st) = dir.open_read(n, None)?;
    if st.st_size < 0 || st.st_size as u64 > MAX_JSON {
        bail!("{name} is {} bytes; not read", st.st_size);
    }
    let mut b = vec![];
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_JSON + 1), &mut b)?;
    Ok(Some(
        serde_json::from_slice(&b).with_context(|| format!("{name} is malformed"))?,
    ))
}

/// Write `name` in `dir` durably: a temp file, fsync, rename, dir fsync.
fn write_at(dir: &Dir, name: &str, data: &[u8]) -> Result<()> {
    let tmp = format!(".{name}.tmp");
    dir.remove_all(OsStr::new(&tmp))?;
    let mut f = dir
        .create(OsStr::new(&tmp), 0o600)
        .map_err(|e| io_ctx(e, format!("creating {tmp}")))?;
    f.write_all(data)?;
    f.sync_all()?;
    dir.rename(
        OsStr::new(&tmp),
        dir,
        OsStr::new(name),
        RenameFlags::empty(),
    )?;
    dir.fsync()?;
    Ok(())
}

fn valid_meta(m: Meta) -> Option<Meta> {
    (m.build.label.len() <= MAX_FIELD && m.build.uuid.len() <= MAX_FIELD).then_some(m)
}

/// One set-aside dir, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The dir's name (`safefs::encode`d: any byte survives).
    pub name: String,
    #[serde(flatten)]
    pub origin: Origin,
    /// When it was set aside: its record, else the dir's mtime.
    pub at: Option<u64>,
    /// Bytes its tree takes on the partition (allocated blocks, hard
    /// links once); `None` when it could not be walked.
    pub size: Option<u64>,
    /// It holds an `overlays` dir (a restore needs one).
    pub has_overlays: bool,
    /// Why its metadata was not used, if it was not.
    pub note: Option<String>,
}

/// The `set-aside` dir of the partition, if there is one.
pub fn base(root: &Dir) -> Result<Option<Dir>> {
    match root.lstat(OsStr::new(iso_build::SET_ASIDE))? {
        None => Ok(None),
        Some(st) if safefs::kind(&st) == Kind::Dir => Ok(Some(
            root.dir(Path::new(iso_build::SET_ASIDE))
                .map_err(|e| io_ctx(e, "opening set-aside/"))?,
        )),
        Some(_) => bail!("set-aside on the partition is not a directory"),
    }
}

/// What is known of the set-aside dir `name` without walking it.
fn look(base: &Dir, name: &OsStr, with_size: bool) -> Result<Option<Entry>> {
    let Some(st) = base.lstat(name)? else {
        return Ok(None);
    };
    if safefs::kind(&st) != Kind::Dir {
        return Ok(None);
    }
    let d = base.dir(Path::new(name))?;
    let shown = safefs::encode(Path::new(name));
    let (meta, note) = match read_json_at::<Meta>(&d, META) {
        Ok(Some(m)) => match valid_meta(m) {
            Some(m) => (Some(m), None),
            None => (
                None,
                Some(format!("{META} names an impossible build; ignored")),
            ),
        },
        Ok(None) => (None, None),
        Err(e) => (None, Some(format!("{e:#}; ignored"))),
    };
    let origin = match &meta {
        Some(m) => Origin::Record {
            build: m.build.clone(),
        },
        None => Origin::Name {
            base: base_of(&name.to_string_lossy()).to_string(),
        },
    };
    let has_overlays = d
        .lstat(OsStr::new(OVERLAYS))?
        .is_some_and(|s| safefs::kind(&s) == Kind::Dir);
    Ok(Some(Entry {
        name: shown,
        origin,
        at: meta
            .map(|m| m.at)
            .or_else(|| u64::try_from(st.st_mtime).ok()),
        size: if with_size { tree_size(&d).ok() } else { None },
        has_overlays,
        note,
    }))
}

/// The set-aside dirs, by name (a dir being deleted is not one).
pub fn list(root: &Dir, with_size: bool) -> Result<Vec<Entry>> {
    let Some(b) = base(root)? else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    for n in b.list()? {
        if n.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        if let Some(e) = look(&b, &n, with_size)? {
            out.push(e);
        }
    }
    Ok(out)
}

/// The bytes a tree takes (allocated blocks of every inode in it, each
/// hard-linked inode once), walked by fd on its own filesystem; checked
/// arithmetic (a crafted tree cannot wrap the sum).
pub fn tree_size(top: &Dir) -> Result<u64> {
    let dev = top.stat()?.st_dev;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut total: u64 = 0;
    let add = |total: &mut u64, st: &safefs::Stat| -> Result<()> {
        let b = u64::try_from(st.st_blocks)
            .ok()
            .and_then(|b| b.checked_mul(512))
            .context("a block count out of range")?;
        *total = total.checked_add(b).context("the size overflows")?;
        Ok(())
    };
    add(&mut total, &top.stat()?)?;
    // depth-first, one open dir a level
    let mut stack: Vec<(Dir, std::vec::IntoIter<OsString>)> =
        vec![(top.try_clone()?, top.list()?.into_iter())];
    while let Some((d, names)) = stack.last_mut() {
        let Some(n) = names.next() else {
            stack.pop();
            continue;
        };
        let Some(st) = d.lstat(&n)? else { continue };
        if st.st_dev != dev {
            continue;
        }
        if safefs::kind(&st) == Kind::Dir {
            add(&mut total, &st)?;
            let sub = d.dir(Path::new(&n))?;
            let names = sub.list()?.into_iter();
            stack.push((sub, names));
        } else if st.st_nlink <= 1 || seen.insert(st.st_ino) {
            add(&mut total, &st)?;
        }
    }
    Ok(total)
}

/// The restore request; `started` once a boot began carrying it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The set-aside dir (`safefs::encode`d).
    pub name: String,
    pub requested_at: u64,
    #[serde(default)]
    pub started: Option<Started>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The set-aside dir the overlays in place go to (none when there were
    /// none).
    pub aside: Option<String>,
    /// The inode of the tree coming back (`set-aside/<name>/overlays`):
    /// where it is tells whether the exchange happened.
    pub ino: u64,
}

/// The request on the partition; `Err` when there is one that cannot be
/// read (a symlink, a FIFO, too large, malformed).
pub fn read_request(root: &Dir) -> Result<Option<Request>> {
    let Some(st) = root.lstat(OsStr::new(".mados"))? else {
        return Ok(None);
    };
    if safefs::kind(&st) != Kind::Dir {
        return Ok(None);
    }
    let d = root.dir(Path::new(".mados"))?;
    let r: Option<Request> = read_json_at(&d, "restore.json")?;
    if let Some(r) = &r {
        if decoded(&r.name).is_err() {
            bail!("{REQUEST} names no set-aside dir ({:?})", r.name);
        }
        if let Some(a) = r.started.as_ref().and_then(|s| s.aside.as_ref())
            && decoded(a).is_err()
        {
            bail!("{REQUEST} names no set-aside dir to set aside into ({a:?})");
        }
    }
    Ok(r)
}

pub fn write_request(root: &Dir, r: &Request) -> Result<()> {
    let d = root
        .dir_create(Path::new(".mados"), 0o755)
        .map_err(|e| io_ctx(e, "opening .mados"))?;
    write_at(
        &d,
        "restore.json",
        serde_json::to_string_pretty(r)?.as_bytes(),
    )
}

pub fn clear_request(root: &Dir) -> Result<()> {
    if root.lstat(OsStr::new(".mados"))?.is_none() {
        return Ok(());
    }
    let d = root.dir(Path::new(".mados"))?;
    match d.unlink(OsStr::new("restore.json")) {
        Err(e) if e.raw_os_error() != Some(nix::libc::ENOENT) => {
            return Err(io_ctx(e, format!("removing {REQUEST}")));
        }
        _ => {}
    }
    d.fsync()?;
    Ok(())
}

/// What a boot saw on the partition for a restore.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// The build booted.
    pub current: Option<IsoBuild>,
    /// The iso-build record: the build the overlays in place belong to.
    pub record: Option<IsoBuild>,
    /// The inode of `overlays` (a dir); `None`: there is none.
    pub overlays: Option<u64>,
    /// The chosen set-aside dir, if it is one.
    pub source: Option<SourceFacts>,
    /// `started.aside`: it exists, and it holds `overlays`.
    pub aside: Option<bool>,
    /// The names in `set-aside/`.
    pub taken: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFacts {
    pub origin: Origin,
    /// The inode of its `overlays` dir.
    pub overlays: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Rewrite the request (started or not).
    Journal(Request),
    /// `set-aside/<name>` made, with its `set-aside.json`.
    MakeAside {
        name: String,
        meta: Meta,
    },
    /// `overlays` ⇄ `set-aside/<source>/overlays`, atomically.
    Exchange,
    /// `set-aside/<source>/overlays` → `overlays` (there is none).
    MoveIn,
    /// `set-aside/<source>/overlays` → `set-aside/<aside>/overlays`.
    MoveOld {
        aside: String,
    },
    /// `set-aside/<source>` removed (only its record is left in it).
    DropSource,
    /// Roll back: `set-aside/<aside>` removed, only if it holds no overlays.
    DropAside {
        aside: String,
    },
    ClearRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "lowercase")]
pub enum Outcome {
    /// The chosen overlays are in place after the steps.
    Restored(String),
    /// The request stays: why.
    Waiting(String),
    /// The request is dropped: why.
    Dropped(String),
    /// Carrying it out failed (the boot's report; never planned).
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub outcome: Outcome,
}

/// `base`, or `base-2`, `base-3`, …: the first not in `taken`.
pub fn free_name(taken: &[String], base: &str) -> String {
    (1u32..)
        .map(|i| {
            if i == 1 {
                base.to_string()
            } else {
                format!("{base}-{i}")
            }
        })
        .find(|c| !taken.iter().any(|t| t == c))
        .expect("a free name")
}

/// Pure: what to do about the request `r`, given what was seen.
pub fn plan(r: &Request, f: &Facts, now: u64) -> Plan {
    let name = &r.name;
    let drop = |why: String| Plan {
        steps: vec![Step::ClearRequest],
        outcome: Outcome::Dropped(why),
    };
    if let Some(s) = &r.started {
        // the tree coming back is in place: finish the bookkeeping
        if f.overlays == Some(s.ino) {
            let mut steps = vec![];
            if let Some(src) = &f.source {
                if src.overlays.is_some() {
                    match &s.aside {
                        Some(a) => {
                            if f.aside.is_none() {
                                steps.push(Step::MakeAside {
                                    name: a.clone(),
                                    meta: Meta {
                                        build: f.record.clone().or(f.current.clone()).unwrap_or(
                                            IsoBuild {
                                                label: "unknown".into(),
                                                uuid: "unknown".into(),
                                            },
                                        ),
                                        at: now,
                                    },
                                });
                            }
                            if f.aside != Some(true) {
                                steps.push(Step::MoveOld { aside: a.clone() });
                            }
                        }
                        // moved in, yet something came back in its place:
                        // left where it is, with its dir
                        None => {
                            steps.push(Step::ClearRequest);
                            return Plan {
                                steps,
                                outcome: Outcome::Restored(format!(
                                    "set-aside/{name} was restored (an interrupted restore finished); \
                                     set-aside/{name}/overlays appeared meanwhile and was left there"
                                )),
                            };
                        }
                    }
                }
                steps.push(Step::DropSource);
            }
            steps.push(Step::ClearRequest);
            return Plan {
                steps,
                outcome: Outcome::Restored(format!(
                    "the overlays set aside as {name} are in use again (an interrupted restore was finished){}",
                    s.aside
                        .as_ref()
                        .map(|a| format!("; the ones in use before are set aside as {a}"))
                        .unwrap_or_default()
                )),
            };
        }
        let not_yet = f
            .source
            .as_ref()
            .is_some_and(|src| src.overlays == Some(s.ino));
        if !not_yet {
            let mut steps = vec![];
            if let (Some(a), Some(false)) = (&s.aside, f.aside) {
                steps.push(Step::DropAside { aside: a.clone() });
            }
            steps.push(Step::ClearRequest);
            return Plan {
                steps,
                outcome: Outcome::Dropped(format!(
                    "an interrupted restore of {name} found neither its overlays in place nor in \
                     set-aside/{name}; nothing was moved"
                )),
            };
        }
        // not exchanged yet: roll back what was prepared, then as new
        let mut steps = vec![];
        let mut f2 = f.clone();
        if let (Some(a), Some(false)) = (&s.aside, f.aside) {
            steps.push(Step::DropAside { aside: a.clone() });
            f2.taken.retain(|t| t != a);
        }
        let fresh = Request {
            started: None,
            ..r.clone()
        };
        let mut p = plan(&fresh, &f2, now);
        if matches!(p.outcome, Outcome::Waiting(_)) {
            steps.push(Step::Journal(fresh));
        }
        steps.append(&mut p.steps);
        p.steps = steps;
        return p;
    }
    let Some(src) = &f.source else {
        return drop(format!(
            "the restore of set-aside/{name} was dropped: there is no such set-aside dir"
        ));
    };
    let Some(ino) = src.overlays else {
        return drop(format!(
            "the restore of set-aside/{name} was dropped: it holds no overlays dir"
        ));
    };
    let Some(cur) = &f.current else {
        return Plan {
            steps: vec![],
            outcome: Outcome::Waiting(format!(
                "the restore of {name} waits: the ISO build booted is unknown"
            )),
        };
    };
    if !src.origin.matches(cur) {
        return Plan {
            steps: vec![],
            outcome: Outcome::Waiting(format!(
                "the restore of {name} waits: its overlays were made on {}, and the stick carries {} ({}); \
                 it is done at the first boot with that release written to the stick again \
                 (`mados-persistence set-aside restore --cancel` withdraws it)",
                src.origin.describe(),
                cur.label,
                cur.uuid
            )),
        };
    }
    let mut steps = vec![];
    let aside = f.overlays.map(|_| {
        let owner = f.record.clone().unwrap_or_else(|| cur.clone());
        (
            free_name(&f.taken, &iso_build::dir_name(&owner)),
            Meta {
                build: owner,
                at: now,
            },
        )
    });
    steps.push(Step::Journal(Request {
        started: Some(Started {
            aside: aside.as_ref().map(|a| a.0.clone()),
            ino,
        }),
        ..r.clone()
    }));
    match aside {
        Some((a, meta)) => {
            steps.push(Step::MakeAside {
                name: a.clone(),
                meta,
            });
            steps.push(Step::Exchange);
            steps.push(Step::MoveOld { aside: a.clone() });
            steps.extend([Step::DropSource, Step::ClearRequest]);
            Plan {
                steps,
                outcome: Outcome::Restored(format!(
                    "the overlays set aside as {name} are in use again; the ones in use before are \
                     set aside as {a}"
                )),
            }
        }
        None => {
            steps.extend([Step::MoveIn, Step::DropSource, Step::ClearRequest]);
            Plan {
                steps,
                outcome: Outcome::Restored(format!(
                    "the overlays set aside as {name} are in use again"
                )),
            }
        }
    }
}

/// What the partition shows for request `r`, by fd.
pub fn observe(root: &Dir, r: &Request, current: Option<&IsoBuild>) -> Result<Facts> {
    let dir_ino = |d: &Dir, n: &str| -> Result<Option<u64>> {
        match d.lstat(OsStr::new(n))? {
            None => Ok(None),
            Some(st) if safefs::kind(&st) == Kind::Dir => Ok(Some(st.st_ino)),
            Some(_) => bail!("{n} is not a directory"),
        }
    };
    let mut f = Facts {
        current: current.cloned(),
        record: iso_build::read_at(root),
        overlays: dir_ino(root, OVERLAYS)?,
        ..Facts::default()
    };
    let Some(b) = base(root)? else {
        return Ok(f);
    };
    f.taken = b
        .list()?
        .iter()
        .map(|n| safefs::encode(Path::new(n)))
        .collect();
    let src = decoded(&r.name)?;
    if let Some(e) = look(&b, &src, false)? {
        let d = b.dir(Path::new(&src))?;
        f.source = Some(SourceFacts {
            origin: e.origin,
            overlays: dir_ino(&d, OVERLAYS)?,
        });
    }
    if let Some(a) = r.started.as_ref().and_then(|s| s.aside.as_ref()) {
        let a = decoded(a)?;
        f.aside = match b.lstat(&a)? {
            Some(st) if safefs::kind(&st) == Kind::Dir => {
                Some(dir_ino(&b.dir(Path::new(&a))?, OVERLAYS)?.is_some())
            }
            Some(_) => bail!("set-aside/{} is not a directory", a.to_string_lossy()),
            None => None,
        };
    }
    Ok(f)
}

/// A set-aside name as a single plain component.
pub fn decoded(name: &str) -> Result<OsString> {
    let p = safefs::decode(name).with_context(|| format!("{name:?} is not a name"))?;
    // one plain name: not `.` (one `CurDir`, which `check_rel` allows)
    if !matches!(
        p.components().collect::<Vec<_>>()[..],
        [std::path::Component::Normal(_)]
    ) {
        bail!("{name:?} is not one name");
    }
    safefs::check_rel(&p)?;
    Ok(p.into_os_string())
}

/// Carry out `p` for request `r` on the partition `root`; a cut between
/// any two steps is finished or rolled back by the next `restore`.
pub fn execute(root: &Dir, r: &Request, p: &Plan) -> Result<()> {
    let src = decoded(&r.name)?;
    let ov = OsStr::new(OVERLAYS);
    for s in &p.steps {
        let sa = || -> Result<Dir> {
            root.dir_create(Path::new(iso_build::SET_ASIDE), 0o700)
                .map_err(|e| io_ctx(e, "opening set-aside/"))
        };
        let point = match s {
            Step::Journal(req) => {
                write_request(root, req)?;
                "journal"
            }
            Step::MakeAside { name, meta } => {
                let b = sa()?;
                let n = decoded(name)?;
                match b.mkdir(&n, 0o700) {
                    Err(e) if e.raw_os_error() != Some(nix::libc::EEXIST) => {
                        return Err(io_ctx(e, format!("creating set-aside/{name}")));
                    }
                    _ => {}
                }
                let d = b.dir(Path::new(&n))?;
                write_at(&d, META, serde_json::to_string_pretty(meta)?.as_bytes())?;
                b.fsync()?;
                "aside"
            }
            Step::Exchange => {
                let b = sa()?;
                let sd = b.dir(Path::new(&src))?;
                root.rename(ov, &sd, ov, RenameFlags::RENAME_EXCHANGE)
                    .map_err(|e| {
                        io_ctx(e, format!("exchanging overlays with set-aside/{}", r.name))
                    })?;
                sd.fsync()?;
                root.fsync()?;
                "exchange"
            }
            Step::MoveIn => {
                let b = sa()?;
                let sd = b.dir(Path::new(&src))?;
                sd.rename(ov, root, ov, RenameFlags::RENAME_NOREPLACE)
                    .map_err(|e| io_ctx(e, format!("moving set-aside/{}/overlays in", r.name)))?;
                root.fsync()?;
                sd.fsync()?;
                "movein"
            }
            Step::MoveOld { aside } => {
                let b = sa()?;
                let sd = b.dir(Path::new(&src))?;
                let ad = b.dir(Path::new(&decoded(aside)?))?;
                sd.rename(ov, &ad, ov, RenameFlags::RENAME_NOREPLACE)
                    .map_err(|e| {
                        io_ctx(e, format!("moving the old overlays to set-aside/{aside}"))
                    })?;
                ad.fsync()?;
                sd.fsync()?;
                "moveold"
            }
            Step::DropSource => {
                let b = sa()?;
                let sd = b.dir(Path::new(&src))?;
                if sd.lstat(ov)?.is_some() {
                    bail!("set-aside/{} still holds overlays; not removed", r.name);
                }
                b.remove_all(&src)
                    .map_err(|e| io_ctx(e, format!("removing set-aside/{}", r.name)))?;
                b.fsync()?;
                "dropsource"
            }
            Step::DropAside { aside } => {
                let b = sa()?;
                let n = decoded(aside)?;
                let d = b.dir(Path::new(&n))?;
                if d.lstat(ov)?.is_some() {
                    bail!("set-aside/{aside} holds overlays; not removed");
                }
                for e in d.list()? {
                    d.unlink(&e)?;
                }
                b.rmdir(&n)?;
                b.fsync()?;
                "dropaside"
            }
            Step::ClearRequest => {
                clear_request(root)?;
                "clear"
            }
        };
        crate::disk::stick::cut_point(&format!("restore-{point}"));
    }
    Ok(())
}

/// A boot's restore, offline (nothing on the partition layered yet):
/// the request read, planned against what is there, carried out.
/// `None`: no request.
pub fn restore(pm: &Path, current: Option<&IsoBuild>) -> Result<Option<Outcome>> {
    let root = Dir::open(pm)?;
    let r = match read_request(&root) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e) => {
            clear_request(&root)?;
            return Ok(Some(Outcome::Dropped(format!(
                "the restore request on the partition could not be read ({e:#}); it was dropped"
            ))));
        }
    };
    let f = observe(&root, &r, current)?;
    let p = plan(&r, &f, now());
    execute(&root, &r, &p)?;
    Ok(Some(p.outcome))
}

/// A started request is on the partition: a cut interrupted a restore,
/// which a boot finishes or rolls back first, whatever the build.
pub fn pending_started(root: &Dir) -> bool {
    matches!(
        read_request(root),
        Ok(Some(Request {
            started: Some(_),
            ..
        }))
    )
}

/// `set-aside delete`: the dir renamed out of the list first (a cut
/// leaves it hidden, removed by the next delete), then removed by fd.
/// Returns the bytes it took, when known.
pub fn delete(root: &Dir, name: &str) -> Result<Option<u64>> {
    let n = decoded(name)?;
    let b = base(root)?.context("there is no set-aside dir on the partition")?;
    let e = look(&b, &n, true)?.with_context(|| format!("there is no set-aside/{name}"))?;
    let taken: Vec<String> = b
        .list()?
        .iter()
        .map(|x| x.to_string_lossy().into_owned())
        .collect();
    let hidden = free_name(&taken, &format!("{DELETING}{}", now()));
    b.rename(&n, &b, OsStr::new(&hidden), RenameFlags::RENAME_NOREPLACE)
        .map_err(|e| io_ctx(e, format!("renaming set-aside/{name}")))?;
    b.fsync()?;
    purge_deleting(&b)?;
    Ok(e.size)
}

/// Remove what earlier deletes left (`.deleting-*`).
pub fn purge_deleting(b: &Dir) -> Result<()> {
    for n in b.list()? {
        if n.as_encoded_bytes().starts_with(DELETING.as_bytes()) {
            b.remove_all(&n)
                .map_err(|e| io_ctx(e, format!("removing set-aside/{}", n.to_string_lossy())))?;
        }
    }
    b.fsync()?;
    Ok(())
}

/// Write a set-aside dir's record (used by `iso_build::reconcile`).
pub fn write_meta(dir: &Dir, build: &IsoBuild) -> Result<()> {
    write_at(
        dir,
        META,
        serde_json::to_string_pretty(&Meta {
            build: build.clone(),
            at: now(),
        })?
        .as_bytes(),
    )
}

/// For `status` on the running system: the request, if any (the
/// partition's root is root's only; a reader without root sees none).
pub fn request_at(pm: &Path) -> Option<Request> {
    let b = fsutil::read_nofollow(&pm.join(REQUEST), MAX_JSON).ok()?;
    serde_json::from_slice(&b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(l: &str, u: &str) -> IsoBuild {
        IsoBuild {
            label: l.into(),
            uuid: u.into(),
        }
    }
    fn req(name: &str, started: Option<Started>) -> Request {
        Request {
            name: name.into(),
            requested_at: 1,
            started,
        }
    }
    fn facts(
        current: IsoBuild,
        overlays: Option<u64>,
        src: Option<(Origin, Option<u64>)>,
    ) -> Facts {
        Facts {
            record: Some(current.clone()),
            current: Some(current),
            overlays,
            source: src.map(|(origin, overlays)| SourceFacts { origin, overlays }),
            aside: None,
            taken: vec!["MADOS_R1_u1".into(), "MADOS_R1_u1-2".into()],
        }
    }
    fn rec(bd: &IsoBuild) -> Origin {
        Origin::Record { build: bd.clone() }
    }

    #[test]
    fn a_fresh_request_of_the_booted_build_exchanges_and_files_the_old_ones() {
        let r1 = b("MADOS_R1", "u1");
        let p = plan(
            &req("MADOS_R1_u1", None),
            &facts(r1.clone(), Some(10), Some((rec(&r1), Some(20)))),
            7,
        );
        assert_eq!(
            p.steps,
            vec![
                Step::Journal(req(
                    "MADOS_R1_u1",
                    Some(Started {
                        aside: Some("MADOS_R1_u1-3".into()),
                        ino: 20
                    })
                )),
                Step::MakeAside {
                    name: "MADOS_R1_u1-3".into(),
                    meta: Meta { build: r1, at: 7 }
                },
                Step::Exchange,
                Step::MoveOld {
                    aside: "MADOS_R1_u1-3".into()
                },
                Step::DropSource,
                Step::ClearRequest
            ]
        );
        assert!(matches!(p.outcome, Outcome::Restored(m) if m.contains("MADOS_R1_u1-3")));
    }

    #[test]
    fn after_a_reflash_the_old_overlays_are_already_aside_and_the_chosen_move_in() {
        let r1 = b("MADOS_R1", "u1");
        let p = plan(
            &req("MADOS_R1_u1", None),
            &facts(r1.clone(), None, Some((rec(&r1), Some(20)))),
            7,
        );
        assert_eq!(
            p.steps,
            vec![
                Step::Journal(req(
                    "MADOS_R1_u1",
                    Some(Started {
                        aside: None,
                        ino: 20
                    })
                )),
                Step::MoveIn,
                Step::DropSource,
                Step::ClearRequest
            ]
        );
    }

    #[test]
    fn another_build_waits_and_changes_nothing_and_names_both() {
        let (r1, r2) = (b("MADOS_R1", "u1"), b("MADOS_R2", "u2"));
        let p = plan(
            &req("MADOS_R1_u1", None),
            &facts(r2.clone(), Some(10), Some((rec(&r1), Some(20)))),
            7,
        );
        assert!(p.steps.is_empty());
        match p.outcome {
            Outcome::Waiting(m) => assert!(
                m.contains("MADOS_R1 (u1)") && m.contains("MADOS_R2 (u2)"),
                "{m}"
            ),
            o => panic!("{o:?}"),
        }
        // an unknown booted build waits too
        let mut f = facts(r2, Some(10), Some((rec(&r1), Some(20))));
        f.current = None;
        assert!(plan(&req("MADOS_R1_u1", None), &f, 7).steps.is_empty());
    }

    #[test]
    fn a_dir_without_its_record_matches_by_name_only() {
        let r1 = b("MADOS/R1", "2026-01-01");
        let by_name = Origin::Name {
            base: "MADOS_R1_2026-01-01".into(),
        };
        assert!(by_name.matches(&r1));
        assert!(!by_name.matches(&b("MADOS_R1", "2026-01-02")));
        assert_eq!(base_of("MADOS_R1_2026-01-01-3"), "MADOS_R1_2026-01-01");
        // a uuid ending in digits after a dash: the base is still found
        // for a name free_name did not extend
        assert_eq!(base_of("A_x"), "A_x");
        let p = plan(
            &req("MADOS_R1_2026-01-01", None),
            &facts(r1, None, Some((by_name, Some(20)))),
            7,
        );
        assert!(matches!(p.outcome, Outcome::Restored(_)));
    }

    #[test]
    fn a_missing_dir_or_one_without_overlays_drops_the_request() {
        let r1 = b("MADOS_R1", "u1");
        for src in [None, Some((rec(&r1), None))] {
            let p = plan(
                &req("MADOS_R1_u1", None),
                &facts(r1.clone(), Some(10), src),
                7,
            );
            assert_eq!(p.steps, vec![Step::ClearRequest]);
            assert!(matches!(p.outcome, Outcome::Dropped(_)));
        }
    }

    /// A cut after every step of both plans, replayed on a model of the
    /// partition: the next plan, carried out, ends with the chosen tree in
    /// place, the old one in the aside dir, no request; `overlays` is at
    /// every instant the old tree or the chosen one.
    #[test]
    fn a_cut_after_any_step_is_finished_by_the_next_plan() {
        #[derive(Clone, Debug)]
        struct Model {
            overlays: Option<u64>,
            src: Option<Option<u64>>,
            aside: Option<bool>,
            aside_name: Option<String>,
            req: Option<Request>,
        }
        let r1 = b("MADOS_R1", "u1");
        let apply = |m: &mut Model, s: &Step| match s {
            Step::Journal(r) => {
                m.aside_name = r.started.as_ref().and_then(|s| s.aside.clone());
                m.req = Some(r.clone());
            }
            Step::MakeAside { .. } => m.aside = Some(m.aside.unwrap_or(false)),
            Step::Exchange => {
                let s = m.src.unwrap().unwrap();
                m.src = Some(m.overlays);
                m.overlays = Some(s);
            }
            Step::MoveIn => {
                assert!(m.overlays.is_none());
                m.overlays = m.src.unwrap();
                m.src = Some(None);
            }
            Step::MoveOld { .. } => {
                assert_eq!(m.aside, Some(false));
                m.aside = Some(true);
                m.src = Some(None);
            }
            Step::DropSource => {
                assert_eq!(m.src, Some(None));
                m.src = None;
            }
            Step::DropAside { .. } => {
                assert_eq!(m.aside, Some(false));
                m.aside = None;
            }
            Step::ClearRequest => m.req = None,
        };
        let facts_of = |m: &Model, cur: &IsoBuild| Facts {
            current: Some(cur.clone()),
            record: Some(r1.clone()),
            overlays: m.overlays,
            source: m.src.map(|o| SourceFacts {
                origin: rec(&r1),
                overlays: o,
            }),
            aside: if m.aside_name.is_some() {
                m.aside
            } else {
                None
            },
            taken: vec!["MADOS_R1_u1".into()],
        };
        for old in [Some(10), None] {
            let start = Model {
                overlays: old,
                src: Some(Some(20)),
                aside: None,
                aside_name: None,
                req: Some(req("MADOS_R1_u1", None)),
            };
            let full = plan(start.req.as_ref().unwrap(), &facts_of(&start, &r1), 1);
            for cut in 0..=full.steps.len() {
                for next_build in [r1.clone(), b("MADOS_R2", "u2")] {
                    let mut m = start.clone();
                    for s in &full.steps[..cut] {
                        apply(&mut m, s);
                        assert!(
                            m.overlays == old || m.overlays == Some(20),
                            "cut {cut}: overlays is {:?}",
                            m.overlays
                        );
                    }
                    // the next boot (perhaps of another build after a re-flash)
                    let Some(r) = m.req.clone() else { continue };
                    let p = plan(&r, &facts_of(&m, &next_build), 2);
                    for s in &p.steps {
                        apply(&mut m, s);
                        assert!(m.overlays == old || m.overlays == Some(20));
                    }
                    let exchanged = cut
                        > full
                            .steps
                            .iter()
                            .position(|s| matches!(s, Step::Exchange | Step::MoveIn))
                            .unwrap();
                    if next_build == r1 || exchanged {
                        assert_eq!(m.overlays, Some(20), "cut {cut} old {old:?}: {p:?}");
                        assert!(m.req.is_none());
                        assert!(m.src.is_none(), "cut {cut}: the chosen dir is gone");
                        assert_eq!(m.aside, old.map(|_| true), "cut {cut}: the old ones aside");
                    } else {
                        // another build, not exchanged: rolled back, waits
                        assert_eq!(m.overlays, old);
                        assert_eq!(m.aside, None);
                        assert!(matches!(p.outcome, Outcome::Waiting(_)));
                        assert_eq!(m.req.as_ref().unwrap().started, None);
                        assert_eq!(m.src, Some(Some(20)));
                    }
                }
            }
        }
    }

    #[test]
    fn a_crafted_set_aside_is_read_as_untrusted_input() {
        let t = crate::util::testutil::tmp("setaside-crafted");
        let sa = t.join("set-aside");
        std::fs::create_dir_all(sa.join("good/overlays/etc/upper")).unwrap();
        std::fs::write(sa.join("good/overlays/etc/upper/f"), vec![1u8; 10000]).unwrap();
        std::fs::write(
            sa.join("good/set-aside.json"),
            r#"{"build":{"label":"MADOS_R1","uuid":"u1"},"at":5}"#,
        )
        .unwrap();
        // garbage JSON, a huge label, a symlinked meta, a FIFO meta
        std::fs::create_dir_all(sa.join("garbage/overlays")).unwrap();
        std::fs::write(sa.join("garbage/set-aside.json"), "{not json").unwrap();
        std::fs::create_dir_all(sa.join("huge/overlays")).unwrap();
        std::fs::write(
            sa.join("huge/set-aside.json"),
            format!(
                r#"{{"build":{{"label":"{}","uuid":"u"}},"at":5}}"#,
                "x".repeat(5000)
            ),
        )
        .unwrap();
        std::fs::create_dir_all(sa.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", sa.join("link/set-aside.json")).unwrap();
        std::os::unix::fs::symlink("/etc", sa.join("link/overlays")).unwrap();
        std::fs::create_dir_all(sa.join("fifo")).unwrap();
        nix::unistd::mkfifo(
            &sa.join("fifo/set-aside.json"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        // a symlink as a set-aside dir, a long name
        std::os::unix::fs::symlink("/", sa.join("root-link")).unwrap();
        let long = "n".repeat(250);
        std::fs::create_dir_all(sa.join(&long)).unwrap();
        let root = Dir::open(&t).unwrap();
        let l = list(&root, true).unwrap();
        let names: Vec<&str> = l.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["fifo", "garbage", "good", "huge", "link", long.as_str()]
        );
        let get = |n: &str| l.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("good").origin, rec(&b("MADOS_R1", "u1")));
        assert_eq!(get("good").at, Some(5));
        assert!(get("good").size.unwrap() >= 10000);
        assert!(get("good").has_overlays);
        for n in ["garbage", "huge", "link", "fifo"] {
            assert!(matches!(get(n).origin, Origin::Name { .. }), "{n}");
            assert!(get(n).note.is_some(), "{n}: why its record was not used");
        }
        assert!(!get("link").has_overlays, "a symlink is no overlays dir");
        // a request naming something that is not one plain name
        for bad in ["../x", "a/b", "", ".."] {
            assert!(decoded(bad).is_err(), "{bad}");
        }
        // delete by fd: the symlink's target untouched
        assert!(delete(&root, "root-link").is_err());
        delete(&root, "link").unwrap();
        assert!(std::fs::symlink_metadata("/etc/passwd").is_ok());
        assert!(!sa.join("link").exists());
        delete(&root, "good").unwrap();
        assert_eq!(std::fs::read_dir(&sa).unwrap().count(), 5);
        std::fs::remove_dir_all(&t).unwrap();
    }
}
