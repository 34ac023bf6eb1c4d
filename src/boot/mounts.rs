//! The mount plan (pure) and its executor (thin, with undo).
//!
//! Persistent mode: overlayfs over each overlay dir with the live root's
//! dir as lower and `overlays/<name>/{upper,work}` on the partition; bind
//! dirs from the partition (seeded from the live root the first time);
//! tmpfs mounts; cache binds. RAM mode: tmpfs mounts, and if the root is
//! read-only, overlays with uppers on one tmpfs of `cow_spacesize`.

use crate::settings::cmdline::DataMode;
use crate::settings::config::Settings;
use crate::util::safefs::Dir;
use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    Mkdir {
        path: PathBuf,
    },
    Mount {
        source: String,
        target: PathBuf,
        fstype: String,
        options: String,
    },
    Bind {
        source: PathBuf,
        target: PathBuf,
    },
    /// Create the persistent dir `to` as a copy of the live root's `from`:
    /// copied into a temporary sibling, synced, renamed into place, so a
    /// cut leaves no `to` and the next boot seeds again.
    Seed {
        from: PathBuf,
        to: PathBuf,
    },
    /// Create one directory (its parent exists) owned by `uid`:`gid` with
    /// `mode`; an existing directory is left as it is.
    MkdirAs {
        path: PathBuf,
        uid: u32,
        gid: u32,
        mode: u32,
    },
    /// Move an entry within the partition; never over an existing one.
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    /// Detach a mount this plan made (a dir bound aside for a lower layer,
    /// no longer needed once the overlay holds its own reference).
    Detach {
        target: PathBuf,
    },
}

/// `/var/lib` → `var-lib`: a dir's name on the partition.
pub fn escape(dir: &str) -> String {
    dir.trim_matches('/').replace('/', "-")
}

fn under(root: &Path, dir: &str) -> PathBuf {
    root.join(dir.trim_start_matches('/'))
}

pub fn persist_mount_options(data: DataMode) -> String {
    match data {
        DataMode::Ordered => "noatime,commit=60".into(),
        DataMode::Writeback => "noatime,commit=60,data=writeback".into(),
    }
}

fn overlay(root: &Path, dir: &str, base: &Path, steps: &mut Vec<Step>) {
    let up = base.join(escape(dir)).join("upper");
    let work = base.join(escape(dir)).join("work");
    let target = under(root, dir);
    steps.push(Step::Mkdir { path: up.clone() });
    steps.push(Step::Mkdir { path: work.clone() });
    steps.push(Step::Mount {
        source: "overlay".into(),
        target: target.clone(),
        fstype: "overlay".into(),
        options: format!(
            "lowerdir={},upperdir={},workdir={}",
            target.display(),
            up.display(),
            work.display()
        ),
    });
}

fn tmpfs_steps(root: &Path, s: &Settings, ram: u64, steps: &mut Vec<Step>) {
    for t in &s.tmpfs {
        let target = under(root, &t.path);
        steps.push(Step::Mkdir {
            path: target.clone(),
        });
        steps.push(Step::Mount {
            source: "tmpfs".into(),
            target,
            fstype: "tmpfs".into(),
            options: format!("size={},mode=1777,nosuid,nodev", t.size.resolve(ram)),
        });
    }
}

/// Layering over the live root with persistence mounted at `pmount`.
/// `exists` says whether a dir exists in the live root; `fresh` whether a
/// bind dir is new on the partition (then it is seeded).
pub fn persistent_plan(
    root: &Path,
    pmount: &Path,
    s: &Settings,
    ram: u64,
    exists: &dyn Fn(&Path) -> bool,
    fresh: &dyn Fn(&Path) -> bool,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let base = pmount.join("overlays");
    for d in &s.overlay_dirs {
        if exists(&under(root, d)) {
            overlay(root, d, &base, &mut steps);
        }
    }
    for d in &s.bind_dirs {
        let src = pmount.join(escape(d));
        let target = under(root, d);
        if fresh(&src) {
            if exists(&target) {
                steps.push(Step::Seed {
                    from: target.clone(),
                    to: src.clone(),
                });
            } else {
                steps.push(Step::Mkdir { path: src.clone() });
            }
        }
        steps.push(Step::Mkdir {
            path: target.clone(),
        });
        steps.push(Step::Bind {
            source: src,
            target,
        });
    }
    tmpfs_steps(root, s, ram, &mut steps);
    for d in &s.cache_binds {
        let src = pmount.join("cache").join(escape(d));
        let target = under(root, d);
        steps.push(Step::Mkdir { path: src.clone() });
        steps.push(Step::Mkdir {
            path: target.clone(),
        });
        steps.push(Step::Bind {
            source: src,
            target,
        });
    }
    steps
}

/// The options of the partition's mount on a write-protected stick:
/// read-only, and `noload`: no journal replay, which would write.
pub const READ_ONLY_OPTIONS: &str = "ro,noload";

/// A write-protected stick with persistence (pure): the partition at
/// `pmount` is mounted read-only; everything the user saved is shown,
/// and every change goes to RAM (one tmpfs of `cow_spacesize` at `cow`).
/// Each overlay dir: an overlay with the partition's upper for it and the
/// live image's dir as lower layers. Each bind dir (`/home`): an overlay
/// with the partition's dir as its only lower (what the bind would show),
/// or the live image's while the partition has none. The tmpfs mounts as
/// usual; a cache bind the partition has: an overlay over it. `aside`
/// (binds made before the overlays cover the dirs they show) goes right
/// after the RAM tmpfs. `present` says whether a dir exists on the
/// partition.
#[allow(clippy::too_many_arguments)]
pub fn read_only_plan(
    root: &Path,
    pmount: &Path,
    cow: &Path,
    s: &Settings,
    ram: u64,
    aside: Vec<Step>,
    exists: &dyn Fn(&Path) -> bool,
    present: &dyn Fn(&Path) -> bool,
) -> Vec<Step> {
    let mut steps = vec![
        Step::Mkdir {
            path: cow.to_path_buf(),
        },
        Step::Mount {
            source: "cow".into(),
            target: cow.to_path_buf(),
            fstype: "tmpfs".into(),
            options: format!("size={},mode=0700", s.cow_spacesize.resolve(ram)),
        },
    ];
    steps.extend(aside);
    let ram_overlay = |lowers: Vec<PathBuf>, name: &str, target: PathBuf, steps: &mut Vec<Step>| {
        let up = cow.join(name).join("upper");
        let work = cow.join(name).join("work");
        steps.push(Step::Mkdir { path: up.clone() });
        steps.push(Step::Mkdir { path: work.clone() });
        steps.push(Step::Mount {
            source: "overlay".into(),
            target,
            fstype: "overlay".into(),
            options: format!(
                "lowerdir={},upperdir={},workdir={}",
                lowers
                    .iter()
                    .map(|l| l.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
                up.display(),
                work.display()
            ),
        });
    };
    for d in &s.overlay_dirs {
        let target = under(root, d);
        if !exists(&target) {
            continue;
        }
        let saved = pmount.join("overlays").join(escape(d)).join("upper");
        let mut lowers = vec![];
        if present(&saved) {
            lowers.push(saved);
        }
        lowers.push(target.clone());
        ram_overlay(lowers, &escape(d), target, &mut steps);
    }
    for d in &s.bind_dirs {
        let target = under(root, d);
        let saved = pmount.join(escape(d));
        let lower = if present(&saved) {
            saved
        } else if exists(&target) {
            target.clone()
        } else {
            continue;
        };
        steps.push(Step::Mkdir {
            path: target.clone(),
        });
        ram_overlay(vec![lower], &escape(d), target, &mut steps);
    }
    tmpfs_steps(root, s, ram, &mut steps);
    for d in &s.cache_binds {
        let saved = pmount.join("cache").join(escape(d));
        if !present(&saved) {
            continue;
        }
        let target = under(root, d);
        steps.push(Step::Mkdir {
            path: target.clone(),
        });
        ram_overlay(
            vec![saved],
            &format!("cache-{}", escape(d)),
            target,
            &mut steps,
        );
    }
    steps
}

/// RAM mode. `cow` is where the RAM upper tmpfs goes.
pub fn ram_plan(
    root: &Path,
    cow: &Path,
    s: &Settings,
    ram: u64,
    root_writable: bool,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<Step> {
    let mut steps = Vec::new();
    if !root_writable {
        steps.push(Step::Mkdir {
            path: cow.to_path_buf(),
        });
        steps.push(Step::Mount {
            source: "cow".into(),
            target: cow.to_path_buf(),
            fstype: "tmpfs".into(),
            options: format!("size={},mode=0700", s.cow_spacesize.resolve(ram)),
        });
        for d in s.overlay_dirs.iter().chain(&s.bind_dirs) {
            if exists(&under(root, d)) {
                overlay(root, d, cow, &mut steps);
            }
        }
    }
    tmpfs_steps(root, s, ram, &mut steps);
    steps
}

/// A mount made, for state.json and for undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Mounted {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    pub options: String,
}

/// Split `mount -o` style options into mount flags and filesystem data.
pub fn split_options(options: &str) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mount one filesystem; `source` may be a device or a pseudo name.
pub fn mount(source: &str, target: &Path, fstype: &str, options: &str) -> Result<()> {
    log::debug!(
        "mount -t {fstype} -o {options} {source} {}",
        target.display()
    );
    let (flags, data) = split_options(options);
    nix::mount::mount(
        Some(source),
        target,
        Some(fstype),
        flags,
        Some(data.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting {fstype} {source} on {} ({options})",
            target.display()
        )
    })
}

pub fn umount(target: &Path) -> Result<()> {
    nix::mount::umount2(target, MntFlags::empty())
        .or_else(|_| nix::mount::umount2(target, MntFlags::MNT_DETACH))
        .with_context(|| format!("unmounting {}", target.display()))
}

/// Run a plan. On the first failure, undo the mounts this run made (in
/// reverse) and return the error; `done` then holds nothing.
pub fn execute(steps: &[Step], done: &mut Vec<Mounted>) -> Result<()> {
    let start = done.len();
    for step in steps {
        if let Err(e) = execute_one(step, done) {
            undo(done, start);
            return Err(e);
        }
    }
    Ok(())
}

pub fn undo(done: &mut Vec<Mounted>, keep: usize) {
    while done.len() > keep {
        let m = done.pop().unwrap();
        if let Err(e) = umount(&m.target) {
            log::error!("undo: {e:#}");
        } else {
            log::info!("undo: unmounted {}", m.target.display());
        }
    }
}

fn execute_one(step: &Step, done: &mut Vec<Mounted>) -> Result<()> {
    match step {
        Step::Mkdir { path } => {
            std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
        }
        Step::Mount {
            source,
            target,
            fstype,
            options,
        } => {
            mount(source, target, fstype, options)?;
            log::info!("mounted {fstype} on {}", target.display());
            done.push(Mounted {
                target: target.clone(),
                fstype: fstype.clone(),
                source: source.clone(),
                options: options.clone(),
            });
            Ok(())
        }
        Step::Bind { source, target } => {
            nix::mount::mount(
                Some(source.as_path()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| {
                format!("bind-mounting {} on {}", source.display(), target.display())
            })?;
            log::info!("bound {} on {}", source.display(), target.display());
            done.push(Mounted {
                target: target.clone(),
                fstype: "bind".into(),
                source: source.display().to_string(),
                options: "bind".into(),
            });
            Ok(())
        }
        Step::Seed { from, to } => crate::util::fsutil::copy_tree_atomic(from, to)
            .with_context(|| format!("seeding {} from {}", to.display(), from.display())),
        Step::MkdirAs {
            path,
            uid,
            gid,
            mode,
        } => mkdir_as(path, *uid, *gid, *mode),
        Step::Rename { from, to } => rename_noreplace(from, to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display())),
        Step::Detach { target } => {
            nix::mount::umount2(target, MntFlags::MNT_DETACH)
                .with_context(|| format!("detaching {}", target.display()))?;
            if let Some(i) = done.iter().rposition(|m| &m.target == target) {
                done.remove(i);
            }
            Ok(())
        }
    }
}

/// A path's parent directory, opened without following its last
/// component, and the path's name (a step names one entry in a directory
/// the boot checked: it is acted on by that directory's fd).
fn parent_dir(path: &Path) -> Result<(Dir, &std::ffi::OsStr)> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no name", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    Ok((Dir::open(parent)?, name))
}

/// Move `from` to `to` without replacing anything there, by the two
/// parents' fds (neither name followed).
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let (fd, fname) = parent_dir(from)?;
    let (td, tname) = parent_dir(to)?;
    fd.rename(fname, &td, tname, nix::fcntl::RenameFlags::RENAME_NOREPLACE)?;
    Ok(())
}

/// Create the directory `path` owned by `uid:gid` with `mode`: made by
/// its parent's fd, given away through its own fd (never a symlink's
/// target). An existing directory is left as it is; anything else there
/// is an error.
fn mkdir_as(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<()> {
    let (pd, name) = parent_dir(path)?;
    match pd.mkdir(name, 0o700) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let st = pd.lstat(name)?;
            anyhow::ensure!(
                st.is_some_and(
                    |st| crate::util::safefs::kind(&st) == crate::util::safefs::Kind::Dir
                ),
                "{} exists and is not a directory",
                path.display()
            );
            return Ok(());
        }
        r => r.with_context(|| format!("creating {}", path.display()))?,
    }
    let d = pd.dir(Path::new(name))?;
    nix::unistd::fchown(&d, Some(uid.into()), Some(gid.into()))
        .and_then(|_| nix::sys::stat::fchmod(&d, nix::sys::stat::Mode::from_bits_truncate(mode)))
        .with_context(|| format!("giving {} to {uid}:{gid}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::size::Size;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn persistent_plan_is_exact() {
        let s = Settings {
            overlay_dirs: vec!["/etc".into(), "/opt".into()],
            tmpfs: vec![crate::settings::config::TmpfsMount {
                path: "/tmp".into(),
                size: Size::Percent(50),
            }],
            cache_binds: vec!["/var/cache/pacman/pkg".into()],
            ..Default::default()
        };
        let exists = |q: &Path| q != Path::new("/new_root/opt");
        let fresh = |_: &Path| true;
        let plan = persistent_plan(
            &p("/new_root"),
            &p("/run/mados/persistence"),
            &s,
            1000,
            &exists,
            &fresh,
        );
        assert_eq!(
            plan,
            vec![
                Step::Mkdir {
                    path: p("/run/mados/persistence/overlays/etc/upper")
                },
                Step::Mkdir {
                    path: p("/run/mados/persistence/overlays/etc/work")
                },
                Step::Mount {
                    source: "overlay".into(),
                    target: p("/new_root/etc"),
                    fstype: "overlay".into(),
                    options:
                        "lowerdir=/new_root/etc,upperdir=/run/mados/persistence/overlays/etc/upper,\
                              workdir=/run/mados/persistence/overlays/etc/work"
                            .into(),
                },
                Step::Seed {
                    from: p("/new_root/home"),
                    to: p("/run/mados/persistence/home")
                },
                Step::Mkdir {
                    path: p("/new_root/home")
                },
                Step::Bind {
                    source: p("/run/mados/persistence/home"),
                    target: p("/new_root/home")
                },
                Step::Mkdir {
                    path: p("/new_root/tmp")
                },
                Step::Mount {
                    source: "tmpfs".into(),
                    target: p("/new_root/tmp"),
                    fstype: "tmpfs".into(),
                    options: "size=500,mode=1777,nosuid,nodev".into(),
                },
                Step::Mkdir {
                    path: p("/run/mados/persistence/cache/var-cache-pacman-pkg")
                },
                Step::Mkdir {
                    path: p("/new_root/var/cache/pacman/pkg")
                },
                Step::Bind {
                    source: p("/run/mados/persistence/cache/var-cache-pacman-pkg"),
                    target: p("/new_root/var/cache/pacman/pkg")
                },
            ]
        );
        // an existing home is not seeded again
        let plan2 = persistent_plan(&p("/r"), &p("/p"), &s, 1000, &exists, &|_| false);
        assert!(!plan2.iter().any(|st| matches!(st, Step::Seed { .. })));
    }

    #[test]
    fn ram_plan_on_a_read_only_root_uses_one_cow_tmpfs() {
        let s = Settings {
            cow_spacesize: Size::Bytes(64 << 20),
            tmpfs: vec![],
            ..Default::default()
        };
        let plan = ram_plan(
            &p("/new_root"),
            &p("/run/mados/cow"),
            &s,
            8 << 30,
            false,
            &|_| true,
        );
        assert_eq!(
            plan[1],
            Step::Mount {
                source: "cow".into(),
                target: p("/run/mados/cow"),
                fstype: "tmpfs".into(),
                options: format!("size={},mode=0700", 64 << 20)
            }
        );
        let overlays: Vec<_> = plan
            .iter()
            .filter_map(|s| match s {
                Step::Mount { fstype, target, .. } if fstype == "overlay" => Some(target.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            overlays,
            ["/etc", "/usr", "/var", "/opt", "/home"].map(|d| p(&format!("/new_root{d}")))
        );
        // a writable root (archiso's own cow) gets no overlays
        let plan = ram_plan(
            &p("/new_root"),
            &p("/run/mados/cow"),
            &s,
            8 << 30,
            true,
            &|_| true,
        );
        assert!(plan.is_empty());
    }

    #[test]
    fn read_only_plan_layers_the_partition_under_ram_uppers() {
        let s = Settings {
            overlay_dirs: vec!["/etc".into(), "/opt".into(), "/srv".into()],
            cow_spacesize: Size::Bytes(64 << 20),
            tmpfs: vec![],
            cache_binds: vec!["/var/cache/pkg".into(), "/var/cache/none".into()],
            ..Default::default()
        };
        let aside = vec![Step::Mkdir {
            path: p("/c/aside"),
        }];
        // the partition has /etc's upper, home and one cache; /srv is not
        // in the live image
        let present = |q: &Path| {
            ["/p/overlays/etc/upper", "/p/home", "/p/cache/var-cache-pkg"]
                .iter()
                .any(|x| q == Path::new(x))
        };
        let exists = |q: &Path| q != Path::new("/r/srv");
        let plan = read_only_plan(
            &p("/r"),
            &p("/p"),
            &p("/c"),
            &s,
            8 << 30,
            aside,
            &exists,
            &present,
        );
        let mounts: Vec<(String, String)> = plan
            .iter()
            .filter_map(|st| match st {
                Step::Mount {
                    target, options, ..
                } => Some((target.display().to_string(), options.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("/c", format!("size={},mode=0700", 64 << 20)),
                ("/r/etc", "lowerdir=/p/overlays/etc/upper:/r/etc,upperdir=/c/etc/upper,workdir=/c/etc/work".into()),
                ("/r/opt", "lowerdir=/r/opt,upperdir=/c/opt/upper,workdir=/c/opt/work".into()),
                ("/r/home", "lowerdir=/p/home,upperdir=/c/home/upper,workdir=/c/home/work".into()),
                (
                    "/r/var/cache/pkg",
                    "lowerdir=/p/cache/var-cache-pkg,upperdir=/c/cache-var-cache-pkg/upper,workdir=/c/cache-var-cache-pkg/work".into()
                ),
            ]
            .map(|(a, b)| (a.to_string(), b))
        );
        // the binds aside come right after the RAM tmpfs, before any overlay
        assert_eq!(
            plan[2],
            Step::Mkdir {
                path: p("/c/aside")
            }
        );
        // nothing is made on the partition, nothing seeded or bound from it
        assert!(
            !plan.iter().any(|st| match st {
                Step::Mkdir { path } => path.starts_with("/p"),
                Step::Seed { .. }
                | Step::Bind { .. }
                | Step::Rename { .. }
                | Step::MkdirAs { .. } => true,
                _ => false,
            }),
            "{plan:?}"
        );
        // no home saved yet: the live image's, under a RAM upper
        let plan = read_only_plan(
            &p("/r"),
            &p("/p"),
            &p("/c"),
            &s,
            8 << 30,
            vec![],
            &|_| true,
            &|_| false,
        );
        assert!(plan.contains(&Step::Mount {
            source: "overlay".into(),
            target: p("/r/home"),
            fstype: "overlay".into(),
            options: "lowerdir=/r/home,upperdir=/c/home/upper,workdir=/c/home/work".into()
        }));
        assert_eq!(
            split_options(READ_ONLY_OPTIONS),
            (MsFlags::MS_RDONLY, "noload".into())
        );
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = split_options("size=5,mode=1777,nosuid,nodev");
        assert_eq!(f, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(d, "size=5,mode=1777");
        let (f, d) = split_options(&persist_mount_options(DataMode::Writeback));
        assert_eq!(f, MsFlags::MS_NOATIME);
        assert_eq!(d, "commit=60,data=writeback");
    }

    #[test]
    fn tmpfs_sizes_are_clamped_to_ram() {
        let s = Settings::default(); // /tmp 5G, /var/tmp 1G
        let plan = ram_plan(&p("/r"), &p("/c"), &s, 2 << 30, true, &|_| true);
        let opts: Vec<_> = plan
            .iter()
            .filter_map(|s| match s {
                Step::Mount { options, .. } => Some(options.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            opts[0],
            format!("size={},mode=1777,nosuid,nodev", 2u64 << 30)
        );
        assert_eq!(
            opts[1],
            format!("size={},mode=1777,nosuid,nodev", 1u64 << 30)
        );
    }
}
