//! Block devices as sysfs shows them: disks, their partitions, and what
//! kind of bus a disk hangs off. Reads a sysfs tree at any root so tests can
//! use a fake one.

use crate::disk::layout::KernelPart;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What the boot medium is, which decides whether persistence is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiskKind {
    Usb,
    Optical,
    /// An ISO file on a loop device (GRUB loopback, Ventoy-like).
    IsoFile {
        backing: String,
    },
    /// ata, nvme, virtio, mmc, scsi: an internal or VM disk.
    Internal {
        bus: String,
    },
    Other,
}

impl DiskKind {
    pub fn describe(&self) -> String {
        match self {
            DiskKind::Usb => "USB disk".into(),
            DiskKind::Optical => "CD/DVD drive".into(),
            DiskKind::IsoFile { backing } => format!("ISO file ({backing})"),
            DiskKind::Internal { bus } => format!("internal or VM disk ({bus})"),
            DiskKind::Other => "other block device".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDev {
    pub name: String,
    /// The whole disk this is a partition of, or None for a disk.
    pub parent: Option<String>,
    pub partition: Option<u32>,
    /// Bytes (sysfs counts in 512-byte units whatever the sector size).
    pub start: u64,
    pub size: u64,
    pub removable: bool,
    pub read_only: bool,
    /// major:minor (sysfs `dev`): the device's identity.
    pub devnum: (u32, u32),
    /// What is stacked on it (sysfs `holders/`: loop, dm, md).
    pub holders: Vec<String>,
}

impl BlockDev {
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
    pub fn disk_name(&self) -> &str {
        self.parent.as_deref().unwrap_or(&self.name)
    }
}

pub struct Sysfs {
    pub root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}
fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}

/// Classify a disk from its canonical sysfs device path (and name).
pub fn classify(name: &str, device_path: &str, loop_backing: Option<String>) -> DiskKind {
    let comps: Vec<&str> = device_path.split('/').collect();
    if name.starts_with("loop") {
        return DiskKind::IsoFile {
            backing: loop_backing.unwrap_or_else(|| "unknown file".into()),
        };
    }
    if name.starts_with("sr") {
        return DiskKind::Optical;
    }
    if comps.iter().any(|c| c.starts_with("usb")) {
        return DiskKind::Usb;
    }
    for (needle, bus) in [
        ("nvme", "nvme"),
        ("mmc", "mmc"),
        ("virtio", "virtio"),
        ("ata", "ata"),
        ("host", "scsi"),
    ] {
        if comps.iter().any(|c| c.starts_with(needle)) {
            return DiskKind::Internal { bus: bus.into() };
        }
    }
    DiskKind::Other
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    /// Every block device: disks and their partitions.
    pub fn list(&self) -> Vec<BlockDev> {
        let dir = self.root.join("class/block");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return vec![];
        };
        let mut out: Vec<BlockDev> = rd
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let p = dir.join(&name);
                let partition = read_u64(&p.join("partition")).map(|n| n as u32);
                let parent = if partition.is_some() {
                    std::fs::canonicalize(&p).ok().and_then(|c| {
                        c.parent()
                            .map(|pp| pp.file_name().unwrap().to_string_lossy().into_owned())
                    })
                } else {
                    None
                };
                let disk = parent.clone().unwrap_or_else(|| name.clone());
                BlockDev {
                    start: read_u64(&p.join("start")).unwrap_or(0) * 512,
                    size: read_u64(&p.join("size")).unwrap_or(0) * 512,
                    removable: read_u64(&self.root.join("block").join(&disk).join("removable"))
                        == Some(1),
                    read_only: read_u64(&p.join("ro")) == Some(1),
                    devnum: read_trim(&p.join("dev"))
                        .and_then(|d| {
                            let (a, b) = d.split_once(':')?;
                            Some((a.parse().ok()?, b.parse().ok()?))
                        })
                        .unwrap_or((0, 0)),
                    holders: std::fs::read_dir(p.join("holders"))
                        .map(|r| {
                            r.flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default(),
                    name,
                    parent,
                    partition,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn kind(&self, disk: &str) -> DiskKind {
        let p = self.root.join("class/block").join(disk);
        let dev = std::fs::canonicalize(&p)
            .or_else(|_| std::fs::read_link(&p))
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let backing = read_trim(&self.root.join("block").join(disk).join("loop/backing_file"));
        classify(disk, &dev, backing)
    }

    pub fn partitions_of(&self, disk: &str) -> Vec<KernelPart> {
        self.list()
            .into_iter()
            .filter(|d| d.parent.as_deref() == Some(disk))
            .map(|d| KernelPart {
                number: d.partition.unwrap_or(0),
                start: d.start,
                size: d.size,
                name: d.name,
            })
            .collect()
    }
}

/// What the kernel counts for a mounted ext4 filesystem
/// (`/sys/fs/ext4/<dev>/`, readable by all): KiB written in its life and
/// since this mount, and its error record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ext4Live {
    pub lifetime_write_kbytes: u64,
    pub session_write_kbytes: Option<u64>,
    pub errors_count: Option<u64>,
    pub first_error_unix_s: Option<u64>,
    pub last_error_unix_s: Option<u64>,
}

/// A device name as sysfs lists it: one plain path component.
fn plain_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains('/') && n.len() < 64
}

/// One small sysfs attribute as text (at most a page, no symlink as the
/// last component).
fn attr(p: &Path) -> Option<String> {
    let b = crate::util::fsutil::read_nofollow(p, 4096).ok()?;
    Some(String::from_utf8_lossy(&b).trim().to_string())
}

/// A sysfs number: decimal, or hex with `0x` (SCSI's `ioerr_cnt`).
pub fn parse_number(t: &str) -> Option<u64> {
    let t = t.trim();
    match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

/// `dev`'s ext4 counters under `sys` (`/sys`); None when it is not a
/// mounted ext4 (or the kernel has no such attribute).
pub fn ext4_live(sys: &Path, dev: &str) -> Option<Ext4Live> {
    if !plain_name(dev) {
        return None;
    }
    let d = sys.join("fs/ext4").join(dev);
    let n = |a: &str| attr(&d.join(a)).and_then(|t| parse_number(&t));
    Some(Ext4Live {
        lifetime_write_kbytes: n("lifetime_write_kbytes")?,
        session_write_kbytes: n("session_write_kbytes"),
        errors_count: n("errors_count"),
        first_error_unix_s: n("first_error_time"),
        last_error_unix_s: n("last_error_time"),
    })
}

/// The sectors (512 bytes) written to a disk since it appeared: the 7th
/// field of `/sys/block/<disk>/stat` (Documentation/block/stat.rst).
pub fn parse_stat_written(t: &str) -> Option<u64> {
    t.split_ascii_whitespace().nth(6)?.parse().ok()
}

/// What a whole disk has written since it appeared (all its partitions)
/// and the I/O errors its SCSI layer counted (`device/ioerr_cnt`: USB
/// sticks are SCSI disks; None where the bus has no such count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskIo {
    pub bytes_written: u64,
    pub io_errors: Option<u64>,
}

pub fn disk_io(sys: &Path, disk: &str) -> Option<DiskIo> {
    if !plain_name(disk) {
        return None;
    }
    let d = sys.join("block").join(disk);
    let sectors = parse_stat_written(&attr(&d.join("stat"))?)?;
    Some(DiskIo {
        bytes_written: sectors.saturating_mul(512),
        io_errors: attr(&d.join("device/ioerr_cnt")).and_then(|t| parse_number(&t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_real_sysfs_paths() {
        let usb = "/sys/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda";
        assert_eq!(classify("sda", usb, None), DiskKind::Usb);
        let cd = "/sys/devices/pci0000:00/0000:00:01.1/ata2/host1/target1:0:0/1:0:0:0/block/sr0";
        assert_eq!(classify("sr0", cd, None), DiskKind::Optical);
        let sata = "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda";
        assert_eq!(
            classify("sda", sata, None),
            DiskKind::Internal { bus: "ata".into() }
        );
        let vd = "/sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vda";
        assert_eq!(
            classify("vda", vd, None),
            DiskKind::Internal {
                bus: "virtio".into()
            }
        );
        let nv = "/sys/devices/pci0000:00/0000:00:06.0/nvme/nvme0/nvme0n1";
        assert_eq!(
            classify("nvme0n1", nv, None),
            DiskKind::Internal { bus: "nvme".into() }
        );
        assert_eq!(
            classify(
                "loop0",
                "/sys/devices/virtual/block/loop0",
                Some("/iso/madOS.iso".into())
            ),
            DiskKind::IsoFile {
                backing: "/iso/madOS.iso".into()
            }
        );
    }

    #[test]
    fn reads_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("mados-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev = root.join("devices/pci0000:00/usb1/1-1/host0/block/sda");
        std::fs::create_dir_all(dev.join("sda1")).unwrap();
        std::fs::create_dir_all(root.join("class/block")).unwrap();
        std::fs::create_dir_all(root.join("block")).unwrap();
        std::fs::write(dev.join("size"), "2097152\n").unwrap();
        std::fs::write(dev.join("removable"), "1\n").unwrap();
        std::fs::write(dev.join("sda1/partition"), "1\n").unwrap();
        std::fs::write(dev.join("sda1/start"), "64\n").unwrap();
        std::fs::write(dev.join("sda1/size"), "6080\n").unwrap();
        std::os::unix::fs::symlink(&dev, root.join("class/block/sda")).unwrap();
        std::os::unix::fs::symlink(dev.join("sda1"), root.join("class/block/sda1")).unwrap();
        std::os::unix::fs::symlink(&dev, root.join("block/sda")).unwrap();
        let s = Sysfs::new(&root);
        let l = s.list();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].size, 1 << 30);
        assert!(l[0].removable && l[1].removable);
        assert_eq!(l[1].parent.as_deref(), Some("sda"));
        assert_eq!(s.kind("sda"), DiskKind::Usb);
        let parts = s.partitions_of("sda");
        assert_eq!(
            parts,
            vec![KernelPart {
                name: "sda1".into(),
                number: 1,
                start: 64 * 512,
                size: 6080 * 512
            }]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn wear_counters_from_a_fake_sysfs() {
        let d = std::env::temp_dir().join(format!("mados-sysfs-wear-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let e = d.join("fs/ext4/sda3");
        std::fs::create_dir_all(&e).unwrap();
        std::fs::write(e.join("lifetime_write_kbytes"), "123456\n").unwrap();
        std::fs::write(e.join("errors_count"), "2\n").unwrap();
        std::fs::write(e.join("last_error_time"), "0x6553f100\n").unwrap();
        let l = ext4_live(&d, "sda3").unwrap();
        assert_eq!(l.lifetime_write_kbytes, 123456);
        assert_eq!(l.errors_count, Some(2));
        assert_eq!(l.last_error_unix_s, Some(0x6553f100));
        assert_eq!(l.session_write_kbytes, None);
        assert_eq!(ext4_live(&d, "../fs/ext4/sda3"), None);
        assert_eq!(ext4_live(&d, "sdb1"), None);
        let b = d.join("block/sda");
        std::fs::create_dir_all(b.join("device")).unwrap();
        std::fs::write(
            b.join("stat"),
            "    1234     5   67890   100   4321   9   8000   300 0 400 500 0 0 0 0 0 0\n",
        )
        .unwrap();
        assert_eq!(
            disk_io(&d, "sda"),
            Some(DiskIo {
                bytes_written: 8000 * 512,
                io_errors: None
            })
        );
        std::fs::write(b.join("device/ioerr_cnt"), "0x1f\n").unwrap();
        assert_eq!(disk_io(&d, "sda").unwrap().io_errors, Some(31));
        // garbage and short lines are no number
        std::fs::write(b.join("stat"), "1 2 3\n").unwrap();
        assert_eq!(disk_io(&d, "sda"), None);
        std::fs::write(b.join("stat"), "1 2 3 4 5 6 -7\n").unwrap();
        assert_eq!(disk_io(&d, "sda"), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
