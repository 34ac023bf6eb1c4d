//! After boot: `status`, `enable`, `disable`, `remove`, on the boot stick
//! (found through state.json) or on any `--device` (block device or disk
//! image). Same planning and safety code as `boot`; refusals exit with 3.

use crate::blockdev::{self, Loop};
use crate::config::Settings;
use crate::flags;
use crate::layout::{self, Layout};
use crate::mounts;
use crate::partplan;
use crate::state::{self, State};
use crate::status;
use crate::superblock::{self, Fs};
use crate::sysfs::Sysfs;
use crate::table::{self, Backup};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Write as _};
use std::path::{Path, PathBuf};

pub const RUN_DIR: &str = "/run/mados-persistence";

/// A refusal for safety: the program exits with 3.
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Refused(msg.into()).into())
}

pub struct Opened {
    pub path: PathBuf,
    pub file: File,
    pub layout: Layout,
    pub block: bool,
}

/// Open a block device or image and read its layout (with the kernel's
/// partition nodes for block devices).
pub fn open_device(path: &Path, write: bool) -> Result<Opened> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let (size, ss) = blockdev::geometry(&file)?;
    if size == 0 {
        bail!("{} is empty", path.display());
    }
    let ss = if ss == 0 {
        layout::guess_sector_size(&mut file)?
    } else {
        ss
    };
    let block = blockdev::is_block_device(path);
    let kernel = if block {
        Sysfs::default().partitions_of(&path.file_name().unwrap_or_default().to_string_lossy())
    } else {
        vec![]
    };
    let layout = layout::read_layout(&mut file, size, ss, kernel)
        .with_context(|| format!("reading the partition tables of {}", path.display()))?;
    Ok(Opened {
        path: path.to_path_buf(),
        file,
        layout,
        block,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Existing {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub uuid: String,
}

/// The ext4 filesystem labelled `label` among the table's entries.
pub fn find_persistence(o: &mut Opened, label: &str) -> Option<Existing> {
    o.layout
        .table_entries()
        .into_iter()
        .find_map(|(number, start, size)| {
            let mut w = superblock::Window::new(&mut o.file, start, size);
            match superblock::probe(&mut w) {
                Ok(Some(Fs::Ext4(e))) if e.label == label => Some(Existing {
                    number,
                    start,
                    size,
                    uuid: e.uuid,
                }),
                _ => None,
            }
        })
}

/// Delete the persistence partition: restore the table saved at creation
/// when nothing changed it since, else delete just its entry; then wipe the
/// filesystem's first MiB and tell the kernel. Returns how it was done.
pub fn remove_partition(
    disk: &Path,
    number: u32,
    start: u64,
    size: u64,
    backup: Option<&Backup>,
) -> Result<String> {
    let mut o = open_device(disk, true)?;
    let entry = o
        .layout
        .table_entries()
        .into_iter()
        .find(|(n, _, _)| *n == number);
    match entry {
        Some((_, s, l)) if s == start && l == size => {}
        _ => bail!(
            "partition {number} of {} is not at byte {start} ({size} bytes): refusing to change the table",
            disk.display()
        ),
    }
    let usable = backup.filter(|b| b.device_size == o.layout.size);
    let how = match usable {
        Some(b) if table::unchanged_since(&mut o.file, b)? => {
            table::restore(&mut o.file, b)?;
            "partition table restored from the backup saved at creation"
        }
        _ => {
            let writes = partplan::plan_delete(&o.layout, number).map_err(anyhow::Error::msg)?;
            table::apply(&mut o.file, &writes)?;
            "its table entry deleted"
        }
    };
    // wipe the superblock area so the label is gone for good
    let wipe = vec![0u8; size.min(1 << 20) as usize];
    std::io::Seek::seek(&mut o.file, std::io::SeekFrom::Start(start))?;
    std::io::Write::write_all(&mut o.file, &wipe).context("wiping the filesystem's first MiB")?;
    blockdev::flush_buffers(&o.file)?;
    if o.block
        && let Err(e) = blockdev::del_partition(&o.file, number)
    {
        log::warn!("the kernel keeps partition {number} until the next boot: {e:#}");
    }
    Ok(how.into())
}

/// The persistence filesystem mounted somewhere for a moment.
struct TempMount {
    dir: PathBuf,
    _loop: Option<Loop>,
}

impl TempMount {
    fn new(disk: &Path, block: bool, e: &Existing, readonly: bool) -> Result<TempMount> {
        let node = blockdev::partition_path(disk, e.number);
        let (via, lp) = if block && blockdev::is_block_device(&node) {
            (node, None)
        } else {
            let lp = Loop::attach(disk, e.start, e.size)?;
            (lp.path.clone(), Some(lp))
        };
        let dir = PathBuf::from(RUN_DIR).join(format!("mnt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        mounts::mount(
            &via.display().to_string(),
            &dir,
            "ext4",
            if readonly { "ro" } else { "noatime" },
        )?;
        Ok(TempMount { dir, _loop: lp })
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(e) = mounts::umount(&self.dir) {
            log::error!("{e:#}");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

pub fn read_state() -> Option<State> {
    let text = std::fs::read_to_string(Path::new(RUN_DIR).join(state::STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn pending_path() -> PathBuf {
    Path::new(RUN_DIR).join("pending")
}

fn usage(path: &str) -> Option<status::Usage> {
    let v = nix::sys::statvfs::statvfs(path).ok()?;
    let f = v.fragment_size();
    let size = v.blocks() * f;
    let free = v.blocks_available() * f;
    Some(status::Usage {
        size,
        used: size - v.blocks_free() * f,
        free,
    })
}

fn mounted_targets() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .collect()
}

/// The persistence mount of this session, if it is the one on `disk`.
fn active_on(st: Option<&State>, number: u32, disk: &Path) -> Option<PathBuf> {
    let st = st?;
    let p = st.partition.as_ref()?;
    let same_disk = st
        .boot_device
        .as_ref()
        .is_some_and(|b| Path::new(&b.disk) == disk);
    (st.mode == "persistent"
        && same_disk
        && p.number == number
        && mounted_targets().contains(&p.mountpoint))
    .then(|| PathBuf::from(&p.mountpoint))
}

pub fn status(json: bool) -> Result<()> {
    let st = read_state();
    let mounted = mounted_targets();
    let next = std::fs::read_to_string(pending_path())
        .ok()
        .map(|s| s.trim().to_string())
        .or_else(|| {
            let p = st
                .as_ref()
                .filter(|s| s.mode == "persistent")?
                .partition
                .as_ref()?;
            let f = flags::read(Path::new(&p.mountpoint));
            if f.remove {
                Some("remove".into())
            } else {
                f.disabled.map(|d| {
                    if d == flags::Disabled::Once {
                        "disabled-once"
                    } else {
                        "disabled"
                    }
                    .into()
                })
            }
        });
    let state_file = Path::new(RUN_DIR)
        .join(state::STATE_FILE)
        .display()
        .to_string();
    let s = status::build(
        st.as_ref(),
        &state_file,
        &|p| mounted.iter().any(|m| m == p),
        &usage,
        next,
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render(&s));
    }
    Ok(())
}

/// The device to act on: `--device`, else the boot stick from state.json.
fn target_device(device: Option<PathBuf>, st: Option<&State>, verb: &str) -> Result<PathBuf> {
    if let Some(d) = device {
        return Ok(d);
    }
    let Some(st) = st else {
        return refuse(format!(
            "this system was not booted from a madOS stick (no {RUN_DIR}/state.json); name the stick or image with --device to {verb} persistence on it"
        ));
    };
    match &st.boot_device {
        Some(b) if b.kind == "usb" => Ok(PathBuf::from(&b.disk)),
        Some(b) => refuse(format!(
            "the boot device {} is a {}, not a USB stick; name a stick or image with --device",
            b.disk, b.description
        )),
        None => refuse("the boot device is unknown; name a stick or image with --device"),
    }
}

fn confirm(question: &str, word: Option<&str>, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return refuse("no terminal to confirm on; pass --yes");
    }
    match word {
        Some(w) => print!("{question} Type '{w}' to go on: "),
        None => print!("{question} [y/N] "),
    }
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let ok = match word {
        Some(w) => line.trim() == w,
        None => matches!(line.trim(), "y" | "Y" | "yes"),
    };
    if ok {
        Ok(())
    } else {
        refuse("not confirmed; nothing was changed")
    }
}

fn step(n: usize, total: usize, what: &str) {
    println!("[{n}/{total}] {what}");
}

pub fn enable(
    device: Option<PathBuf>,
    size: Option<crate::size::Size>,
    yes: bool,
    s: &Settings,
) -> Result<()> {
    let st = read_state();
    let disk = target_device(device, st.as_ref(), "enable")?;
    let is_boot = st
        .as_ref()
        .and_then(|s| s.boot_device.as_ref())
        .is_some_and(|b| Path::new(&b.disk) == disk);
    let mut o = open_device(&disk, false)?;
    if let Some(e) = find_persistence(&mut o, &s.label) {
        // idempotent: already there; enable only clears disable/remove requests
        let cleared = match active_on(st.as_ref(), e.number, &disk) {
            Some(pm) => flags::clear(&pm)?,
            None => flags::clear(&TempMount::new(&disk, o.block, &e, false)?.dir)?,
        };
        let _ = std::fs::remove_file(pending_path());
        println!(
            "{} already has persistence (partition {}, {}); nothing to create.",
            disk.display(),
            e.number,
            crate::size::human(e.size)
        );
        if cleared {
            println!("The request to disable or remove it was cleared: the next boot uses it.");
        }
        return Ok(());
    }
    if o.block && !is_boot {
        let name = disk
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let busy: Vec<String> = Sysfs::default()
            .partitions_of(&name)
            .into_iter()
            .map(|k| format!("/dev/{}", k.name))
            .chain(std::iter::once(disk.display().to_string()))
            .filter(|n| mount_sources().contains(n))
            .collect();
        if !busy.is_empty() {
            return refuse(format!(
                "{} is in use (mounted: {})",
                disk.display(),
                busy.join(", ")
            ));
        }
    }
    let mut settings = s.clone();
    if let Some(sz) = size {
        settings.max_size = Some(sz);
    }
    let opts = partplan::PlanOptions {
        min_free: settings.min_free,
        max_size: settings.max_size.map(|m| m.resolve(u64::MAX)),
        ..Default::default()
    };
    let plan = match partplan::plan(&o.layout, &opts) {
        Ok(p) => p,
        Err(r) => {
            return refuse(format!(
                "not creating persistence on {}: {r}",
                disk.display()
            ));
        }
    };
    println!(
        "Will create partition {} on {} in the {} table: byte {} to {} ({}), ext4 labelled '{}'.",
        plan.number,
        disk.display(),
        format!("{:?}", plan.table).to_uppercase(),
        plan.start,
        plan.start + plan.size,
        crate::size::human(plan.size),
        settings.label
    );
    println!(
        "Nothing before byte {} (the ISO, its EFI partition, the tables) is changed but these sectors:",
        plan.used_end
    );
    for w in &plan.writes {
        println!("  {} bytes at {}: {}", w.len, w.offset, w.what);
    }
    confirm("Create it?", None, yes)?;
    drop(o);
    let total = if is_boot { 3 } else { 2 };
    step(
        1,
        total,
        &format!(
            "creating partition {} (a backup of every table sector it touches is kept) and formatting {} \
             with mke2fs; this can take a minute on a slow stick",
            plan.number,
            crate::size::human(plan.size)
        ),
    );
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(RUN_DIR)?;
    let c = crate::boot::create_partition(&disk, &settings, Path::new(RUN_DIR))?;
    println!("      done in {:.1} s", t0.elapsed().as_secs_f64());
    let e = Existing {
        number: c.number,
        start: c.start,
        size: c.size,
        uuid: String::new(),
    };
    let backup = c.backup.clone();
    drop(c);
    step(2, total, "saving the table backup on the new partition");
    let m = TempMount::new(&disk, blockdev::is_block_device(&disk), &e, false)?;
    flags::write_backup(&m.dir, &backup)?;
    if is_boot {
        step(3, total, "copying this session's changes into it");
        save_session(&m.dir, &settings)?;
        crate::fsutil::write_atomic(&pending_path(), b"enabled\n")?;
    }
    drop(m);
    println!(
        "Persistence created on {} (partition {}).{}",
        disk.display(),
        e.number,
        if is_boot {
            " It takes effect at the next boot; this session's changes so far are in it."
        } else {
            ""
        }
    );
    Ok(())
}

fn mount_sources() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            f.get(sep + 2).map(|s| s.to_string())
        })
        .collect()
}

/// Copy the RAM session's changes to a new partition: the overlay uppers
/// (archiso's cow or ours) and the bind dirs as they are now.
fn save_session(pm: &Path, s: &Settings) -> Result<()> {
    let uppers = [
        PathBuf::from("/run/archiso/cowspace/upper"),
        PathBuf::from("/run/mados/cow"),
    ];
    for d in &s.overlay_dirs {
        let esc = mounts::escape(d);
        let dst = pm.join("overlays").join(&esc).join("upper");
        for (i, base) in uppers.iter().enumerate() {
            let src = if i == 0 {
                base.join(d.trim_start_matches('/'))
            } else {
                base.join(&esc).join("upper")
            };
            if src.is_dir() {
                std::fs::create_dir_all(&dst)?;
                crate::fsutil::copy_tree(&src, &dst).with_context(|| format!("saving {d}"))?;
            }
        }
        std::fs::create_dir_all(pm.join("overlays").join(&esc).join("work"))?;
    }
    for d in &s.bind_dirs {
        let src = Path::new(d);
        if src.is_dir() {
            let dst = pm.join(mounts::escape(d));
            std::fs::create_dir_all(&dst)?;
            crate::fsutil::copy_tree(src, &dst).with_context(|| format!("saving {d}"))?;
        }
    }
    Ok(())
}

/// The persistence partition `disable` and `remove` act on, or a refusal.
fn locate(
    device: Option<PathBuf>,
    verb: &str,
    s: &Settings,
) -> Result<(Option<State>, PathBuf, Opened, Existing)> {
    let st = read_state();
    let disk = target_device(device, st.as_ref(), verb)?;
    let mut o = open_device(&disk, false)?;
    match find_persistence(&mut o, &s.label) {
        Some(e) => Ok((st, disk, o, e)),
        None => refuse(format!(
            "{} has no persistence partition labelled '{}'",
            disk.display(),
            s.label
        )),
    }
}

pub fn disable(device: Option<PathBuf>, once: bool, s: &Settings) -> Result<()> {
    let (st, disk, o, e) = locate(device, "disable", s)?;
    let kind = if once {
        flags::Disabled::Once
    } else {
        flags::Disabled::Always
    };
    match active_on(st.as_ref(), e.number, &disk) {
        Some(pm) => flags::set_disabled(&pm, kind)?,
        None => flags::set_disabled(&TempMount::new(&disk, o.block, &e, false)?.dir, kind)?,
    }
    println!(
        "{} The data stays on partition {}; nothing is unmounted in this session. `mados-persistence enable` turns it back on.",
        if once {
            "The next boot runs in RAM mode, the one after uses persistence again."
        } else {
            "Boots run in RAM mode from now on."
        },
        e.number
    );
    Ok(())
}

pub fn remove(device: Option<PathBuf>, yes: bool, s: &Settings) -> Result<()> {
    let (st, disk, o, e) = locate(device, "remove", s)?;
    let active = active_on(st.as_ref(), e.number, &disk);
    let used = match &active {
        Some(pm) => usage(&pm.to_string_lossy()),
        None => {
            let m = TempMount::new(&disk, o.block, &e, true)?;
            usage(&m.dir.to_string_lossy())
        }
    };
    println!(
        "This permanently deletes partition {} on {} ({}, {} in use): every saved change, installed package and /home file on it.",
        e.number,
        disk.display(),
        crate::size::human(e.size),
        used.map_or("unknown".into(), |u| crate::size::human(u.used))
    );
    println!("The ISO and its EFI partition are not touched.");
    confirm("Remove it?", Some("remove"), yes)?;
    drop(o);
    if let Some(pm) = active {
        flags::set_remove(&pm)?;
        println!(
            "Persistence is in use in this session: it will be removed at the next boot, before anything is mounted."
        );
        return Ok(());
    }
    let backup = {
        let o2 = open_device(&disk, false)?;
        let m = TempMount::new(&disk, o2.block, &e, true)?;
        flags::read_backup(&m.dir)
    };
    let how = remove_partition(&disk, e.number, e.start, e.size, backup.as_ref())?;
    println!(
        "Removed partition {} from {} ({how}).",
        e.number,
        disk.display()
    );
    Ok(())
}
