//! A stick's persistence partition, the operations `boot` and the
//! after-boot commands share: open a device or image and read its layout,
//! find the `persistence` filesystem, reach a partition (or a loop device
//! over the disk), create one (plan, back up, write, announce, format), and
//! remove one (restore the backup or delete the entry).

use crate::disk::blockdev::{self, Loop};
use crate::disk::e2fs;
use crate::disk::layout::{self, Layout};
use crate::disk::partplan::{self, PlanOptions};
use crate::disk::superblock::{self, Fs};
use crate::disk::sysfs::Sysfs;
use crate::disk::table::{self, Backup};
use crate::settings::config::Settings;
use crate::util::fsutil;
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

fn random_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut g);
    }
    g[7] = (g[7] & 0x0F) | 0x40; // version 4, as stored (mixed-endian time_hi)
    g[8] = (g[8] & 0x3F) | 0x80;
    g
}

/// Open a partition for use. While the whole disk is mounted (some
/// initramfs mount the ISO from /dev/sda, not /dev/sda1) the kernel refuses
/// the partition node with EBUSY: then a loop device over the disk at the
/// partition's offset reaches the same bytes.
pub fn reach_partition(
    disk: &Path,
    node: &Path,
    start: u64,
    size: u64,
) -> Result<(PathBuf, Option<Loop>)> {
    if blockdev::wait_for_node(node, Duration::from_secs(5)) {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(node)
        {
            Ok(_) => return Ok((node.to_path_buf(), None)),
            Err(e) => log::warn!(
                "{} cannot be opened exclusively ({e}); using a loop device over {}",
                node.display(),
                disk.display()
            ),
        }
    } else {
        log::warn!(
            "{} did not appear; using a loop device over {}",
            node.display(),
            disk.display()
        );
    }
    let lp = Loop::attach(disk, start, size).with_context(|| {
        format!(
            "setting up a loop device over {} at byte {start}",
            disk.display()
        )
    })?;
    log::info!("reaching the partition through {}", lp.path.display());
    Ok((lp.path.clone(), Some(lp)))
}

pub struct Created {
    pub node: PathBuf,
    pub target: PathBuf,
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub backup: table::Backup,
    pub _loop: Option<Loop>,
}

fn disk_name(disk: &Path) -> String {
    disk.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Plan, back up, write, announce, format. Restores the table on failure.
pub fn create_partition(disk: &Path, s: &Settings, backup_dir: &Path) -> Result<Created> {
    let o = crate::disk::stick::open_device(disk, true)?;
    let size = o.layout.size;
    let (l, mut f) = (o.layout, o.file);
    for finding in &l.findings {
        log::info!("layout: {finding}");
    }
    let opts = PlanOptions {
        min_free: s.min_free,
        max_size: s.max_size.map(|m| m.resolve(u64::MAX)),
        guid: random_guid(),
        name: s.label.clone(),
        ..Default::default()
    };
    let plan = partplan::plan(&l, &opts).map_err(|r| anyhow!(r))?;
    log::info!(
        "creating partition {} ({:?} table) at byte {} size {}",
        plan.number,
        plan.table,
        plan.start,
        crate::settings::size::human(plan.size)
    );
    let backup = table::take_backup(&mut f, &disk.display().to_string(), size, &plan.writes)?;
    fsutil::write_atomic(
        &backup_dir.join("table-backup.json"),
        serde_json::to_string_pretty(&backup)?.as_bytes(),
    )?;
    let restore = |f: &mut File, why: &anyhow::Error| {
        log::error!("{why:#}; restoring the partition table");
        if let Err(e) = table::restore(f, &backup).and_then(|_| blockdev::flush_buffers(f)) {
            log::error!(
                "restoring the partition table of {} failed: {e:#}",
                disk.display()
            );
        }
    };
    let node = blockdev::partition_path(disk, plan.number);
    let made = (|| -> Result<(PathBuf, Option<Loop>)> {
        table::apply(&mut f, &plan.writes)?;
        blockdev::flush_buffers(&f)?;
        if blockdev::is_block_device(disk) {
            if let Err(e) = blockdev::add_partition(&f, plan.number, plan.start, plan.size) {
                // The kernel may already know it (a re-read raced us): fine
                // only if it is exactly the partition we planned.
                let known = l
                    .kernel
                    .iter()
                    .chain(&Sysfs::default().partitions_of(&disk_name(disk)))
                    .any(|k| {
                        k.number == plan.number && k.start == plan.start && k.size == plan.size
                    });
                if !known {
                    return Err(e);
                }
                log::info!("the kernel already knows partition {}", plan.number);
            }
            reach_partition(disk, &node, plan.start, plan.size)
        } else {
            let lp = Loop::attach(disk, plan.start, plan.size)?;
            Ok((lp.path.clone(), Some(lp)))
        }
    })();
    let (target, lp) = match made {
        Ok(x) => x,
        Err(e) => {
            restore(&mut f, &e);
            let _ = blockdev::del_partition(&f, plan.number);
            return Err(e);
        }
    };
    if let Err(e) = e2fs::mkfs(&target, &s.label) {
        restore(&mut f, &e);
        if let Some(lp) = lp {
            let _ = lp.detach();
        }
        let _ = blockdev::del_partition(&f, plan.number);
        return Err(e);
    }
    Ok(Created {
        node,
        target,
        number: plan.number,
        start: plan.start,
        size: plan.size,
        backup,
        _loop: lp,
    })
}
