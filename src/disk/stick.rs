//! A stick's persistence partition, the operations `boot` and the
//! after-boot commands share: open a device or image and read its layout,
//! find the `persistence` filesystem, reach a partition (or a loop device
//! over the disk), create one (plan, back up, write, announce, format), and
//! remove one (restore the backup or delete the entry).

use crate::disk::blockdev::{self, Loop};
use crate::disk::claim::{CLAIM_LEN, Claim, FS_RESERVE};
use crate::disk::cryptsetup::{self, Pbkdf, Secret};
use crate::disk::e2fs;
use crate::disk::layout::{self, Layout};
use crate::disk::luks;
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
    if block && let Err(e) = blockdev::flush_buffers(&file) {
        // read what is on the disk, not pages cached before a partition
        // node wrote to it (unprivileged: nothing to drop, reads are fresh)
        log::debug!("dropping the cached pages of {}: {e:#}", path.display());
    }
    let kernel = if block {
        // the kernel's name (a by-id link's file name is not it)
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Sysfs::default().partitions_of(&real.file_name().unwrap_or_default().to_string_lossy())
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
    // tables read differently by the kernel and by partitioning tools are
    // not used (`prepare` refuses them with both readings)
    if o.layout.disagreement.is_some() {
        return None;
    }
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

/// The LUKS2 volume labelled `label` among the table's entries (found
/// by its header, without unlocking it).
pub fn find_encrypted(o: &mut Opened, label: &str) -> Option<Existing> {
    if o.layout.disagreement.is_some() {
        return None;
    }
    o.layout
        .table_entries()
        .into_iter()
        .find_map(|(number, start, size)| {
            let h = luks_at(&mut o.file, start, size)?;
            (h.label == label).then_some(Existing {
                number,
                start,
                size,
                uuid: h.uuid,
            })
        })
}

/// A LUKS2 header (either copy) at the start of the partition at `start`.
fn luks_at(f: &mut File, start: u64, size: u64) -> Option<luks::Luks2Header> {
    let mut w = superblock::Window::new(f, start, size);
    luks::probe(&mut w).ok().flatten()
}

/// What `execute` makes inside a new partition when persistence is to be
/// encrypted: LUKS2 at this cost, the passphrase given once (already
/// entered twice where it is typed).
pub struct Encrypt {
    pub passphrase: Secret,
    pub pbkdf: Pbkdf,
    /// The device-mapper name the new volume is opened under while the
    /// filesystem is made.
    pub mapper: String,
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
    let disk = &std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
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
    // the backup kept on the filesystem, else the one in the claim (the
    // filesystem may no longer mount)
    let dev_name = disk.display().to_string();
    let claim = read_claim(&mut o.file, start, o.layout.size, &dev_name)
        .filter(|c| (c.number, c.start, c.size) == (number, start, size));
    let usable = backup
        .or(claim.as_ref().map(|c| &c.backup))
        .filter(|b| b.device_size == o.layout.size);
    let how = match usable {
        Some(b) if table::unchanged_since(&mut o.file, b)? => {
            table::restore(&mut o.file, b, &mut sync_dev)?;
            "partition table restored from the backup saved at creation"
        }
        _ => {
            let writes = partplan::plan_delete(&o.layout, number).map_err(anyhow::Error::msg)?;
            table::apply_synced(&mut o.file, &writes, &mut sync_dev)?;
            "its table entry deleted"
        }
    };
    // wipe the superblock area so the label is gone for good; on an
    // encrypted one the whole LUKS2 header area (both header copies and
    // every key slot): the volume key is gone, nobody decrypts the data
    let luks = luks_at(&mut o.file, start, size).is_some();
    let wipe_len = if luks {
        size.min(cryptsetup::HEADER_AREA)
    } else {
        size.min(1 << 20)
    };
    let wipe = vec![0u8; 1 << 20];
    std::io::Seek::seek(&mut o.file, std::io::SeekFrom::Start(start))?;
    let mut done = 0;
    while done < wipe_len {
        let n = (wipe_len - done).min(wipe.len() as u64) as usize;
        std::io::Write::write_all(&mut o.file, &wipe[..n])
            .context("wiping the partition's start")?;
        done += n as u64;
    }
    if claim.is_some() {
        let at = Claim::offset_for(start).context("claim offset")?;
        std::io::Seek::seek(&mut o.file, std::io::SeekFrom::Start(at))?;
        std::io::Write::write_all(&mut o.file, &vec![0u8; CLAIM_LEN as usize])
            .context("wiping the claim")?;
    }
    // its end copy, in the partition's last MiB
    if let Some(c) = read_end_claim(&mut o.file, o.layout.size, o.layout.sector_size, &dev_name)
        .filter(|c| (c.number, c.start, c.size) == (number, start, size))
        && let Some(at) = c.end_offset()
    {
        std::io::Seek::seek(&mut o.file, std::io::SeekFrom::Start(at))?;
        std::io::Write::write_all(&mut o.file, &vec![0u8; CLAIM_LEN as usize])
            .context("wiping the claim's end copy")?;
    }
    blockdev::flush_buffers(&o.file)?;
    if o.block
        && let Err(e) = blockdev::del_partition(&o.file, number)
    {
        log::warn!("the kernel keeps partition {number} until the next boot: {e:#}");
    }
    Ok(if luks {
        format!(
            "{how}; its LUKS2 headers and every key slot wiped: the data can no longer be decrypted, \
             by anyone"
        )
    } else {
        how.into()
    })
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

/// Reach a partition on a write-protected disk: its node opened read-only
/// and exclusively (nothing else has it); no loop device (it would be
/// opened for writing).
pub fn reach_partition_read_only(node: &Path) -> Result<PathBuf> {
    anyhow::ensure!(
        blockdev::wait_for_node(node, Duration::from_secs(5)),
        "{} did not appear",
        node.display()
    );
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(node)
        .with_context(|| format!("opening {} read-only and exclusively", node.display()))?;
    Ok(node.to_path_buf())
}

/// How the partition `create_partition` returns came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Planned, claimed, written and formatted now.
    Created,
    /// Ours from an earlier boot that a power cut interrupted (found by
    /// its claim): the table write finished and formatted now.
    Resumed,
    /// A `persistence` filesystem found in the free space (a stick
    /// re-flashed with another release): its entry put back, no mkfs.
    Adopted,
}

pub struct Created {
    pub node: PathBuf,
    /// The partition as reached (its node or a loop device over the disk);
    /// `target` is the same unless it is encrypted.
    pub part: PathBuf,
    pub target: PathBuf,
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub backup: table::Backup,
    pub origin: Origin,
    /// The unlocked volume (`target` is its /dev/mapper node), closed
    /// when dropped.
    pub mapping: Option<cryptsetup::Mapping>,
    pub _loop: Option<Loop>,
}

fn disk_name(disk: &Path) -> String {
    disk.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// How far past the planned start `create_partition` looks for a
/// `persistence` filesystem left by an earlier release that has no claim
/// copy at its end: one 1 KiB read a MiB, so 1024 reads, about 2.6 s on a
/// stick doing 400 IOPS (measured in bench/README.md). Filesystems we made
/// are found from the device's end first, however far away.
pub const ADOPT_WINDOW: u64 = 1 << 30;

/// The plan options `boot`, `enable` and `plan` share.
pub fn plan_options(s: &Settings, guid: [u8; 16]) -> PlanOptions {
    PlanOptions {
        min_free: s.min_free,
        max_size: s.max_size.map(|m| m.resolve(u64::MAX)),
        guid,
        name: s.label.clone(),
        reserve: CLAIM_LEN,
        ..Default::default()
    }
}

fn sync_dev(f: &mut File) -> Result<()> {
    f.sync_all().context("syncing the device")
}

/// The claim in front of a partition starting at `start`, if intact and
/// its regions lie in the table areas of a device of `size` bytes.
fn read_claim(f: &mut File, start: u64, size: u64, device: &str) -> Option<Claim> {
    read_claim_at(f, Claim::offset_for(start)?, size, device)
}

/// The claim's copy at the end of the partition it names, found from the
/// device's end (`Claim::end_candidates`): it must name a partition that
/// ends right after it.
fn read_end_claim(f: &mut File, size: u64, sector: u64, device: &str) -> Option<Claim> {
    Claim::end_candidates(size, sector)
        .into_iter()
        .find_map(|at| read_claim_at(f, at, size, device).filter(|c| c.end_offset() == Some(at)))
}

/// Write the claim's second copy in the partition's last MiB, only where
/// the filesystem leaves that MiB out (one made before the copy existed,
/// or sized by its superblock, may not).
fn write_end_claim(f: &mut File, c: &Claim, label: &str) -> Result<()> {
    let Some(at) = c.end_offset() else {
        return Ok(());
    };
    // an encrypted one we made: its filesystem leaves the volume's last
    // MiB out, which is the partition's last MiB (unused ciphertext)
    let encrypted = luks_at(f, c.start, c.size).is_some_and(|h| h.label == label);
    if !encrypted {
        let Some(fs) = persistence_at(f, c.start, c.size, label) else {
            return Ok(());
        };
        let fs_end = fs
            .blocks
            .checked_mul(fs.block_size)
            .and_then(|b| b.checked_add(c.start));
        if fs_end.is_none_or(|e| e > at) {
            log::info!("the filesystem fills its partition: no room for the claim's end copy");
            return Ok(());
        }
    }
    let bytes = c.encode().map_err(|e| anyhow!("encoding the claim: {e}"))?;
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&bytes)
        .context("writing the claim's end copy")?;
    sync_dev(f)
}

fn read_claim_at(f: &mut File, at: u64, size: u64, device: &str) -> Option<Claim> {
    let head = layout::read_exact_at(f, at, 16).ok()?;
    if !Claim::looks_like(&head) {
        return None;
    }
    let b = layout::read_exact_at(f, at, CLAIM_LEN as usize).ok()?;
    let c = Claim::decode(&b, device)?;
    if !c.regions_safe(size) {
        log::warn!("ignoring the claim at byte {at}: its regions lie outside the table areas");
        return None;
    }
    Some(c)
}

/// The ext4 filesystem labelled `label` starting at byte `start`, if any
/// (its primary superblock: a backup copy further into a filesystem whose
/// start was wiped does not count). One read of the superblock only.
fn persistence_at(
    f: &mut File,
    start: u64,
    size: u64,
    label: &str,
) -> Option<superblock::Ext4Info> {
    if size < 2048 {
        return None;
    }
    let sb = layout::read_exact_at(f, start.checked_add(1024)?, 1024).ok()?;
    superblock::parse_ext4(&sb).filter(|e| e.label == label && e.group == 0)
}

/// A table entry whose claim names it exactly and that holds no
/// `persistence` filesystem yet: a creation a power cut interrupted.
fn unfinished(o: &mut Opened, label: &str, device: &str) -> Option<Claim> {
    for (number, start, size) in o.layout.table_entries() {
        if let Some(c) = read_claim(&mut o.file, start, o.layout.size, device)
            && (c.number, c.start, c.size) == (number, start, size)
            && persistence_at(&mut o.file, start, size, label).is_none()
            // an unlabelled LUKS2 header: our encrypted creation, cut
            // before its last step (`cryptsetup::label_args`)
            && luks_at(&mut o.file, start, size).is_none_or(|h| h.label != label)
        {
            return Some(c);
        }
    }
    None
}

/// The partition at `start` holds an encrypted persistence (a LUKS2 volume
/// labelled `label`): after an adoption, it is unlocked, not checked as
/// ext4.
pub fn encrypted_at(o: &mut Opened, start: u64, size: u64, label: &str) -> bool {
    luks_at(&mut o.file, start, size).is_some_and(|h| h.label == label)
}

/// Our creation a cut interrupted, and it was an encrypted one: its
/// partition already holds an (unlabelled) LUKS2 header. It is finished
/// encrypted, never as a clear one.
pub fn unfinished_encrypted(o: &mut Opened, label: &str) -> bool {
    let device = o.path.display().to_string();
    unfinished(o, label, &device).is_some_and(|c| luks_at(&mut o.file, c.start, c.size).is_some())
}

/// The first `persistence` filesystem in `[from, to)` at a MiB boundary:
/// where an earlier release's partition starts after a `dd` of this one.
/// Its size comes from its claim when that names it, else from the
/// superblock.
fn left_behind(
    f: &mut File,
    from: u64,
    to: u64,
    dev_size: u64,
    label: &str,
    device: &str,
) -> Option<(u64, u64)> {
    let mut at = from;
    while at < to {
        if let Some(e) = persistence_at(f, at, to - at, label) {
            let size = match read_claim(f, at, dev_size, device) {
                Some(c) if c.start == at => c.size,
                _ => e.blocks.checked_mul(e.block_size)?,
            };
            return Some((at, size));
        }
        at = at.checked_add(crate::settings::size::MIB)?;
    }
    None
}

/// A table entry that our claim names, whatever it holds now (for `remove`
/// when the filesystem's superblock is gone).
pub fn find_claimed(o: &mut Opened) -> Option<Existing> {
    let device = o.path.display().to_string();
    o.layout
        .table_entries()
        .into_iter()
        .find_map(|(number, start, size)| {
            let c = read_claim(&mut o.file, start, o.layout.size, &device)?;
            ((c.number, c.start, c.size) == (number, start, size)).then(|| Existing {
                number,
                start,
                size,
                uuid: String::new(),
            })
        })
}

/// What `create_partition` will do on a stick, decided from what it
/// holds (reads only). `enable` shows it before asking.
pub enum Prepared {
    /// Our own creation a power cut interrupted: replay its table writes
    /// (from the claim) and format.
    Resume(Claim),
    /// A `persistence` filesystem left in the free space by an earlier
    /// release: write this entry for it, never format.
    Adopt(partplan::PartPlan),
    /// A new partition.
    Create(partplan::PartPlan),
}

impl Prepared {
    /// (number, start, size) of the partition it ends with.
    pub fn partition(&self) -> (u32, u64, u64) {
        match self {
            Prepared::Resume(c) => (c.number, c.start, c.size),
            Prepared::Adopt(p) | Prepared::Create(p) => (p.number, p.start, p.size),
        }
    }
    pub fn origin(&self) -> Origin {
        match self {
            Prepared::Resume(_) => Origin::Resumed,
            Prepared::Adopt(_) => Origin::Adopted,
            Prepared::Create(_) => Origin::Created,
        }
    }
}

/// Decide, in this order:
/// 1. finish our own creation that a power cut interrupted (its claim
///    names a table entry with no filesystem yet, and every table sector
///    holds its bytes from before or after that creation);
/// 2. put back the entry of a `persistence` filesystem found in the free
///    space (a re-flashed stick), refusing when it does not fit;
/// 3. else a new partition in all the room there is.
pub fn prepare(o: &mut Opened, s: &Settings) -> Result<Prepared> {
    let dev_name = o.path.display().to_string();
    if let Some(c) = unfinished(o, &s.label, &dev_name) {
        if !table::torn_between(&mut o.file, &c.backup, o.layout.sector_size)? {
            return Err(partplan::Refusal::TableChanged { number: c.number }.into());
        }
        return Ok(Prepared::Resume(c));
    }
    // only our own interrupted creation may leave tables that the kernel
    // and libfdisk read differently; anything else is refused
    if let Some(why) = &o.layout.disagreement {
        return Err(layout::Invalid(why.clone()).into());
    }
    let opts = plan_options(s, random_guid());
    let planned = partplan::plan(&o.layout, &opts).map_err(|r| anyhow!(r))?;
    // our filesystem from before a re-flash, found by the claim's copy at
    // the device's end however far after the new image it starts
    if let Some(c) = read_end_claim(&mut o.file, o.layout.size, o.layout.sector_size, &dev_name) {
        // a clear filesystem, or an encrypted volume labelled so (made by
        // us: its label is its last write)
        if persistence_at(&mut o.file, c.start, c.size, &s.label).is_some()
            || luks_at(&mut o.file, c.start, c.size).is_some_and(|h| h.label == s.label)
        {
            let p = partplan::plan_at(&o.layout, &opts, c.start, c.size).with_context(|| {
                format!(
                    "a '{}' filesystem lies at byte {} ({}) but does not fit where a partition may go; \
                     refusing to create a partition over it",
                    s.label,
                    c.start,
                    crate::settings::size::human(c.size)
                )
            })?;
            return Ok(Prepared::Adopt(p));
        }
        log::warn!(
            "the record at the device's end names a '{}' partition at byte {} ({}) whose filesystem is no \
             longer intact (overwritten by a larger image?); it is not adopted",
            s.label,
            c.start,
            crate::settings::size::human(c.size)
        );
    }
    let window_end = planned
        .start
        .saturating_add(ADOPT_WINDOW)
        .min(planned.start + planned.size);
    let size = o.layout.size;
    match left_behind(
        &mut o.file,
        planned.start,
        window_end,
        size,
        &s.label,
        &dev_name,
    ) {
        Some((start, len)) => {
            let p = partplan::plan_at(&o.layout, &opts, start, len).with_context(|| {
                format!(
                    "a '{}' filesystem lies at byte {start} ({}) but does not fit where a partition may go; \
                     refusing to create a partition over it",
                    s.label,
                    crate::settings::size::human(len)
                )
            })?;
            Ok(Prepared::Adopt(p))
        }
        None => Ok(Prepared::Create(planned)),
    }
}

/// Test hook for cuts: with `MADOS_PERSISTENCE_CUT=<point>` the process
/// aborts at that point of a creation, leaving the stick as a power cut
/// there would (the QEMU scenarios cut real power; this makes every point
/// reachable in a root test). With `MADOS_PERSISTENCE_CUT_HANG` set too it
/// stops there instead, for a QEMU scenario to cut the power at that
/// instant (nothing after it is written, not even by an exit).
pub fn cut_point(point: &str) {
    if std::env::var("MADOS_PERSISTENCE_CUT").is_ok_and(|v| v == point) {
        if std::env::var_os("MADOS_PERSISTENCE_CUT_HANG").is_some() {
            log::error!("MADOS_PERSISTENCE_CUT={point}: stopped here, waiting for the power cut");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        log::error!("MADOS_PERSISTENCE_CUT={point}: stopping here");
        std::process::abort();
    }
}

/// Make the persistence partition on `disk`: `prepare`, then `execute`.
pub fn create_partition(disk: &Path, s: &Settings, backup_dir: &Path) -> Result<Created> {
    create_partition_with(disk, s, backup_dir, None)
}

/// `create_partition`, encrypted when `enc` says so: a new partition, or
/// one whose creation a cut interrupted (it holds nothing yet); never over
/// a clear filesystem found to adopt.
pub fn create_partition_with(
    disk: &Path,
    s: &Settings,
    backup_dir: &Path,
    enc: Option<&Encrypt>,
) -> Result<Created> {
    let mut o = open_device(disk, true)?;
    for finding in &o.layout.findings {
        log::info!("layout: {finding}");
    }
    let p = prepare(&mut o, s)?;
    if enc.is_some() && p.origin() == Origin::Adopted {
        bail!(
            "a clear '{}' filesystem from an earlier release lies at byte {}: it is not encrypted over \
             (its data would be lost); refusing",
            s.label,
            p.partition().1
        );
    }
    execute(o, disk, s, p, backup_dir, enc)
}

/// Carry out what `prepare` decided. A new partition: the claim (table
/// backup and journal) is written in front of it and synced first, then
/// the table sector by sector with a sync after each, then the kernel is
/// told and mkfs runs. On a failure before mkfs the table is restored.
pub fn execute(
    mut o: Opened,
    disk: &Path,
    s: &Settings,
    p: Prepared,
    backup_dir: &Path,
    enc: Option<&Encrypt>,
) -> Result<Created> {
    // /dev/disk/by-id/usb-… → /dev/sdb: partition nodes and sysfs go by it
    let disk = &std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
    let dev_name = disk.display().to_string();
    let origin = p.origin();
    let plan = match p {
        Prepared::Resume(c) => {
            log::warn!(
                "partition {} at byte {} was started by an earlier run and not finished (power cut?); finishing it",
                c.number,
                c.start
            );
            table::replay(&mut o.file, &c.backup, &mut sync_dev)?;
            return finish(o, disk, s, c.number, c.start, c.size, c.backup, origin, enc);
        }
        Prepared::Adopt(plan) => {
            log::warn!(
                "a '{}' filesystem from an earlier release is at byte {} ({}): putting its entry back, not formatting",
                s.label,
                plan.start,
                crate::settings::size::human(plan.size)
            );
            plan
        }
        Prepared::Create(plan) => plan,
    };
    log::info!(
        "{} partition {} ({:?} table) at byte {} size {}",
        if origin == Origin::Adopted {
            "restoring"
        } else {
            "creating"
        },
        plan.number,
        plan.table,
        plan.start,
        crate::settings::size::human(plan.size)
    );
    let backup = table::take_backup(&mut o.file, &dev_name, o.layout.size, &plan.writes)?;
    fsutil::write_atomic(
        &backup_dir.join("table-backup.json"),
        serde_json::to_string_pretty(&backup)?.as_bytes(),
    )?;
    if origin == Origin::Created {
        // The claim first: from here on a cut leaves a partition that the
        // next run recognises as ours.
        let claim = Claim {
            number: plan.number,
            start: plan.start,
            size: plan.size,
            backup: backup.clone(),
        };
        let bytes = claim
            .encode()
            .map_err(|e| anyhow!("encoding the claim: {e}"))?;
        let at = Claim::offset_for(plan.start).context("no room for the claim")?;
        use std::io::{Seek, SeekFrom, Write};
        o.file.seek(SeekFrom::Start(at))?;
        o.file.write_all(&bytes).context("writing the claim")?;
        sync_dev(&mut o.file)?;
        cut_point("claim");
    }
    let mut n = 0;
    let mut sync_and_cut = |f: &mut File| {
        sync_dev(f)?;
        n += 1;
        cut_point(&format!("table-{n}"));
        Ok(())
    };
    if let Err(e) = table::apply_synced(&mut o.file, &plan.writes, &mut sync_and_cut) {
        restore_table(&mut o.file, &backup, disk, &e);
        return Err(e);
    }
    finish(
        o,
        disk,
        s,
        plan.number,
        plan.start,
        plan.size,
        backup,
        origin,
        enc,
    )
}

/// A LUKS volume this run made, its creation failed: its header area
/// zeroed (only ever called after our own luksFormat).
fn wipe_made(part: &Path) {
    if let Err(e) = cryptsetup::wipe_new_header(part) {
        log::error!("{e:#}");
    }
}

fn restore_table(f: &mut File, backup: &table::Backup, disk: &Path, why: &anyhow::Error) {
    log::error!("{why:#}; restoring the partition table");
    if let Err(e) =
        table::restore(f, backup, &mut sync_dev).and_then(|_| blockdev::flush_buffers(f))
    {
        log::error!(
            "restoring the partition table of {} failed: {e:#}",
            disk.display()
        );
    }
}

/// The table holds the entry: tell the kernel, reach the partition, and
/// format it unless it was adopted. Never formats a `persistence`
/// filesystem.
#[allow(clippy::too_many_arguments)]
fn finish(
    mut o: Opened,
    disk: &Path,
    s: &Settings,
    number: u32,
    start: u64,
    size: u64,
    backup: table::Backup,
    origin: Origin,
    enc: Option<&Encrypt>,
) -> Result<Created> {
    let f = &mut o.file;
    let node = blockdev::partition_path(disk, number);
    let made = (|| -> Result<(PathBuf, Option<Loop>)> {
        blockdev::flush_buffers(f)?;
        if blockdev::is_block_device(disk) {
            if let Err(e) = blockdev::add_partition(f, number, start, size) {
                // The kernel may already know it (a re-read raced us, or an
                // earlier boot's table): fine only if it is exactly this one.
                let known = o
                    .layout
                    .kernel
                    .iter()
                    .chain(&Sysfs::default().partitions_of(&disk_name(disk)))
                    .any(|k| k.number == number && k.start == start && k.size == size);
                if !known {
                    return Err(e);
                }
                log::info!("the kernel already knows partition {number}");
            }
            reach_partition(disk, &node, start, size)
        } else {
            let lp = Loop::attach(disk, start, size)?;
            Ok((lp.path.clone(), Some(lp)))
        }
    })();
    let undo = |f: &mut File, e: &anyhow::Error| {
        if origin != Origin::Resumed {
            restore_table(f, &backup, disk, e);
            let _ = blockdev::del_partition(f, number);
        }
    };
    let (target, lp) = match made {
        Ok(x) => x,
        Err(e) => {
            undo(f, &e);
            return Err(e);
        }
    };
    let mut mapping = None;
    let part = target.clone();
    let mut target = target;
    if origin != Origin::Adopted {
        // the last guard: mke2fs never runs over a persistence filesystem,
        // nor luksFormat over any LUKS volume
        if persistence_at(f, start, size, &s.label).is_some() {
            bail!(
                "partition {number} at byte {start} already holds a '{}' filesystem: not formatting it",
                s.label
            );
        }
        if let Some(h) = luks_at(f, start, size)
            && (h.label == s.label || origin != Origin::Resumed)
        {
            bail!(
                "partition {number} at byte {start} already holds a LUKS2 volume labelled '{}': not formatting it",
                h.label
            );
        }
        let mut fs_size = size.saturating_sub(FS_RESERVE);
        if let Some(enc) = enc {
            cut_point("luks");
            log::info!(
                "making {} a LUKS2 volume (argon2id, {} KiB, {} passes)",
                target.display(),
                enc.pbkdf.memory_kib,
                enc.pbkdf.iterations
            );
            let opened = cryptsetup::format(&target, &enc.passphrase, &enc.pbkdf)
                .and_then(|_| cryptsetup::Mapping::open(&target, &enc.mapper, &enc.passphrase));
            match opened {
                Ok(m) => {
                    // the volume's data ends where the partition does: the
                    // filesystem leaves the same last MiB out
                    let data = std::fs::File::open(&m.path)
                        .map_err(anyhow::Error::from)
                        .and_then(|f| blockdev::geometry(&f))
                        .map(|(bytes, _)| bytes);
                    match data {
                        Ok(bytes) => fs_size = bytes.saturating_sub(FS_RESERVE),
                        Err(e) => {
                            drop(m);
                            wipe_made(&part);
                            undo(f, &e);
                            if let Some(lp) = lp {
                                let _ = lp.detach();
                            }
                            return Err(e);
                        }
                    }
                    target = m.path.clone();
                    mapping = Some(m);
                }
                Err(e) => {
                    wipe_made(&part);
                    undo(f, &e);
                    if let Some(lp) = lp {
                        let _ = lp.detach();
                    }
                    return Err(e);
                }
            }
        }
        cut_point("mkfs");
        log::info!(
            "formatting {} with mke2fs ({}); this takes a while on a slow stick",
            target.display(),
            crate::settings::size::human(size)
        );
        // the partition's last MiB stays out of the filesystem: the
        // claim's end copy goes there
        if let Err(e) = e2fs::mkfs(&target, &s.label, fs_size) {
            if mapping.take().is_some() {
                wipe_made(&part);
            }
            undo(f, &e);
            if let Some(lp) = lp {
                let _ = lp.detach();
            }
            return Err(e);
        }
        // an encrypted one is labelled last: from here on it is found as
        // finished (a cut before leaves it to be formatted again)
        if mapping.is_some() {
            let labelled = std::fs::File::open(&target)
                .and_then(|m| m.sync_all())
                .map_err(anyhow::Error::from)
                .and_then(|_| {
                    cut_point("label");
                    cryptsetup::set_label(&part)
                });
            if let Err(e) = labelled {
                mapping.take();
                wipe_made(&part);
                undo(f, &e);
                return Err(e);
            }
        }
        // the disk's pages read before mkfs (the claim, the scan for a
        // left-behind filesystem) are stale now
        blockdev::flush_buffers(f)?;
    }
    // the claim's end copy (a cut before it leaves the front claim, and the
    // scan after the image, to find this filesystem after a re-flash)
    let c = Claim {
        number,
        start,
        size,
        backup: backup.clone(),
    };
    if let Err(e) = write_end_claim(f, &c, &s.label) {
        log::warn!("{e:#}");
    }
    Ok(Created {
        node,
        part,
        target,
        number,
        start,
        size,
        backup,
        origin,
        mapping,
        _loop: lp,
    })
}
