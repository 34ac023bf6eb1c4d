//! The booted kernel's modules (issue 19). The stick always boots the
//! ISO's kernel; an upgrade of the kernel package inside the persistent
//! `/usr` removes `/usr/lib/modules/<that kernel>` (a whiteout in the
//! upper) or replaces it with another build's. At boot the live image's
//! own copy is made visible there, read-only, without touching the
//! persistent upper:
//!
//! - the merged dir exists but its `modules.dep` is not the image's (or it
//!   has none): the image's copy is bound over it read-only;
//! - the merged dir is missing (whited out): a whiteout in the upper hides
//!   every lower of the `/usr` overlay, and a mount needs a mount point,
//!   which made through the merged `/usr` would be written into the upper.
//!   So a small overlay covers the merged `/usr/lib/modules`: its lowers
//!   are the image's `/usr/lib/modules` (bound aside before `/usr` was
//!   covered; depth 1 under archiso) *above* the persistent upper's own
//!   `lib/modules` (ext4, depth 0; the whiteout there hides only what lies
//!   below it), its upper `overlays/usr/kmod-upper` on the partition. An
//!   overlay on the merged `/usr` itself would be a third level (EINVAL:
//!   `FILESYSTEM_MAX_STACK_DEPTH`), and overlayfs refuses an overlay as an
//!   upper. The other kernels' dirs stay visible and writable; what is
//!   written there goes to `kmod-upper` and is folded into the `/usr`
//!   upper's `lib/modules` offline at the next boot, before `/usr` is
//!   layered. The `/usr` overlay never reaches that subtree while it is
//!   covered, so nothing is written into a mounted overlay's layers (the
//!   kernel still logs that the lower is in use as another mount's upper).
//!   The image's `<kver>` in it is then bound read-only too.

use crate::boot::mounts::{Mounted, escape};
use crate::settings::config::Settings;
use crate::util::overlayfs::{FoldOptions, fold_at};
use crate::util::safefs::Dir;
use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Below `overlays/usr/` on the partition: the covering overlay's upper and work.
pub const UPPER: &str = "kmod-upper";
pub const WORK: &str = "kmod-work";
/// The covering overlay's own options (see `apply`).
pub const COVER_OPTIONS: &str = "index=off";
/// The largest `modules.dep` read (Arch's is about 1 MiB).
const DEP_MAX: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The persistent `/usr` shows the image's modules for the booted kernel.
    Matches,
    /// Another tree stood there: the image's copy bound over it read-only.
    Bound,
    /// It was removed in persistence: `/usr/lib/modules` covered by a small
    /// overlay that shows the image's copy (read-only) beside the rest.
    Overlaid,
    /// The live image carries no modules for the booted kernel.
    NotInImage,
    /// It could not be made visible (the message says why).
    Failed,
}

/// What `state.json` records (`kernel_modules`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KernelModules {
    /// The booted kernel (`uname -r`).
    pub running: String,
    /// Other kernels' module dirs in the persistent `/usr/lib/modules`
    /// (installed by the package manager, never booted from this stick).
    pub installed: Vec<String>,
    pub action: Action,
    pub message: String,
}

/// What the merged `/usr/lib/modules/<kver>` is after layering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merged {
    /// `/usr/lib/modules` itself is not a directory in the merged view.
    NoParent,
    Missing,
    /// Something other than a directory (a symlink is not followed).
    NotDir,
    /// A directory, with its `modules.dep` (None: none, or unreadable).
    Dir(Option<Vec<u8>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Nothing(Action),
    Bind,
    Overlay,
    Refuse(String),
}

/// Pure: what to do, from the image's `modules.dep` and the merged view.
pub fn decide(image_dep: Option<&[u8]>, merged: &Merged) -> Plan {
    let Some(img) = image_dep else {
        return Plan::Nothing(Action::NotInImage);
    };
    match merged {
        Merged::Dir(Some(d)) if d.as_slice() == img => Plan::Nothing(Action::Matches),
        Merged::Dir(_) => Plan::Bind,
        Merged::Missing => Plan::Overlay,
        Merged::NotDir => Plan::Refuse(
            "it is not a directory in the persistent /usr (a symlink is not followed)".into(),
        ),
        Merged::NoParent => {
            Plan::Refuse("/usr/lib/modules itself was removed in the persistent /usr".into())
        }
    }
}

/// Pure: the sentence `status` and the boot log show.
pub fn describe(k: &KernelModules) -> String {
    let others = if k.installed.is_empty() {
        String::new()
    } else {
        format!(
            "kernel {} installed in persistence; ",
            k.installed.join(", ")
        )
    };
    match k.action {
        Action::Matches => format!(
            "{others}the stick boots {} from the ISO; its modules are in place",
            k.running
        ),
        Action::Bound | Action::Overlaid => format!(
            "{others}the stick boots {} from the ISO; its modules come from the ISO ({})",
            k.running,
            if k.action == Action::Bound {
                "another tree stood in their place in persistence; it is hidden this boot, not deleted"
            } else {
                "they were removed in persistence, as a kernel upgrade does"
            }
        ),
        Action::NotInImage => format!(
            "{others}the stick boots {}; the ISO carries no modules for it",
            k.running
        ),
        Action::Failed => format!(
            "{others}the stick boots {} from the ISO; its modules are MISSING: {}",
            k.running, k.message
        ),
    }
}

/// The image's `/usr/lib/modules`, bound aside before `/usr` is covered.
pub struct Aside {
    kver: String,
    /// The read-only bind (None: the image has no dir for `kver`).
    image: Option<PathBuf>,
}

fn kver() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn usr_base(pm: &Path) -> PathBuf {
    pm.join("overlays").join(escape("/usr"))
}

/// Before the overlays: fold what the covering overlay kept at the last
/// boot into the `/usr` upper's `lib/modules` (offline), and bind the
/// live image's `/usr/lib/modules` aside, read-only. `None` when `/usr`
/// is not a persistent overlay dir.
pub fn prepare(root: &Path, pm: &Path, run: &Path, s: &Settings) -> Option<Aside> {
    if !s.overlay_dirs.iter().any(|d| d == "/usr") {
        return None;
    }
    if let Err(e) = fold_kept(pm) {
        log::warn!("kernel modules: carrying the last boot's changes to /usr/lib/modules: {e:#}");
    }
    let kver = kver();
    let live = root.join("usr/lib/modules");
    if kver.is_empty() || !live.join(&kver).is_dir() {
        return Some(Aside { kver, image: None });
    }
    let aside = run.join("mados/kmod-image");
    let r = (|| -> Result<()> {
        std::fs::create_dir_all(&aside)?;
        let d = Dir::open(&live)?;
        nix::mount::mount(
            Some(&d.fd_path()),
            &aside,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("binding {} aside", live.display()))?;
        nix::mount::mount(
            None::<&str>,
            &aside,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .context("making it read-only")
    })();
    match r {
        Ok(()) => Some(Aside {
            kver,
            image: Some(aside),
        }),
        Err(e) => {
            let _ = nix::mount::umount2(&aside, MntFlags::MNT_DETACH);
            log::warn!("kernel modules: {e:#}");
            Some(Aside { kver, image: None })
        }
    }
}

/// The layering failed: drop the aside.
pub fn abandon(a: Aside) {
    if let Some(img) = &a.image {
        let _ = nix::mount::umount2(img, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(img);
    }
}

/// `overlays/usr/kmod-upper` folded into `overlays/usr/upper/lib/modules`
/// (cut-safe and idempotent: `util::overlayfs::fold`).
fn fold_kept(pm: &Path) -> Result<()> {
    let base = match Dir::open(&usr_base(pm)) {
        Ok(d) => d,
        Err(_) => return Ok(()),
    };
    let kept = match base.dir(Path::new(UPPER)) {
        Ok(d) => d,
        Err(_) => return Ok(()),
    };
    if kept.list()?.is_empty() {
        return Ok(());
    }
    let dst = base.dir_create(Path::new("upper/lib/modules"), 0o755)?;
    let r = fold_at(
        &kept,
        &dst,
        &FoldOptions {
            // the image lies below: a removal there must go on hiding it
            keep_whiteouts: true,
            skip: &[],
        },
    )?;
    dst.syncfs()?;
    log::info!(
        "kernel modules: the last boot's changes to /usr/lib/modules carried into the persistent /usr ({} entries)",
        r.moved + r.removed
    );
    Ok(())
}

fn read_dep(d: &Dir) -> Option<Vec<u8>> {
    use std::io::Read;
    let (f, st) = d.open_read("modules.dep".as_ref(), None).ok()?;
    if st.st_size as u64 > DEP_MAX {
        return None;
    }
    let mut v = Vec::new();
    f.take(DEP_MAX).read_to_end(&mut v).ok()?;
    Some(v)
}

/// After the overlays: look at the merged view and act on it. Every mount
/// made is in `done`; on failure the ones made here are undone.
pub fn apply(root: &Path, pm: &Path, a: Aside, done: &mut Vec<Mounted>) -> KernelModules {
    let keep = done.len();
    let mut k = KernelModules {
        running: a.kver.clone(),
        installed: vec![],
        action: Action::NotInImage,
        message: String::new(),
    };
    let r = apply_inner(root, pm, &a, done, &mut k);
    if let Some(img) = &a.image {
        // the mounts made from it hold their own references
        let _ = nix::mount::umount2(img, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(img);
    }
    if let Err(e) = r {
        crate::boot::mounts::undo(done, keep);
        k.action = Action::Failed;
        k.message = format!("{e:#}");
    }
    k
}

fn apply_inner(
    root: &Path,
    pm: &Path,
    a: &Aside,
    done: &mut Vec<Mounted>,
    k: &mut KernelModules,
) -> Result<()> {
    let modules =
        Dir::open(root).and_then(|r| r.dir_through_mounts(Path::new("usr/lib/modules"), false));
    let merged = match &modules {
        Err(_) => Merged::NoParent,
        Ok(m) => {
            k.installed = m
                .list()?
                .into_iter()
                .filter(|n| n.as_os_str() != a.kver.as_str())
                .filter(|n| {
                    m.lstat(n).ok().flatten().is_some_and(|st| {
                        crate::util::safefs::kind(&st) == crate::util::safefs::Kind::Dir
                    })
                })
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            match m.lstat(a.kver.as_ref())? {
                None => Merged::Missing,
                Some(_) => match m.dir(Path::new(&a.kver)) {
                    Ok(d) => Merged::Dir(read_dep(&d)),
                    Err(_) => Merged::NotDir,
                },
            }
        }
    };
    let image = match &a.image {
        Some(i) => Some((i.clone(), Dir::open(&i.join(&a.kver))?)),
        None => None,
    };
    let image_dep = image.as_ref().and_then(|(_, d)| read_dep(d));
    let target = root.join("usr/lib/modules").join(&a.kver);
    match decide(image_dep.as_deref(), &merged) {
        Plan::Nothing(act) => k.action = act,
        Plan::Refuse(why) => bail!("{}: {why}", target.display()),
        Plan::Bind => {
            let (_, src) = image.as_ref().expect("decided with the image");
            let dst = modules?.dir(Path::new(&a.kver))?;
            bind(&src.fd_path(), &dst.fd_path(), &target, done)?;
            k.action = Action::Bound;
        }
        Plan::Overlay => {
            let (img, src) = image.as_ref().expect("decided with the image");
            let base = Dir::open(&usr_base(pm))?;
            let low = base
                .dir(Path::new("upper/lib/modules"))
                .context("the persistent /usr upper's lib/modules")?;
            let up = base.dir_create(Path::new(UPPER), 0o755)?;
            let work = base.dir_create(Path::new(WORK), 0o700)?;
            let on = modules?;
            // `index=off` given, not left to the kernel's default: with the
            // index on (CONFIG_OVERLAY_FS_INDEX=y, or `overlay.index=1`) a
            // lower that lies inside another mount's upper is refused with
            // EBUSY (xfstests overlay/065); off, the kernel only warns.
            let opts = format!(
                "{COVER_OPTIONS},lowerdir={}:{},upperdir={},workdir={}",
                img.display(),
                low.fd_path().display(),
                up.fd_path().display(),
                work.fd_path().display()
            );
            let at = root.join("usr/lib/modules");
            crate::boot::mounts::mount("mados-kmod", &on.fd_path(), "overlay", &opts)?;
            log::info!("mounted overlay on {}", at.display());
            done.push(Mounted {
                target: at.clone(),
                fstype: "overlay".into(),
                source: "mados-kmod".into(),
                options: format!(
                    "{COVER_OPTIONS},lowerdir={}:{},upperdir={},workdir={}",
                    img.display(),
                    usr_base(pm).join("upper/lib/modules").display(),
                    usr_base(pm).join(UPPER).display(),
                    usr_base(pm).join(WORK).display()
                ),
            });
            let dst = Dir::open(root)?
                .dir_through_mounts(&Path::new("usr/lib/modules").join(&a.kver), false)?;
            bind(&src.fd_path(), &dst.fd_path(), &target, done)?;
            k.action = Action::Overlaid;
        }
    }
    k.message = describe(k);
    Ok(())
}

/// A bind of the read-only aside: read-only itself (a bind keeps the
/// per-mount flags of its source).
fn bind(src: &Path, dst: &Path, target: &Path, done: &mut Vec<Mounted>) -> Result<()> {
    nix::mount::mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("binding the image's modules on {}", target.display()))?;
    log::info!(
        "bound the image's modules on {} (read-only)",
        target.display()
    );
    done.push(Mounted {
        target: target.to_path_buf(),
        fstype: "bind".into(),
        source: "the live image's /usr/lib/modules".into(),
        options: "bind,ro".into(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let img = b"kernel/fs/x.ko:\n".as_slice();
        assert_eq!(
            decide(None, &Merged::Missing),
            Plan::Nothing(Action::NotInImage)
        );
        assert_eq!(
            decide(Some(img), &Merged::Dir(Some(img.to_vec()))),
            Plan::Nothing(Action::Matches)
        );
        // replaced by another build, or emptied: bound over
        assert_eq!(
            decide(Some(img), &Merged::Dir(Some(b"other".to_vec()))),
            Plan::Bind
        );
        assert_eq!(decide(Some(img), &Merged::Dir(None)), Plan::Bind);
        // whited out: covered by the small overlay
        assert_eq!(decide(Some(img), &Merged::Missing), Plan::Overlay);
        assert!(matches!(
            decide(Some(img), &Merged::NotDir),
            Plan::Refuse(_)
        ));
        assert!(matches!(
            decide(Some(img), &Merged::NoParent),
            Plan::Refuse(_)
        ));
    }

    #[test]
    fn status_names_both_kernels() {
        let mut k = KernelModules {
            running: "6.1.0-56-amd64".into(),
            installed: vec!["9.9.9-fake".into()],
            action: Action::Overlaid,
            message: String::new(),
        };
        let t = describe(&k);
        assert!(t.starts_with(
            "kernel 9.9.9-fake installed in persistence; the stick boots 6.1.0-56-amd64 from the ISO; its modules come from the ISO"
        ), "{t}");
        k.action = Action::Matches;
        k.installed.clear();
        assert_eq!(
            describe(&k),
            "the stick boots 6.1.0-56-amd64 from the ISO; its modules are in place"
        );
        let j = serde_json::to_value(&k).unwrap();
        assert_eq!(j["action"], "matches");
    }
}
