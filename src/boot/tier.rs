//! The RAM tier at boot: each tier dir becomes an overlay whose upper is
//! in RAM (one tmpfs of the budget for all tiers) and whose lower is a
//! plain ext4 directory on the partition, above what the live system has
//! there. Before mounting, offline, what the companion synced last boot
//! (the stage) is folded into the lower, and for a dir under a persistent
//! overlay (`/var/log` under `/var`), what that overlay's upper holds there
//! (written while the tier was off) too. A tier that is turned off is
//! handed back the same way: its lower folded into the overlay's upper.
//! Every fold is cut-safe and idempotent (`util::overlayfs::fold`).
//!
//! Layout on the partition, per tier (`/var/log` → `tier/var-log/`):
//! `tier.json` (what it is), `lower/`, `stage/` (the companion's syncs),
//! `tmp/` (a sync's files before their rename), `generation.json` (the
//! last sync's generation, and the record of each larger file it left:
//! `companion::sync::Held`, what lets the first sync after this boot
//! append only a log's new tail; the fold keeps the files' inodes and
//! mtimes, which the record names, and a tier handed back takes its
//! records with it).
//!
//! overlayfs rules kept: the lower's directories are never changed while
//! mounted (the companion writes the stage); the one write to the lower's
//! files is a tail appended to a file the overlay has copied up (it reads
//! only the upper's copy then, `metacopy=off`), through a hard link in the
//! stage, which the fold drops as the same file; mounted with `redirect_dir=off,
//! metacopy=off,index=off,xino=off` so that folding into the lower offline
//! is legal; the live system's dir is reached through a bind made before
//! the persistent overlay covers it (depth ≤ 1: no third level of
//! stacking).

use crate::boot::mounts::{self, Mounted, escape};
use crate::settings::config::Settings;
use crate::util::overlayfs::{self, FoldOptions, fold_at};
use crate::util::safefs::Dir;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const OVERLAY_OPTIONS: &str = "redirect_dir=off,metacopy=off,index=off,xino=off";

/// A tier as mounted this boot (state.json `tiers`); paths are as seen
/// after the switch to the live root (`/run` moves along).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// The directory (`/var/log`).
    pub dir: String,
    /// `tier/<name>/` on the partition.
    pub base: String,
    pub lower: String,
    pub stage: String,
    pub tmp: String,
    /// In the tier tmpfs.
    pub upper: String,
    pub work: String,
    /// Subdirectories bound from the persistent overlay, not in RAM.
    pub excluded: Vec<String>,
}

/// What a tier's lower sits on, recorded in `tier.json` so that a tier no
/// longer configured can be handed back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "home", rename_all = "snake_case")]
pub enum Home {
    /// Under a persistent overlay dir: `parent` (`/var`) with its upper's
    /// subdir `sub` (`log`). Whiteouts in the lower hide the live image.
    Overlay {
        dir: String,
        parent: String,
        sub: String,
    },
    /// Under a bind dir (`/home`): the lower is the partition's own dir.
    Bind { dir: String, path: String },
}

impl Home {
    fn dir(&self) -> &str {
        match self {
            Home::Overlay { dir, .. } | Home::Bind { dir, .. } => dir,
        }
    }
}

/// The persistent overlay's upper for `sub` of `parent` (`/var`, `log`).
fn parent_upper(pm: &Path, parent: &str, sub: &str) -> PathBuf {
    pm.join("overlays")
        .join(escape(parent))
        .join("upper")
        .join(sub)
}

/// `d` strictly below `parent`: the rest of the path.
pub(crate) fn strictly_under<'a>(d: &'a str, parent: &str) -> Option<&'a str> {
    d.strip_prefix(parent)?
        .strip_prefix('/')
        .filter(|r| !r.is_empty())
}

/// Where a tier dir's data lives (pure). `None` with the reason when it is
/// not under a persistent dir.
pub fn home_of(d: &str, s: &Settings) -> Result<Home, String> {
    for p in &s.overlay_dirs {
        if let Some(sub) = strictly_under(d, p) {
            return Ok(Home::Overlay {
                dir: d.into(),
                parent: p.clone(),
                sub: sub.into(),
            });
        }
    }
    for b in &s.bind_dirs {
        if d == b {
            return Err(format!(
                "tier dir {d} is a bind dir itself; give a directory below it"
            ));
        }
        if let Some(sub) = strictly_under(d, b) {
            return Ok(Home::Bind {
                dir: d.into(),
                path: format!("{}/{sub}", escape(b)),
            });
        }
    }
    Err(format!(
        "tier dir {d} is not below a persistent directory ({}); not in the tier",
        s.overlay_dirs
            .iter()
            .chain(&s.bind_dirs)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Where the daemon saves its RAM-tier suggestions on the partition.
pub const SUGGESTED_FILE: &str = "companion/tier-suggestions.json";

/// A directory the daemon saw written often (`companion::writeheat`):
/// `writes` within a half-life, `ram_bytes` what it holds (what the tier
/// would take in RAM to start with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggested {
    pub dir: String,
    pub writes: f64,
    pub ram_bytes: u64,
}

/// `[tier] adopt_suggested` (pure): the suggestions read from the
/// partition (untrusted: each dir checked as a config dir would be, and as
/// a tier dir) added to `dirs` while what they hold stays within half the
/// tier budget (the rest of it is for what is written). Returns the dirs
/// added and a line for each refused.
pub fn adopt(
    dirs: &mut Vec<String>,
    s: &Settings,
    budget: u64,
    suggested: &[Suggested],
) -> (Vec<String>, Vec<String>) {
    let (mut added, mut refused) = (vec![], vec![]);
    let mut room = budget / 2;
    for g in suggested.iter().take(16) {
        let d = g.dir.as_str();
        let clean = d.starts_with('/')
            && d.len() < 4096
            && !d.split('/').any(|c| c == ".." || c == ".")
            && !d.contains("//")
            && !d.ends_with('/');
        if !clean {
            refused.push(format!(
                "suggested tier dir {d:?}: not a clean absolute path"
            ));
            continue;
        }
        if dirs
            .iter()
            .any(|t| t == d || strictly_under(d, t).is_some() || strictly_under(t, d).is_some())
        {
            continue; // in the tier already, or overlapping one
        }
        if let Err(w) = home_of(d, s) {
            refused.push(w);
            continue;
        }
        if g.ram_bytes > room {
            refused.push(format!(
                "suggested tier dir {d}: holds {} bytes, more than the {room} bytes of the tier budget left for it",
                g.ram_bytes
            ));
            continue;
        }
        room -= g.ram_bytes;
        dirs.push(d.to_string());
        added.push(d.to_string());
    }
    (added, refused)
}

fn under(root: &Path, dir: &str) -> PathBuf {
    root.join(dir.trim_start_matches('/'))
}

/// A tier ready to mount, and the live system's dir bound aside for it.
type Ready = (Tier, Option<PathBuf>);

/// Folded and bound before the persistent overlays are mounted.
pub struct Prepared {
    tiers: Vec<Ready>,
    pub mounts: Vec<Mounted>,
    pub warnings: Vec<String>,
    ram: PathBuf,
}

/// Phase one, offline: hand back tiers no longer configured, fold each
/// tier's stage (and the persistent overlay's part of its dir) into its
/// lower, mount the tier tmpfs and bind the live system's view of each dir
/// aside. `pm` is the mounted partition, `run` the initramfs /run.
pub fn prepare(root: &Path, pm: &Path, run: &Path, s: &Settings, ram: u64) -> Prepared {
    let mut p = Prepared {
        tiers: vec![],
        mounts: vec![],
        warnings: vec![],
        ram: run.join("mados/tier"),
    };
    let wanted: Vec<Home> = if s.tier.enabled {
        s.tier
            .dirs
            .iter()
            .filter_map(|d| home_of(d, s).map_err(|w| p.warnings.push(w)).ok())
            .collect()
    } else {
        vec![]
    };
    // tiers on the partition that are not wanted now: hand them back
    if let Ok(rd) = std::fs::read_dir(pm.join("tier")) {
        for e in rd.flatten() {
            let base = e.path();
            let Some(h) = crate::util::fsutil::read_nofollow(&base.join("tier.json"), 1 << 16)
                .ok()
                .and_then(|b| serde_json::from_slice::<Home>(&b).ok())
            else {
                continue;
            };
            if !wanted.iter().any(|w| w.dir() == h.dir()) {
                // tier.json is on the partition: untrusted. Handed back
                // only where that dir lives by these settings, never
                // where the record alone says
                if home_of(h.dir(), s).ok().as_ref() != Some(&h) {
                    p.warnings.push(format!(
                        "RAM tier record {}: {h:?} is not where {} lives; left as it is",
                        base.display(),
                        h.dir()
                    ));
                    continue;
                }
                match hand_back(pm, &base, &h) {
                    Ok(()) => log::info!("RAM tier {} off: its data is back in place", h.dir()),
                    Err(e) => p
                        .warnings
                        .push(format!("handing back the RAM tier of {}: {e:#}", h.dir())),
                }
            }
        }
    }
    if wanted.is_empty() {
        return p;
    }
    let budget = s.tier.budget_bytes(ram);
    let tmpfs = (|| -> Result<()> {
        std::fs::create_dir_all(&p.ram)?;
        mounts::mount(
            "mados-tier",
            &p.ram,
            "tmpfs",
            &format!("size={budget},mode=0700"),
        )
    })();
    if let Err(e) = tmpfs {
        p.warnings.push(format!(
            "RAM tier: mounting its tmpfs: {e:#}; no RAM tier this boot"
        ));
        return p;
    }
    p.mounts.push(Mounted {
        target: p.ram.clone(),
        fstype: "tmpfs".into(),
        source: "mados-tier".into(),
        options: format!("size={budget},mode=0700"),
    });
    for h in wanted {
        match prepare_one(root, pm, &p.ram, s, &h) {
            Ok(t) => p.tiers.push(t),
            Err(e) => p.warnings.push(format!(
                "RAM tier {}: {e:#}; written to the partition directly this boot",
                h.dir()
            )),
        }
    }
    p
}

/// The directory `rel` on the partition, reached by fd from its root
/// without following a symlink (a user's home is on it: a parent swapped
/// for a symlink must not lead elsewhere), created if `create`.
fn on_partition(pm: &Path, rel: &Path, create: bool) -> Result<Dir> {
    let root = Dir::open(pm).with_context(|| format!("opening {}", pm.display()))?;
    if create {
        root.dir_create(rel, 0o755)
    } else {
        root.dir(rel)
    }
    .with_context(|| {
        format!(
            "{} on the partition is not a plain directory below it (a symlink on the way?)",
            rel.display()
        )
    })
}

fn prepare_one(root: &Path, pm: &Path, ram: &Path, s: &Settings, h: &Home) -> Result<Ready> {
    let dir = h.dir().to_string();
    let name = escape(&dir);
    let base = pm.join("tier").join(&name);
    let (lower, keep) = match h {
        Home::Overlay { .. } => (base.join("lower"), true),
        Home::Bind { path, .. } => (pm.join(path), false),
    };
    let stage = base.join("stage");
    let tmp = base.join("tmp");
    std::fs::create_dir_all(&stage)?;
    // the lower: the tier's own dir, or (bind) a dir in a user's home,
    // checked here by fd; the overlay is mounted on its path below, which
    // no user can change before the boot ends (no user runs yet)
    let lower_dir = match h {
        Home::Overlay { .. } => Dir::open_or_create(&lower)?,
        Home::Bind { path, .. } => on_partition(pm, Path::new(path), true)?,
    };
    // what the tier is, for a later boot that no longer has it configured
    // (written once: no fsync on every boot)
    let record = serde_json::to_vec_pretty(h)?;
    if crate::util::fsutil::read_nofollow(&base.join("tier.json"), 1 << 16).ok()
        != Some(record.clone())
    {
        crate::util::fsutil::write_atomic(&base.join("tier.json"), &record)?;
    }
    overlayfs::remove_all(&tmp)?;
    let excluded: Vec<String> = match h {
        Home::Overlay { .. } => s
            .tier
            .exclude
            .iter()
            .filter_map(|e| strictly_under(e, &dir).map(String::from))
            .collect(),
        Home::Bind { .. } => vec![],
    };
    let stage_dir = Dir::open(&stage)?;
    let r = fold_at(
        &stage_dir,
        &lower_dir,
        &FoldOptions {
            keep_whiteouts: keep,
            skip: &[],
        },
    )
    .context("folding the last sync into the lower")?;
    if r.moved + r.removed > 0 {
        log::info!(
            "RAM tier {dir}: folded the last sync ({} entries)",
            r.moved + r.removed
        );
    }
    let mut below = None;
    // whose dir the tier's root is, and its mode: the overlay's root takes
    // them from its upper (a fresh dir of root's, 0755, would take a
    // user's own dir away from them)
    let mut root_attrs = None;
    if let Home::Overlay { parent, sub, .. } = h {
        let up = parent_upper(pm, parent, sub);
        // the persistent overlay's part of the dir: absent is fine; there
        // but reached through a symlink (a user's, in their part of /var)
        // is refused, or the tier would be mounted where it leads
        let up_dir = match Dir::open(pm)?.dir(up.strip_prefix(pm)?) {
            Ok(d) => Some(d),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => None,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{} on the partition is not a plain directory below it (a symlink on the way?)",
                        up.display()
                    )
                });
            }
        };
        if let Some(up_dir) = &up_dir {
            let r = fold_at(
                up_dir,
                &lower_dir,
                &FoldOptions {
                    keep_whiteouts: true,
                    skip: &excluded,
                },
            )
            .context("moving what the persistent overlay holds there into the tier")?;
            if r.moved + r.removed > 0 {
                log::info!(
                    "RAM tier {dir}: took over {} entries from the persistent overlay",
                    r.moved + r.removed
                );
            }
        }
        let hidden = up_dir.as_ref().is_some_and(|d| d.is_opaque());
        let live = under(root, &dir);
        root_attrs = up_dir.as_ref().and_then(|d| d.stat().ok()).or_else(|| {
            Dir::open(&live)
                .and_then(|d| d.stat())
                .ok()
                .filter(|_| !hidden)
        });
        if live.is_dir() && !hidden {
            let b = ram.join(&name).join("below");
            std::fs::create_dir_all(&b)?;
            nix::mount::mount(
                Some(&live),
                &b,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("binding {} aside", live.display()))?;
            below = Some(b);
        }
    }
    for e in &excluded {
        lower_dir.dir_create(Path::new(e), 0o755)?;
    }
    let (upper, work) = (ram.join(&name).join("upper"), ram.join(&name).join("work"));
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    if let Some(st) = root_attrs.or_else(|| lower_dir.stat().ok()) {
        let u = Dir::open(&upper)?;
        nix::unistd::fchown(&u, Some(st.st_uid.into()), Some(st.st_gid.into()))
            .and_then(|_| {
                nix::sys::stat::fchmod(
                    &u,
                    nix::sys::stat::Mode::from_bits_truncate(st.st_mode & 0o7777),
                )
            })
            .with_context(|| format!("giving the tier's root the owner and mode of {dir}"))?;
    }
    let t = Tier {
        dir: dir.clone(),
        base: base.display().to_string(),
        lower: lower.display().to_string(),
        stage: stage.display().to_string(),
        tmp: tmp.display().to_string(),
        upper: upper.display().to_string(),
        work: work.display().to_string(),
        excluded: excluded.iter().map(|e| format!("{dir}/{e}")).collect(),
    };
    Ok((t, below))
}

/// Phase two, after the persistent overlays and binds: mount each tier's
/// overlay, and bind its excluded subdirs from the persistent view.
pub fn mount(root: &Path, p: Prepared, done: &mut Vec<Mounted>) -> (Vec<Tier>, Vec<String>) {
    let mut tiers = vec![];
    let mut warnings = p.warnings;
    done.extend(p.mounts);
    for (t, below) in p.tiers {
        let target = under(root, &t.dir);
        let r = (|| -> Result<()> {
            // every dir mounted on is reached from the live root's fd,
            // never through a symlink (the persistent overlays below hold
            // what users left there), and mounted on through its own fd
            let root_dir = Dir::open(root)?;
            let rel = |d: &str| PathBuf::from(d.trim_start_matches('/'));
            let target_dir = root_dir
                .dir_through_mounts(&rel(&t.dir), true)
                .with_context(|| format!("{} (a symlink on the way?)", target.display()))?;
            // the excluded subdirs as the persistent overlay shows them
            let mut aside = vec![];
            for (i, e) in t.excluded.iter().enumerate() {
                let view = root_dir
                    .dir_through_mounts(&rel(e), true)
                    .with_context(|| format!("{e} (a symlink on the way?)"))?;
                let a = Path::new(&t.upper).with_file_name(format!("excluded-{i}"));
                std::fs::create_dir_all(&a)?;
                bind(&view.fd_path(), &a)?;
                aside.push((a, e.clone()));
            }
            let lowers = match &below {
                Some(b) => format!("{}:{}", t.lower, b.display()),
                None => t.lower.clone(),
            };
            let opts = format!(
                "lowerdir={lowers},upperdir={},workdir={},{OVERLAY_OPTIONS}",
                t.upper, t.work
            );
            mounts::mount("mados-tier", &target_dir.fd_path(), "overlay", &opts)?;
            done.push(Mounted {
                target: target.clone(),
                fstype: "overlay".into(),
                source: "mados-tier".into(),
                options: opts,
            });
            for (a, e) in aside {
                let view = root_dir
                    .dir_through_mounts(&rel(&e), false)
                    .with_context(|| format!("{e} in the tier (a symlink on the way?)"))?;
                bind(&a, &view.fd_path())?;
                let _ = nix::mount::umount2(&a, nix::mount::MntFlags::MNT_DETACH);
                done.push(Mounted {
                    target: under(root, &e),
                    fstype: "bind".into(),
                    source: format!("{e} (persistent)"),
                    options: "bind".into(),
                });
            }
            Ok(())
        })();
        // the overlay keeps its own reference to the lower: the bind goes
        if let Some(b) = &below {
            let _ = nix::mount::umount2(b, nix::mount::MntFlags::MNT_DETACH);
        }
        match r {
            Ok(()) => {
                log::info!("RAM tier on {} (lower {})", t.dir, t.lower);
                tiers.push(t);
            }
            Err(e) => warnings.push(format!(
                "RAM tier {}: {e:#}; written to the partition directly this boot",
                t.dir
            )),
        }
    }
    (tiers, warnings)
}

/// A tier dir on a write-protected stick: no tier (nothing can be synced),
/// the dir shown from what the partition holds for it, read-only, under a
/// RAM upper (`read_only_layers`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOnlyDir {
    pub dir: String,
    /// The overlay's mount (mkdirs and the mount), made once the
    /// persistent dirs are layered, then the dir bound aside detached.
    pub steps: Vec<mounts::Step>,
}

/// The tier dirs on a write-protected stick (pure). Nothing is folded
/// (that would write): each tier dir becomes an overlay in the RAM tmpfs
/// `cow` whose lower layers are, top first, what the persistent overlay's
/// upper holds there (written while the tier was off; alone when it is
/// opaque), the last sync (the stage, with its whiteouts), the tier's
/// lower, and the live image's dir (bound aside before the persistent
/// overlays cover it: no third level of stacking); for a dir under a bind
/// dir, the stage and the partition's own dir. That is what the next
/// writable boot will show after its fold. Returns the binds aside (made
/// first), the dirs, and a line for each dir left out.
pub fn read_only_layers(
    root: &Path,
    pm: &Path,
    cow: &Path,
    s: &Settings,
    present: &dyn Fn(&Path) -> bool,
    opaque: &dyn Fn(&Path) -> bool,
) -> (Vec<mounts::Step>, Vec<ReadOnlyDir>, Vec<String>) {
    use mounts::Step;
    let (mut aside, mut dirs, mut notes) = (vec![], vec![], vec![]);
    if !s.tier.enabled {
        return (aside, dirs, notes);
    }
    for d in &s.tier.dirs {
        let h = match home_of(d, s) {
            Ok(h) => h,
            Err(w) => {
                notes.push(w);
                continue;
            }
        };
        let name = escape(d);
        let base = pm.join("tier").join(&name);
        let (stage, lower) = (base.join("stage"), base.join("lower"));
        let mut lowers: Vec<PathBuf> = vec![];
        let mut detach = None;
        match &h {
            Home::Overlay { parent, sub, .. } => {
                let up = parent_upper(pm, parent, sub);
                let hidden = present(&up) && opaque(&up);
                if present(&up) {
                    lowers.push(up);
                }
                if !hidden {
                    lowers.extend([stage, lower].into_iter().filter(|p| present(p)));
                    let live = under(root, d);
                    if present(&live) {
                        let b = cow.join("tier").join(&name).join("below");
                        aside.push(Step::Mkdir { path: b.clone() });
                        aside.push(Step::Bind {
                            source: live,
                            target: b.clone(),
                        });
                        lowers.push(b.clone());
                        detach = Some(b);
                    }
                }
            }
            Home::Bind { path, .. } => {
                lowers.extend([stage, pm.join(path)].into_iter().filter(|p| present(p)));
            }
        }
        if lowers.is_empty() {
            continue; // nothing saved there, nothing in the image: as it is
        }
        let (upper, work) = (
            cow.join("tier").join(&name).join("upper"),
            cow.join("tier").join(&name).join("work"),
        );
        let target = under(root, d);
        let mut steps = vec![
            Step::Mkdir {
                path: upper.clone(),
            },
            Step::Mkdir { path: work.clone() },
            Step::Mkdir {
                path: target.clone(),
            },
            Step::Mount {
                source: "mados-tier-ro".into(),
                target,
                fstype: "overlay".into(),
                options: format!(
                    "lowerdir={},upperdir={},workdir={},{OVERLAY_OPTIONS}",
                    lowers
                        .iter()
                        .map(|l| l.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":"),
                    upper.display(),
                    work.display()
                ),
            },
        ];
        if let Some(b) = detach {
            steps.push(Step::Detach { target: b });
        }
        dirs.push(ReadOnlyDir {
            dir: d.clone(),
            steps,
        });
    }
    (aside, dirs, notes)
}

/// The persistent mounts failed: no tier either.
pub fn abandon(p: Prepared) {
    for (_, below) in &p.tiers {
        if let Some(b) = below {
            let _ = nix::mount::umount2(b, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    for m in p.mounts.iter().rev() {
        let _ = nix::mount::umount2(&m.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn bind(from: &Path, to: &Path) -> Result<()> {
    nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("binding {} on {}", from.display(), to.display()))
}

/// A tier turned off: its last sync and its lower go back where the
/// directory lives without the tier, then its directory is removed.
fn hand_back(pm: &Path, base: &Path, h: &Home) -> Result<()> {
    let stage = base.join("stage");
    let stage_dir = Dir::open(&stage).ok();
    match h {
        Home::Overlay { parent, sub, .. } => {
            let lower = base.join("lower");
            if let Some(sd) = &stage_dir {
                fold_at(
                    sd,
                    &Dir::open_or_create(&lower)?,
                    &FoldOptions {
                        keep_whiteouts: true,
                        skip: &[],
                    },
                )?;
            }
            let up = parent_upper(pm, parent, sub);
            if let Ok(ld) = Dir::open(&lower) {
                fold_at(
                    &ld,
                    &on_partition(pm, up.strip_prefix(pm)?, true)?,
                    &FoldOptions {
                        keep_whiteouts: true,
                        skip: &[],
                    },
                )?;
            }
        }
        Home::Bind { path, .. } => {
            if let Some(sd) = &stage_dir {
                fold_at(
                    sd,
                    &on_partition(pm, Path::new(path), true)?,
                    &FoldOptions {
                        keep_whiteouts: false,
                        skip: &[],
                    },
                )?;
            }
        }
    }
    overlayfs::remove_all(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_adopted_within_half_the_budget_and_checked() {
        let s = Settings::default();
        let g = |dir: &str, ram: u64| Suggested {
            dir: dir.into(),
            writes: 40.0,
            ram_bytes: ram,
        };
        let mut dirs = vec!["/var/log".to_string()];
        let (added, refused) = adopt(
            &mut dirs,
            &s,
            100,
            &[
                g("/var/lib/app", 30),
                g("/var/log/sub", 0),  // in a tier already
                g("/var/../etc/x", 0), // not clean
                g("/srv/data", 0),     // not persistent
                g("/var/lib/big", 30), // 30 + 30 > 50
                g("/home/u/.config/x", 20),
            ],
        );
        assert_eq!(added, ["/var/lib/app", "/home/u/.config/x"]);
        assert_eq!(dirs, ["/var/log", "/var/lib/app", "/home/u/.config/x"]);
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused[2].contains("more than the 20 bytes"), "{refused:?}");
    }

    #[test]
    fn read_only_layers_show_the_last_sync_without_folding() {
        use crate::boot::mounts::Step;
        let s = Settings {
            tier: crate::settings::config::TierSettings {
                dirs: vec![
                    "/var/log".into(),
                    "/home/u/.cache".into(),
                    "/srv/x".into(),
                    "/var/empty".into(),
                ],
                ..Settings::default().tier
            },
            ..Default::default()
        };
        let on =
            |list: &'static [&'static str]| move |q: &Path| list.iter().any(|x| q == Path::new(x));
        let present = on(&[
            "/p/overlays/var/upper/log",
            "/p/tier/var-log/stage",
            "/p/tier/var-log/lower",
            "/r/var/log",
            "/p/tier/home-u-.cache/stage",
            "/p/home/u/.cache",
        ]);
        let (aside, dirs, notes) = read_only_layers(
            Path::new("/r"),
            Path::new("/p"),
            Path::new("/c"),
            &s,
            &present,
            &|_| false,
        );
        assert_eq!(
            aside,
            [
                Step::Mkdir {
                    path: "/c/tier/var-log/below".into()
                },
                Step::Bind {
                    source: "/r/var/log".into(),
                    target: "/c/tier/var-log/below".into()
                },
            ]
        );
        assert_eq!(notes.len(), 1, "/srv/x is not persistent: {notes:?}");
        assert_eq!(dirs.len(), 2, "/var/empty: nothing anywhere, left as it is");
        let mount = |d: &ReadOnlyDir| {
            d.steps
                .iter()
                .find_map(|st| match st {
                    Step::Mount {
                        options, target, ..
                    } => Some((target.display().to_string(), options.clone())),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(
            mount(&dirs[0]),
            (
                "/r/var/log".into(),
                format!(
                    "lowerdir=/p/overlays/var/upper/log:/p/tier/var-log/stage:/p/tier/var-log/lower:/c/tier/var-log/below,\
                     upperdir=/c/tier/var-log/upper,workdir=/c/tier/var-log/work,{OVERLAY_OPTIONS}"
                )
            )
        );
        assert_eq!(
            dirs[0].steps.last(),
            Some(&Step::Detach {
                target: "/c/tier/var-log/below".into()
            })
        );
        assert_eq!(
            mount(&dirs[1]).1,
            format!(
                "lowerdir=/p/tier/home-u-.cache/stage:/p/home/u/.cache,upperdir=/c/tier/home-u-.cache/upper,\
                 workdir=/c/tier/home-u-.cache/work,{OVERLAY_OPTIONS}"
            )
        );
        // nothing on the partition is written: no step names it but as a lower
        for d in &dirs {
            for st in &d.steps {
                if let Step::Mkdir { path } = st {
                    assert!(!path.starts_with("/p"), "{st:?}");
                }
            }
        }
        // an opaque persistent part hides the rest, as the fold would
        let (aside, dirs, _) = read_only_layers(
            Path::new("/r"),
            Path::new("/p"),
            Path::new("/c"),
            &s,
            &present,
            &|q| q == Path::new("/p/overlays/var/upper/log"),
        );
        assert!(aside.is_empty());
        assert!(
            mount(&dirs[0])
                .1
                .starts_with("lowerdir=/p/overlays/var/upper/log,upperdir=")
        );
        // the tier off: no dirs
        let off = Settings {
            tier: crate::settings::config::TierSettings {
                enabled: false,
                ..s.tier.clone()
            },
            ..s.clone()
        };
        assert!(
            read_only_layers(
                Path::new("/r"),
                Path::new("/p"),
                Path::new("/c"),
                &off,
                &present,
                &|_| false
            )
            .1
            .is_empty()
        );
    }

    #[test]
    fn homes() {
        let s = Settings::default();
        assert_eq!(
            home_of("/var/log", &s),
            Ok(Home::Overlay {
                dir: "/var/log".into(),
                parent: "/var".into(),
                sub: "log".into()
            })
        );
        assert_eq!(
            home_of("/home/live/.cache", &s),
            Ok(Home::Bind {
                dir: "/home/live/.cache".into(),
                path: "home/live/.cache".into()
            })
        );
        assert!(home_of("/var", &s).unwrap_err().contains("not below"));
        assert!(
            home_of("/home", &s)
                .unwrap_err()
                .contains("bind dir itself")
        );
        assert!(home_of("/srv/x", &s).is_err());
        assert!(
            home_of("/variable", &s).is_err(),
            "a prefix is not a parent"
        );
    }
}
