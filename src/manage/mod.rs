//! After boot: `status`, `enable`, `disable`, `remove`, on the boot stick
//! (found through state.json) or on any `--device` (block device or disk
//! image). Same planning and safety code as `boot`; refusals exit with 3.
//! This module holds what the commands share: the state of this boot, the
//! target device, confirmation, and a temporary mount of the partition.

pub mod enable;
pub mod health;
pub mod luks;
pub mod plan;
pub mod remove;
pub mod set_aside;
pub mod shutdown;
pub mod status;

pub use enable::enable;
pub use remove::{disable, remove};
pub use status::status;

use crate::boot::mounts;
use crate::boot::state::{self, State};
use crate::disk::blockdev::{self, Loop};
use crate::disk::stick::Existing;
use crate::settings::cmdline;
use crate::settings::config::{self, Settings};
use anyhow::Result;
use std::io::{BufRead, IsTerminal, Write as _};
use std::path::{Path, PathBuf};

/// The after-boot commands log warnings to stderr and read the running
/// system's config (the kernel command line of this boot does not apply).
fn running_settings() -> Settings {
    crate::util::logging::init(false, log::LevelFilter::Warn);
    let mut w = vec![];
    let s = config::resolve(Path::new("/"), &cmdline::BootParams::default(), &mut w);
    for x in w {
        eprintln!("mados-persistence: warning: {x}");
    }
    s
}

pub const RUN_DIR: &str = "/run/mados-persistence";

/// A refusal for safety: the program exits with 3.
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Refused(msg.into()).into())
}

/// The persistence filesystem mounted somewhere for a moment.
struct TempMount {
    dir: PathBuf,
    _loop: Option<Loop>,
}

impl TempMount {
    fn new(disk: &Path, block: bool, e: &Existing, readonly: bool) -> Result<TempMount> {
        let real = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
        let node = blockdev::partition_path(&real, e.number);
        if block && let Some(dev) = crate::disk::mountinfo::dev_of(&node) {
            let mi = crate::disk::mountinfo::read();
            if let Some(m) = crate::disk::mountinfo::mounted(&mi, dev).first() {
                return refuse(format!(
                    "{} is mounted at {}; unmount it first (never mounted a second time)",
                    node.display(),
                    m.mountpoint
                ));
            }
        }
        let (via, lp) = if block && blockdev::is_block_device(&node) {
            // held by a device mapper, md or loop user: never reached around
            let name = node.file_name().unwrap_or_default().to_string_lossy();
            let holders: Vec<String> = crate::disk::sysfs::Sysfs::default()
                .list()
                .into_iter()
                .filter(|d| d.name == name)
                .flat_map(|d| d.holders)
                .collect();
            if !holders.is_empty() {
                return refuse(format!(
                    "{} is held by {}; never used a second time",
                    node.display(),
                    holders.join(", ")
                ));
            }
            // the node, or a loop device over the disk when the kernel
            // refuses the node because the whole disk is mounted (the ISO)
            crate::disk::stick::reach_partition(&real, &node, e.start, e.size)?
        } else {
            let lp = Loop::attach(disk, e.start, e.size)?;
            (lp.path.clone(), Some(lp))
        };
        TempMount::on(&via, readonly, lp)
    }

    /// Mount `via` (an unlocked volume's /dev/mapper node, or a partition
    /// already reached) for a moment.
    fn on(via: &Path, readonly: bool, lp: Option<Loop>) -> Result<TempMount> {
        let dir = PathBuf::from(RUN_DIR).join(format!("mnt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // root's only while mounted: the partition's own root is 0755
        // until the next boot makes it 0700
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
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
        .is_some_and(|b| crate::disk::mountinfo::same_device(Path::new(&b.disk), disk));
    (st.mode == "persistent"
        && same_disk
        && p.number == number
        && mounted_targets().contains(&p.mountpoint))
    .then(|| PathBuf::from(&p.mountpoint))
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

/// Where `disk` or any of its partitions is mounted or held, by device
/// number (`disk` may be a by-id link): "/dev/sdb1 at /mnt".
fn in_use(disk: &Path) -> Vec<String> {
    let real = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
    let name = real
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mi = crate::disk::mountinfo::read();
    crate::disk::sysfs::Sysfs::default()
        .list()
        .into_iter()
        .filter(|d| d.name == name || d.parent.as_deref() == Some(name.as_str()))
        .flat_map(|d| {
            let mut v: Vec<String> = crate::disk::mountinfo::mounted(&mi, d.devnum)
                .into_iter()
                .map(|m| format!("{} at {}", d.dev_path().display(), m.mountpoint))
                .collect();
            v.extend(
                d.holders
                    .iter()
                    .map(|h| format!("{} held by {h}", d.dev_path().display())),
            );
            v
        })
        .collect()
}
