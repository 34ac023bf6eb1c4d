//! `mados-persistence boot`: the early-boot run. Reads everything, decides
//! (detect), creates the partition if needed (create), checks and mounts it,
//! layers the mounts (mounts), and hands off through state.json. Any
//! failure on the persistent path ends in RAM mode; this never fails the
//! boot.

pub mod detect;
pub mod flags;
pub mod iso_build;
pub mod kmod;
pub mod mounts;
pub mod session;
pub mod set_aside;
pub mod state;
pub mod tier;
pub mod unlock;
pub mod usercache;

use crate::disk::blockdev::Loop;
use crate::disk::e2fs;
use crate::disk::mountinfo;
use crate::disk::stick::{Origin, create_partition_with, reach_partition};
use crate::disk::superblock::{self, Fs};
use crate::disk::sysfs::Sysfs;
use crate::disk::{layout, partplan};
use crate::settings::cmdline;
use crate::settings::config::{self, Settings};
use crate::util::fsutil;
use anyhow::{Context, Result};
use detect::{Decision, Probed, Reason};
use iso_build::IsoBuild;
use mounts::Mounted;
use state::{BootDevice, Partition, State, Timing};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct BootOptions {
    /// The live root assembled by the initramfs (`/new_root`).
    pub root: PathBuf,
    pub cmdline: String,
    pub sysfs: PathBuf,
    /// The initramfs' /run, moved into the new root before switch_root.
    pub run: PathBuf,
}

impl BootOptions {
    pub fn pmount(&self) -> PathBuf {
        self.run.join("mados/persistence")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.run.join(state::STATE_DIR)
    }
}

struct Timer {
    t: Instant,
    out: Vec<Timing>,
}

impl Timer {
    fn lap(&mut self, step: &str) {
        let ms = self.t.elapsed().as_secs_f64() * 1000.0;
        self.out.push(Timing {
            step: step.into(),
            ms: (ms * 100.0).round() / 100.0,
        });
        self.t = Instant::now();
    }
}

pub fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024)
}

/// Why the filesystem on `dev` must not be opened for writing, checked or
/// mounted: it is mounted somewhere already (by device number), or
/// something is stacked on it (sysfs holders). Two ext4 instances over the
/// same blocks corrupt it.
pub fn in_use(mi: &[mountinfo::Mount], dev: &crate::disk::sysfs::BlockDev) -> Option<String> {
    if let Some(m) = mountinfo::mounted(mi, dev.devnum).first() {
        return Some(format!(
            "{} is already mounted at {}; not checking or mounting it a second time",
            dev.dev_path().display(),
            m.mountpoint
        ));
    }
    (!dev.holders.is_empty()).then(|| {
        format!(
            "{} is in use by {}; not checking or mounting it",
            dev.dev_path().display(),
            dev.holders.join(", ")
        )
    })
}

pub fn probe_all(sys: &Sysfs) -> Vec<Probed> {
    sys.list()
        .into_iter()
        // devices that cannot hold the ISO or have no medium are not
        // opened (an empty floppy drive logs I/O errors when read)
        .filter(|d| d.size > 0 && !["ram", "zram", "fd"].iter().any(|p| d.name.starts_with(p)))
        .map(|mut dev| {
            let f = File::open(dev.dev_path()).ok();
            // sysfs `ro`, and the kernel's own word on it (BLKROGET)
            if f.as_ref()
                .is_some_and(|f| crate::disk::blockdev::read_only(f).unwrap_or(false))
            {
                dev.read_only = true;
            }
            let fs = f.and_then(|mut f| superblock::probe(&mut f).ok().flatten());
            Probed { dev, fs }
        })
        .collect()
}

/// `mados-persistence boot`: read the command line (or take `cmdline`), log
/// to /dev/kmsg, run the boot. Returns the mode it ended in.
pub fn run_from_cli(
    root: PathBuf,
    cmdline: Option<String>,
    sysfs: PathBuf,
    run_dir: PathBuf,
) -> Result<String> {
    let cmdline = match cmdline {
        Some(c) => c,
        None => std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?,
    };
    let debug = cmdline::parse(&cmdline).debug;
    crate::util::logging::init(
        true,
        if debug {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        },
    );
    let st = run(&BootOptions {
        root,
        cmdline,
        sysfs,
        run: run_dir,
    });
    Ok(st.mode)
}

/// The whole boot. Never returns an error: failures end in RAM mode.
pub fn run(o: &BootOptions) -> State {
    let mut t = Timer {
        t: Instant::now(),
        out: vec![],
    };
    let mut st = State {
        version: 1,
        root: o.root.display().to_string(),
        cmdline: o.cmdline.trim().to_string(),
        ..Default::default()
    };
    let params = cmdline::parse(&o.cmdline);
    let s = config::resolve(&o.root, &params, &mut st.warnings);
    for w in &st.warnings {
        log::warn!("{w}");
    }
    t.lap("settings");
    let sys = Sysfs::new(&o.sysfs);
    let mi = mountinfo::read();
    // archiso's own persistence (cow_label=/cow_device=): archiso has that
    // filesystem mounted as its cowspace. Stand down before opening any
    // device: never probe, fsck or mount it a second time.
    let stand_down = s
        .archiso_cow
        .clone()
        .or_else(|| {
            mountinfo::at(&mi, "/run/archiso/cowspace")
                .filter(|m| m.fstype != "tmpfs")
                .map(|m| format!("{} ({}) is archiso's cowspace", m.source, m.fstype))
        })
        .map(|why| {
            Reason::new(
                "archiso_cow",
                format!(
                    "archiso's own persistence is active ({why}): mados-persistence stands down and does not \
                     open, check or mount that filesystem; your changes are saved by archiso"
                ),
            )
        });
    let devs = if stand_down.is_some() {
        vec![]
    } else {
        probe_all(&sys)
    };
    t.lap("probe");
    // archiso mounts the ISO here, dracut's dmsquash-live there
    let bootmnt = mountinfo::at(&mi, "/run/archiso/bootmnt")
        .or_else(|| mountinfo::at(&mi, "/run/initramfs/live"))
        .map(|m| m.source.clone());
    let iso = detect::find_iso(&devs, &s, bootmnt.as_deref());
    st.iso = iso.as_ref().ok().and_then(|p| match &p.fs {
        Some(Fs::Iso9660(i)) => Some(IsoBuild {
            label: i.label.clone(),
            uuid: i.uuid.clone(),
        }),
        _ => None,
    });
    let kind = iso.as_ref().ok().map(|p| sys.kind(p.dev.disk_name()));
    if let (Ok(p), Some(k)) = (&iso, &kind) {
        log::info!(
            "boot device: {} on {} ({})",
            p.dev.dev_path().display(),
            p.dev.disk_name(),
            k.describe()
        );
        st.boot_device = Some(BootDevice {
            device: p.dev.dev_path().display().to_string(),
            disk: format!("/dev/{}", p.dev.disk_name()),
            kind: serde_json::to_value(k)
                .ok()
                .and_then(|v| v["kind"].as_str().map(String::from))
                .unwrap_or_default(),
            description: k.describe(),
        });
    }
    let (decision, warnings) = match stand_down {
        Some(reason) => (Decision::Ram { reason }, vec![]),
        None => detect::decide(&s, &devs, iso.map(|p| (p, kind.as_ref().unwrap()))),
    };
    for w in warnings {
        log::warn!("{w}");
        st.warnings.push(w);
    }
    t.lap("detect");
    let ram = mem_total();
    let persistent = match decision {
        Decision::Ram { reason } => Err(reason),
        Decision::Use {
            device,
            explicit,
            read_only,
        } => {
            let dev = devs
                .iter()
                .find(|p| p.dev.name == device)
                .map(|p| p.dev.clone())
                .unwrap();
            if explicit {
                log::info!(
                    "using {} named by mados.persistence.device=",
                    dev.dev_path().display()
                );
            }
            let disk = PathBuf::from("/dev").join(dev.disk_name());
            if read_only {
                log::warn!(
                    "{} is write-protected: its persistence is mounted read-only, changes are kept in RAM",
                    dev.dev_path().display()
                );
            }
            let opened = match in_use(&mi, &dev) {
                Some(why) => Err(Reason::new("in_use", why)),
                None if read_only => crate::disk::stick::reach_partition_read_only(&dev.dev_path())
                    .map(|p| (p, None))
                    .map_err(|e| Reason::new("open_failed", format!("{e:#}"))),
                None => reach_partition(&disk, &dev.dev_path(), dev.start, dev.size)
                    .map_err(|e| Reason::new("open_failed", format!("{e:#}"))),
            };
            // an encrypted persistence: unlocked first, then used through
            // its mapping exactly as a clear one
            let luks = devs
                .iter()
                .find(|p| p.dev.name == device)
                .and_then(|p| match &p.fs {
                    Some(Fs::Luks2(h)) => Some(h.clone()),
                    _ => None,
                });
            let opened = match (opened, luks) {
                (Ok((part, lp)), Some(h)) => {
                    let mut enc = unlock::describe(&part, &h);
                    let r = unlock::unlock(&part, read_only, &mut enc);
                    st.encryption = Some(enc);
                    t.lap("unlock");
                    r.map(|mapper| (mapper, lp))
                }
                (o, _) => o,
            };
            match opened {
                Err(r) => Err(r),
                Ok((via, lp)) => {
                    t.lap("open");
                    let tg = Target {
                        disk,
                        node: dev.dev_path(),
                        via,
                        number: dev.partition.unwrap_or(0),
                        start: dev.start,
                        size: dev.size,
                        created: false,
                        origin: "existing".into(),
                        _loop: lp,
                    };
                    if read_only {
                        mount_read_only(o, &s, &mut st, &mut t, tg)
                    } else {
                        mount_persistence(o, &s, &mut st, &mut t, tg)
                    }
                }
            }
        }
        Decision::Create { disk } => {
            let disk_path = PathBuf::from("/dev").join(&disk);
            // encrypted persistence asked for: a new passphrase first; none
            // (or no way to encrypt here) is RAM mode, never a clear one
            // a creation a cut interrupted that was encrypted is finished
            // encrypted, whatever the settings say now
            // and a partition an earlier release left (found by the claim's
            // end copy) is adopted as it is: an encrypted one is unlocked
            // with its own passphrase, never given a new one
            let (resume_encrypted, adopting) = crate::disk::stick::open_device(&disk_path, false)
                .map(|mut od| {
                    let adopting = crate::disk::stick::prepare(&mut od, &s)
                        .is_ok_and(|p| p.origin() == Origin::Adopted);
                    (
                        crate::disk::stick::unfinished_encrypted(&mut od, &s.label),
                        adopting,
                    )
                })
                .unwrap_or((false, false));
            let resume_encrypted = resume_encrypted && !s.encrypt;
            if resume_encrypted {
                log::warn!(
                    "an encrypted persistence partition was being created on {} when it was cut: finishing it \
                     encrypted",
                    disk_path.display()
                );
            }
            // which prompt asked for a new passphrase (state.json)
            let mut asked_by = "console";
            let enc = if (s.encrypt || resume_encrypted) && !adopting {
                if let Some(t) = &s.test_pbkdf {
                    st.warnings.push(format!(
                        "mados.persistence.test_pbkdf={t}: a test-only argon2id cost for the new \
                         encrypted partition, weaker than the default"
                    ));
                }
                let e = unlock::ask_new(&disk_path, &s);
                t.lap("passphrase");
                e.map(|(enc, by)| {
                    asked_by = by;
                    Some(enc)
                })
            } else {
                Ok(None)
            };
            let made = enc.map(|enc| {
                let made = create_partition_with(&disk_path, &s, &o.state_dir(), enc.as_ref());
                // the passphrase is wiped here, before anything is mounted
                drop(enc);
                made
            });
            match made {
                Err(r) => Err(r),
                Ok(Ok(mut c)) => {
                    t.lap("create");
                    if let Some(m) = c.mapping.take() {
                        // the volume stays open for this boot
                        m.keep();
                        st.encryption = Some(unlock::describe_new(&c.part, asked_by));
                    }
                    log::info!(
                        "{} {} ({})",
                        match c.origin {
                            Origin::Created => "created",
                            Origin::Resumed => "finished the interrupted creation of",
                            Origin::Adopted => "restored the entry of",
                        },
                        c.node.display(),
                        crate::settings::size::human(c.size)
                    );
                    let backup = c.backup.clone();
                    // an adopted encrypted volume: unlocked first
                    let adopted_luks = (c.origin == Origin::Adopted)
                        .then(|| {
                            File::open(&c.part)
                                .ok()
                                .and_then(|mut f| crate::disk::luks::probe(&mut f).ok().flatten())
                        })
                        .flatten()
                        .filter(|h| h.label == s.label);
                    if s.encrypt && c.origin == Origin::Adopted && adopted_luks.is_none() {
                        st.warnings.push(format!(
                            "a clear persistence filesystem left by an earlier release on {} was restored as \
                             it is: it is NOT encrypted (encrypting it would lose its data)",
                            disk_path.display()
                        ));
                    }
                    let via = match adopted_luks {
                        Some(h) => {
                            let mut enc = unlock::describe(&c.part, &h);
                            let r = unlock::unlock(&c.part, false, &mut enc);
                            st.encryption = Some(enc);
                            t.lap("unlock");
                            r
                        }
                        None => Ok(c.target),
                    };
                    match via {
                        Err(r) => Err(r),
                        Ok(via) => {
                            let tg = Target {
                                disk: disk_path.clone(),
                                node: c.node,
                                via,
                                number: c.number,
                                start: c.start,
                                size: c.size,
                                created: c.origin != Origin::Adopted,
                                origin: serde_json::to_value(c.origin)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default(),
                                _loop: c._loop,
                            };
                            let r = mount_persistence(o, &s, &mut st, &mut t, tg);
                            if r.is_ok()
                                && let Err(e) = flags::write_backup(&o.pmount(), &backup)
                            {
                                log::warn!("keeping the table backup on the partition: {e:#}");
                            }
                            r
                        }
                    }
                }
                Ok(Err(e)) => {
                    t.lap("create");
                    let code = match e.downcast_ref::<partplan::Refusal>() {
                        Some(partplan::Refusal::TooSmall { .. }) => "no_space",
                        Some(partplan::Refusal::NoTable) => "no_table",
                        Some(_) => "refused",
                        None if e.downcast_ref::<layout::Invalid>().is_some() => "refused",
                        None => "create_failed",
                    };
                    Err(Reason::new(
                        code,
                        format!("not creating persistence on /dev/{disk}: {e:#}"),
                    ))
                }
            }
        }
    };
    // an unlocked volume not used after all (disabled, removed, a failed
    // check or mount): closed, so the running system does not hold it
    if persistent.is_err()
        && st.encryption.as_ref().is_some_and(|e| e.unlocked)
        && let Err(e) = crate::disk::cryptsetup::close(unlock::MAPPER)
    {
        log::warn!("{e:#}");
    }
    match persistent {
        Ok(()) => st.mode = "persistent".into(),
        Err(reason) => {
            log::warn!("RAM mode: {}", reason.message);
            st.mode = "ram".into();
            st.reason = Some(reason);
            let writable = root_writable(&o.root);
            let plan =
                mounts::ram_plan(&o.root, &o.run.join("mados/cow"), &s, ram, writable, &|p| {
                    p.is_dir()
                });
            let mut done = Vec::new();
            if let Err(e) = mounts::execute(&plan, &mut done) {
                log::error!("RAM mode mounts: {e:#}");
                st.warnings.push(format!("RAM mode mounts failed: {e:#}"));
            }
            st.mounts.extend(done);
            t.lap("mount");
        }
    }
    finish(o, &mut st, t);
    st
}

fn root_writable(root: &Path) -> bool {
    nix::sys::statvfs::statvfs(root)
        .map(|v| !v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false)
}

/// How the last boot left the filesystem on `via` (its superblock, read
/// before e2fsck), and its write counter and error record; logged when it
/// was not unmounted.
fn last_shutdown(
    via: &Path,
    created: bool,
) -> (Option<state::LastShutdown>, Option<superblock::Ext4Wear>) {
    let sb = File::open(via)
        .and_then(|mut f| superblock::probe(&mut f))
        .map_err(|e| log::warn!("reading the superblock of {}: {e}", via.display()))
        .ok()
        .flatten();
    let Some(Fs::Ext4(sb)) = sb else {
        return (None, None);
    };
    if sb.wear.error_count > 0 {
        log::warn!(
            "{}: the kernel recorded {} filesystem errors on it (last at {} s)",
            via.display(),
            sb.wear.error_count,
            sb.wear.last_error_unix_s
        );
    }
    let last = state::LastShutdown::from_superblock(&sb, created);
    if last == state::LastShutdown::Unclean {
        log::warn!(
            "{}: the last shutdown did not unmount it (its journal needs recovery)",
            via.display()
        );
    }
    (Some(last), Some(sb.wear))
}

/// Where the persistence partition is and how it is reached.
pub struct Target {
    pub disk: PathBuf,
    pub node: PathBuf,
    /// What is opened: the node, or a loop device over the disk.
    pub via: PathBuf,
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub created: bool,
    /// `existing`, `created`, `resumed` or `adopted` (`disk::stick::Origin`).
    pub origin: String,
    pub _loop: Option<Loop>,
}

fn mount_persistence(
    o: &BootOptions,
    s: &Settings,
    st: &mut State,
    t: &mut Timer,
    tg: Target,
) -> Result<(), Reason> {
    // how the last boot left it, before e2fsck replays the journal
    let (last_shutdown, at_boot) = last_shutdown(&tg.via, tg.created);
    let fsck = e2fs::fsck(&tg.via).map_err(|e| Reason::new("fsck_failed", format!("{e:#}")))?;
    t.lap("fsck");
    log::info!(
        "e2fsck -p {}: {} (exit {})",
        tg.via.display(),
        fsck.summary,
        fsck.code
    );
    let node = tg.node.display().to_string();
    st.partition = Some(Partition {
        device: node.clone(),
        number: tg.number,
        mounted_from: tg.via.display().to_string(),
        created: tg.created,
        origin: tg.origin.clone(),
        start: tg.start,
        size: tg.size,
        mountpoint: o.pmount().display().to_string(),
        fsck: Some(fsck.clone()),
        last_shutdown,
        at_boot,
    });
    if !fsck.mountable() {
        return Err(Reason::new(
            "fsck_failed",
            format!(
                "e2fsck -p found {} on {node} (exit {}); not mounting it. Repair it with `e2fsck -f {node}` \
                 from another system; nothing was changed on it",
                fsck.summary, fsck.code
            ),
        ));
    }
    let pm = o.pmount();
    let opts = mounts::persist_mount_options(s.data_mode);
    std::fs::create_dir_all(&pm)
        .map_err(anyhow::Error::from)
        .and_then(|_| mounts::mount(&tg.via.display().to_string(), &pm, "ext4", &opts))
        .map_err(|e| Reason::new("mount_failed", format!("{e:#}")))?;
    // root's only: below lie the tiers' stages with dirs users own, which
    // a user who could reach them could rearrange under the companion
    // (users reach /home through its bind, never through this path)
    if let Err(e) = private_root(&pm) {
        log::warn!("making {} root's only: {e:#}", pm.display());
    }
    t.lap("mount persistence");
    // Requests left for this boot by `disable` and `remove`.
    let f = flags::read(&pm);
    if f.remove {
        let backup = flags::read_backup(&pm);
        let _ = mounts::umount(&pm);
        drop(tg._loop);
        return Err(
            match crate::disk::stick::remove_partition(
                &tg.disk,
                tg.number,
                tg.start,
                tg.size,
                backup.as_ref(),
            ) {
                Ok(how) => {
                    st.partition = None;
                    Reason::new(
                        "removed",
                        format!(
                            "the persistence partition {node} was removed as requested ({how})"
                        ),
                    )
                }
                Err(e) => Reason::new(
                    "remove_failed",
                    format!("removing {node} as requested failed: {e:#}"),
                ),
            },
        );
    }
    if let Some(d) = f.disabled {
        if d == flags::Disabled::Once
            && let Err(e) = flags::clear_disabled_once(&pm)
        {
            log::error!("{e:#}");
        }
        let _ = mounts::umount(&pm);
        return Err(match d {
            flags::Disabled::Once => Reason::new(
                "disabled_once",
                "persistence is off for this boot only (`mados-persistence disable --once`); it is back at the next boot",
            ),
            flags::Disabled::Always => Reason::new(
                "disabled",
                "persistence is turned off on the stick (`mados-persistence disable`); `mados-persistence enable` turns it on",
            ),
        });
    }
    // A restore of set-aside overlays a cut interrupted: finished, or
    // rolled back, before the build check (whatever build is booted now).
    let early = crate::util::safefs::Dir::open(&pm).is_ok_and(|r| set_aside::pending_started(&r));
    if early {
        restore_set_aside(&pm, st);
    }
    // The overlays belong to one ISO build: a re-flashed stick does not get
    // the old release's /usr layered over the new one.
    if let Some(cur) = st.iso.clone() {
        match iso_build::reconcile(&pm, &cur, s.on_iso_change) {
            Ok(None) => {}
            Ok(Some(ch)) => {
                let msg = iso_build::describe(&ch);
                log::warn!("{msg}");
                st.warnings.push(msg);
                st.iso_change = Some(ch);
            }
            Err(e) => {
                let _ = mounts::umount(&pm);
                return Err(Reason::new(
                    "iso_change_failed",
                    format!(
                        "the ISO build changed and setting the old overlays aside failed: {e:#}; \
                         not layering them over this build"
                    ),
                ));
            }
        }
    }
    // `set-aside restore`: carried out when this is the build they were
    // made on (the overlays in place set aside in turn), else it waits
    if !early {
        restore_set_aside(&pm, st);
    }
    // a RAM session `enable` saved: in place all or nothing
    match session::finish(&pm) {
        Ok(session::Finished::Nothing) => {}
        Ok(session::Finished::Placed) => {
            log::info!(
                "the session saved by `enable` was put in place (its placement had been cut)"
            )
        }
        Ok(session::Finished::Discarded) => {
            let w =
                "`enable` was cut while it copied the RAM session: the partial copy was dropped; \
                     the partition is in use, empty of that session"
                    .to_string();
            log::warn!("{w}");
            st.warnings.push(w);
        }
        Err(e) => {
            let _ = mounts::umount(&pm);
            return Err(Reason::new(
                "mount_failed",
                format!("putting the session saved by `enable` in place: {e:#}"),
            ));
        }
    }
    // From here on, the user's own saved config (in the persistent /etc)
    // decides what lives in RAM.
    let late;
    let s = match saved_config(&pm, s, &o.cmdline, &mut st.warnings) {
        Some(l) => {
            late = l;
            &late
        }
        None => s,
    };
    // `[tier] adopt_suggested`: the dirs the daemon saw written most
    let adopted;
    let s = if s.tier.enabled && s.tier.adopt_suggested {
        let mut a = s.clone();
        let got = crate::util::fsutil::read_nofollow(&pm.join(tier::SUGGESTED_FILE), 1 << 16)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<tier::Suggested>>(&b).ok())
            .unwrap_or_default();
        let budget = a.tier.budget_bytes(mem_total());
        let (added, refused) = tier::adopt(&mut a.tier.dirs, s, budget, &got);
        for w in refused {
            log::warn!("{w}");
            st.warnings.push(w);
        }
        if !added.is_empty() {
            log::info!("RAM tier: adopted the suggested {}", added.join(", "));
        }
        adopted = a;
        &adopted
    } else {
        s
    };
    let mut done = vec![Mounted {
        target: pm.clone(),
        fstype: "ext4".into(),
        source: node,
        options: opts,
    }];
    // the RAM tier's offline part, before the overlays cover its dirs
    let tiers = tier::prepare(&o.root, &pm, &o.run, s, mem_total());
    // the booted kernel's modules: the image's copy bound aside first
    let kmods = kmod::prepare(&o.root, &pm, &o.run, s);
    let plan = mounts::persistent_plan(&o.root, &pm, s, mem_total(), &|p| p.is_dir(), &|p| {
        !p.exists()
    });
    match mounts::execute(&plan, &mut done) {
        Ok(()) => {
            t.lap("layer");
            if let Some(a) = kmods {
                let k = kmod::apply(&o.root, &pm, a, &mut done);
                match k.action {
                    kmod::Action::Failed => {
                        let w = format!("kernel modules: {}", kmod::describe(&k));
                        log::warn!("{w}");
                        st.warnings.push(w);
                    }
                    kmod::Action::Bound | kmod::Action::Overlaid => {
                        log::warn!("kernel modules: {}", k.message)
                    }
                    _ => log::info!("kernel modules: {}", kmod::describe(&k)),
                }
                st.kernel_modules = Some(k);
                t.lap("kernel modules");
            }
            let (mounted, warnings) = tier::mount(&o.root, tiers, &mut done);
            for w in warnings {
                log::warn!("{w}");
                st.warnings.push(w);
            }
            st.tiers = mounted;
            t.lap("tier");
            if s.user_cache.enabled {
                st.user_caches = user_caches(&o.root, &pm, s, &mut st.warnings, &mut done);
                t.lap("user caches");
            }
            st.mounts.extend(done);
            Ok(())
        }
        Err(e) => {
            tier::abandon(tiers);
            if let Some(a) = kmods {
                kmod::abandon(a);
            }
            mounts::undo(&mut done, 0);
            Err(Reason::new("mount_failed", format!("{e:#}")))
        }
    }
}

/// `set-aside restore`'s request, carried out or left (`set_aside`);
/// what happened goes to state.json (and a warning unless it was done).
/// A failure leaves `overlays` whole (the exchange is atomic): the boot
/// layers what is there, and the next boot finishes from the request.
fn restore_set_aside(pm: &Path, st: &mut State) {
    match set_aside::restore(pm, st.iso.as_ref()) {
        Ok(None) => {}
        Ok(Some(o)) => {
            match &o {
                set_aside::Outcome::Restored(m) => log::warn!("{m}"),
                set_aside::Outcome::Waiting(m)
                | set_aside::Outcome::Dropped(m)
                | set_aside::Outcome::Failed(m) => {
                    log::warn!("{m}");
                    st.warnings.push(m.clone());
                }
            }
            st.set_aside_restore = Some(o);
        }
        Err(e) => {
            let m = format!(
                "restoring set-aside overlays failed: {e:#}; this boot layers the overlays in place, \
                 the next boot carries on from where it stopped"
            );
            log::error!("{m}");
            st.warnings.push(m.clone());
            st.set_aside_restore = Some(set_aside::Outcome::Failed(m));
        }
    }
}

/// A write-protected stick with persistence: nothing is written to it. No
/// e2fsck (`-p` would repair), the filesystem mounted `ro,noload` (no
/// journal replay), no request carried out, no ISO-change set-aside, no
/// session placed, no fold; what the partition holds is layered
/// read-only under RAM uppers (`mounts::read_only_plan`,
/// `tier::read_only_layers`: no RAM tier, so the companion has nothing
/// to sync).
fn mount_read_only(
    o: &BootOptions,
    s: &Settings,
    st: &mut State,
    t: &mut Timer,
    tg: Target,
) -> Result<(), Reason> {
    let (last_shutdown, at_boot) = last_shutdown(&tg.via, false);
    let node = tg.node.display().to_string();
    st.read_only = true;
    st.partition = Some(Partition {
        device: node.clone(),
        number: tg.number,
        mounted_from: tg.via.display().to_string(),
        created: false,
        origin: tg.origin.clone(),
        start: tg.start,
        size: tg.size,
        mountpoint: o.pmount().display().to_string(),
        fsck: None,
        last_shutdown,
        at_boot,
    });
    log::info!("not checking {node} with e2fsck: the stick is write-protected");
    if last_shutdown == Some(state::LastShutdown::Unclean) {
        let w = format!(
            "{node} was not unmounted cleanly and its journal cannot be replayed on a write-protected stick: \
             the last changes before that shutdown may be missing until it boots writable"
        );
        log::warn!("{w}");
        st.warnings.push(w);
    }
    let pm = o.pmount();
    std::fs::create_dir_all(&pm)
        .map_err(anyhow::Error::from)
        .and_then(|_| mounts::mount(&node, &pm, "ext4", mounts::READ_ONLY_OPTIONS))
        .map_err(|e| Reason::new("mount_failed", format!("{e:#}")))?;
    t.lap("mount persistence");
    let give_up = |r: Reason| {
        let _ = mounts::umount(&pm);
        Err(r)
    };
    let f = flags::read(&pm);
    if f.remove {
        return give_up(Reason::new(
            "read_only",
            format!(
                "`remove` is pending for {node}, but the stick is write-protected: nothing was removed \
                 (it is done at the next boot with the stick writable); changes are kept in RAM"
            ),
        ));
    }
    if let Some(d) = f.disabled {
        return give_up(Reason::new(
            if d == flags::Disabled::Once {
                "disabled_once"
            } else {
                "disabled"
            },
            format!(
                "persistence is turned off on the stick (`disable`{}); the stick is write-protected, \
                 so the request stays for the next boot",
                if d == flags::Disabled::Once {
                    " --once"
                } else {
                    ""
                }
            ),
        ));
    }
    let mut layered = s.clone();
    if let (Some(cur), Some(prev)) = (st.iso.clone(), iso_build::read(&pm))
        && cur != prev
        && s.on_iso_change == config::OnIsoChange::SetAside
    {
        let w = format!(
            "the overlays on {node} were made on ISO build {} ({}), not this one, and the stick is \
             write-protected so they cannot be set aside: /etc /usr /var /opt are not layered this boot; /home is",
            prev.label, prev.uuid
        );
        log::warn!("{w}");
        st.warnings.push(w);
        layered.overlay_dirs.clear();
        layered.tier.dirs.retain(|d| {
            !s.overlay_dirs
                .iter()
                .any(|p| tier::strictly_under(d, p).is_some())
        });
    }
    if fsutil::exists_nofollow(&pm.join(set_aside::REQUEST)) {
        let w = "a restore of set-aside overlays (`set-aside restore`) waits on the partition; the stick is \
                 write-protected, so it is carried out at the next boot with the stick writable"
            .to_string();
        log::warn!("{w}");
        st.warnings.push(w);
    }
    if fsutil::exists_nofollow(&session::staging(&pm)) {
        let w = "a RAM session saved by `enable` waits on the partition; it is put in place at the next \
                 boot with the stick writable"
            .to_string();
        log::warn!("{w}");
        st.warnings.push(w);
    }
    let late;
    let s = match saved_config(&pm, &layered, &o.cmdline, &mut st.warnings) {
        Some(l) => {
            late = l;
            &late
        }
        None => &layered,
    };
    let cow = o.run.join("mados/cow");
    let present = |p: &Path| p.is_dir();
    let opaque = |p: &Path| crate::util::safefs::Dir::open(p).is_ok_and(|d| d.is_opaque());
    let (aside, dirs, notes) = tier::read_only_layers(&o.root, &pm, &cow, s, &present, &opaque);
    for n in notes {
        log::warn!("{n}");
        st.warnings.push(n);
    }
    let plan = mounts::read_only_plan(
        &o.root,
        &pm,
        &cow,
        s,
        mem_total(),
        aside.clone(),
        &|p| p.is_dir(),
        &present,
    );
    let mut done = vec![Mounted {
        target: pm.clone(),
        fstype: "ext4".into(),
        source: node,
        options: mounts::READ_ONLY_OPTIONS.into(),
    }];
    if let Err(e) = mounts::execute(&plan, &mut done) {
        mounts::undo(&mut done, 0);
        return Err(Reason::new("mount_failed", format!("{e:#}")));
    }
    t.lap("layer");
    for d in dirs {
        // the dir is mounted on by its path: it must lead nowhere else (the
        // partition's upper, a user's, may hold a symlink on the way)
        let rel = PathBuf::from(d.dir.trim_start_matches('/'));
        let plain = crate::util::safefs::Dir::open(&o.root)
            .and_then(|r| r.dir_through_mounts(&rel, false))
            .is_ok();
        let r = if plain {
            mounts::execute(&d.steps, &mut done)
        } else {
            Err(anyhow::anyhow!("a symlink on the way, or not a directory"))
        };
        match r {
            Ok(()) => log::info!(
                "{}: what the partition holds, read-only, under a RAM upper",
                d.dir
            ),
            Err(e) => {
                let w = format!("{}: not layered from the partition this boot: {e:#}", d.dir);
                log::warn!("{w}");
                st.warnings.push(w);
            }
        }
    }
    // the live dirs bound aside for the tier dirs: each overlay holds its
    // own reference; one not used is let go
    for a in aside {
        if let mounts::Step::Bind { target, .. } = a
            && let Some(i) = done.iter().position(|m| m.target == target)
        {
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
            done.remove(i);
        }
    }
    t.lap("tier");
    st.mounts.extend(done);
    Ok(())
}

/// Each user's `~/.cache` in RAM (`boot::usercache`). A failure costs only
/// the caches: the boot stays persistent, the mounts made for the caches
/// are undone, and the user is told.
fn user_caches(
    root: &Path,
    pm: &Path,
    s: &Settings,
    warnings: &mut Vec<String>,
    done: &mut Vec<Mounted>,
) -> Vec<usercache::UserCache> {
    let seen = match usercache::look(root, pm, s) {
        Ok(v) => v,
        Err(e) => {
            let w = format!("~/.cache stays on the stick for every user: {e:#}");
            log::warn!("{w}");
            warnings.push(w);
            return vec![];
        }
    };
    let (steps, caches, notes) = usercache::plan(root, s, mem_total(), &seen);
    for n in notes {
        log::warn!("{n}");
        warnings.push(n);
    }
    match mounts::execute(&steps, done) {
        Ok(()) => caches,
        Err(e) => {
            let w = format!("~/.cache could not be put in RAM: {e:#}; it stays on the stick");
            log::warn!("{w}");
            warnings.push(w);
            vec![]
        }
    }
}

/// The settings with the user's saved `/etc/mados/persistence.toml` (read
/// offline from the persistent `/etc` upper on the partition at `pm`)
/// applied for the [`config::LATE_KEYS`]; `None` when the user saved no
/// config of their own (the ISO's file stands).
fn saved_config(
    pm: &Path,
    early: &Settings,
    cmdline: &str,
    warnings: &mut Vec<String>,
) -> Option<Settings> {
    use crate::util::overlayfs::{InUpper, in_upper};
    if !early.overlay_dirs.iter().any(|d| d == "/etc") {
        return None;
    }
    let upper = pm
        .join("overlays")
        .join(mounts::escape("/etc"))
        .join("upper");
    let rel = Path::new(config::CONFIG_PATH)
        .strip_prefix("etc")
        .expect("the config lives in /etc");
    let text = match in_upper(&upper, rel) {
        InUpper::Lower => return None,
        InUpper::Hidden => None,
        InUpper::Entry(p) => match fsutil::read_nofollow(&p, 1 << 20)
            .map_err(|e| e.to_string())
            .and_then(|b| String::from_utf8(b).map_err(|_| "not UTF-8".to_string()))
        {
            Ok(t) => Some(t),
            Err(e) => {
                let w = format!(
                    "the saved /etc/mados/persistence.toml cannot be read ({e}); using the ISO's"
                );
                log::warn!("{w}");
                warnings.push(w);
                return None;
            }
        },
    };
    log::info!(
        "using the saved /etc/mados/persistence.toml{} for {}",
        if text.is_none() {
            " (deleted: the defaults)"
        } else {
            ""
        },
        config::LATE_KEYS.join(", ")
    );
    let params = cmdline::parse(cmdline);
    let mut w = Vec::new();
    let late = config::resolve_text(text.as_deref(), &params, &mut w);
    let (s, notes) = config::with_late_keys(early, &late);
    for m in w
        .into_iter()
        .filter(|m| !params.warnings.contains(m))
        .map(|m| format!("saved config: {m}"))
        .chain(notes)
    {
        log::warn!("{m}");
        warnings.push(m);
    }
    Some(s)
}

fn finish(o: &BootOptions, st: &mut State, mut t: Timer) {
    let dir = o.state_dir();
    let log_path = o.root.join("var/log/mados-persistence.log");
    let mut text = format!("=== boot: mode {} ===\n", st.mode);
    for l in crate::util::logging::captured() {
        text.push_str(&l);
        text.push('\n');
    }
    let appended = std::fs::create_dir_all(log_path.parent().unwrap())
        .and_then(|_| OpenOptions::new().create(true).append(true).open(&log_path))
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    if let Err(e) = appended {
        st.warnings.push(format!(
            "could not keep the boot log at /var/log/mados-persistence.log: {e}"
        ));
    }
    t.lap("finish");
    st.timings = std::mem::take(&mut t.out);
    let json = serde_json::to_string_pretty(&st).expect("state serialises");
    if let Err(e) = fsutil::write_atomic(&dir.join(state::STATE_FILE), json.as_bytes()) {
        log::error!("writing state: {e:#}");
    }
    match &st.reason {
        None => log::info!(
            "persistence active on {}",
            st.partition.as_ref().map_or("?", |p| p.device.as_str())
        ),
        Some(r) => log::warn!("running in RAM mode: {}", r.message),
    }
}

/// The partition's root directory mode 0700, owned by root (written only
/// when it is not so already: no journal write on every boot).
fn private_root(pm: &Path) -> Result<()> {
    let d = crate::util::safefs::Dir::open(pm)?;
    let st = d.stat()?;
    if st.st_mode & 0o7777 != 0o700 || st.st_uid != 0 {
        nix::unistd::fchown(&d, Some(0.into()), Some(0.into()))?;
        nix::sys::stat::fchmod(&d, nix::sys::stat::Mode::from_bits_truncate(0o700))?;
    }
    Ok(())
}
