//! Block-device ioctls: size, sector size, BLKPG partition add/delete, and
//! loop devices at an offset (to reach a new partition whose node cannot be
//! opened while the whole disk is mounted).

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod ioctls {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, 0x1268, libc_int);
    nix::ioctl_write_ptr_bad!(blkpg, 0x1269, super::BlkpgIoctlArg);
    nix::ioctl_none_bad!(blkflsbuf, 0x1261);
    nix::ioctl_read_bad!(blkroget, 0x125e, libc_int);
    nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
    nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
    nix::ioctl_write_ptr_bad!(loop_set_status64, 0x4C04, super::LoopInfo64);
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    #[allow(non_camel_case_types)]
    pub type libc_int = std::ffi::c_int;
}

#[repr(C)]
pub struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

#[repr(C)]
pub struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
pub struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const BLKPG_ADD_PARTITION: i32 = 1;
const BLKPG_DEL_PARTITION: i32 = 2;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

pub fn is_block_device(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Size in bytes and logical sector size of a block device or image file.
pub fn geometry(f: &File) -> Result<(u64, u64)> {
    let m = f.metadata()?;
    if !m.file_type().is_block_device() {
        return Ok((m.len(), 0));
    }
    let mut size = 0u64;
    let mut ss: std::ffi::c_int = 0;
    unsafe {
        ioctls::blkgetsize64(f.as_raw_fd(), &mut size).context("BLKGETSIZE64")?;
        ioctls::blksszget(f.as_raw_fd(), &mut ss).context("BLKSSZGET")?;
    }
    Ok((size, ss as u64))
}

/// Whether the kernel holds the block device read-only (`BLKROGET`: a
/// write-protected medium, a lock switch, `blockdev --setro`); `false`
/// for a file.
pub fn read_only(f: &File) -> Result<bool> {
    if !f.metadata()?.file_type().is_block_device() {
        return Ok(false);
    }
    let mut ro: std::ffi::c_int = 0;
    unsafe { ioctls::blkroget(f.as_raw_fd(), &mut ro) }.context("BLKROGET")?;
    Ok(ro != 0)
}

/// Write back and drop the device's cached pages. A disk and its partition
/// nodes have separate page caches: what mkfs wrote through `/dev/sda3` is
/// not seen through `/dev/sda` pages read before it.
pub fn flush_buffers(f: &File) -> Result<()> {
    f.sync_all().context("fsync")?;
    if f.metadata()?.file_type().is_block_device() {
        unsafe { ioctls::blkflsbuf(f.as_raw_fd()) }.context("BLKFLSBUF")?;
    }
    Ok(())
}

fn blkpg(f: &File, op: i32, pno: u32, start: u64, len: u64) -> nix::Result<()> {
    let mut part = BlkpgPartition {
        start: start as i64,
        length: len as i64,
        pno: pno as i32,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut part,
    };
    unsafe { ioctls::blkpg(f.as_raw_fd(), &arg) }.map(|_| ())
}

/// Tell the kernel about one new partition (a whole-disk re-read would fail
/// while the ISO on the same disk is mounted).
pub fn add_partition(f: &File, pno: u32, start: u64, len: u64) -> Result<()> {
    blkpg(f, BLKPG_ADD_PARTITION, pno, start, len)
        .with_context(|| format!("BLKPG_ADD_PARTITION {pno} at byte {start}, {len} bytes"))
}

pub fn del_partition(f: &File, pno: u32) -> Result<()> {
    blkpg(f, BLKPG_DEL_PARTITION, pno, 0, 0).with_context(|| format!("BLKPG_DEL_PARTITION {pno}"))
}

/// `/dev/sda` + 3 → `/dev/sda3`; `/dev/loop0` + 3 → `/dev/loop0p3`.
pub fn partition_path(disk: &Path, n: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

pub fn wait_for_node(p: &Path, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if is_block_device(p) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A loop device over `backing` from `offset` for `size` bytes; detached
/// automatically when its last user (a mount) goes away.
pub struct Loop {
    pub path: PathBuf,
    file: File,
}

impl Loop {
    pub fn attach(backing: &Path, offset: u64, size: u64) -> Result<Loop> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .context("opening /dev/loop-control (is the loop module loaded?)")?;
        let back = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .with_context(|| format!("opening {}", backing.display()))?;
        for _ in 0..5 {
            let n = unsafe { ioctls::loop_ctl_get_free(ctl.as_raw_fd()) }
                .context("LOOP_CTL_GET_FREE")?;
            let path = PathBuf::from(format!("/dev/loop{n}"));
            if !wait_for_node(&path, Duration::from_secs(2)) {
                bail!("{} did not appear", path.display());
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            match unsafe { ioctls::loop_set_fd(file.as_raw_fd(), back.as_raw_fd()) } {
                Err(nix::errno::Errno::EBUSY) => continue, // raced with another user
                r => {
                    r.with_context(|| format!("LOOP_SET_FD on {}", path.display()))?;
                }
            }
            let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
            info.lo_offset = offset;
            info.lo_sizelimit = size;
            info.lo_flags = LO_FLAGS_AUTOCLEAR;
            let name = backing.to_string_lossy();
            let n = name.len().min(63);
            info.lo_file_name[..n].copy_from_slice(&name.as_bytes()[..n]);
            if let Err(e) = unsafe { ioctls::loop_set_status64(file.as_raw_fd(), &info) } {
                let _ = unsafe { ioctls::loop_clr_fd(file.as_raw_fd()) };
                return Err(e).context("LOOP_SET_STATUS64");
            }
            return Ok(Loop { path, file });
        }
        bail!("no free loop device")
    }

    /// Detach now (only if nothing mounted it; otherwise autoclear does).
    pub fn detach(self) -> Result<()> {
        unsafe { ioctls::loop_clr_fd(self.file.as_raw_fd()) }
            .with_context(|| format!("LOOP_CLR_FD on {}", self.path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names() {
        assert_eq!(
            partition_path(Path::new("/dev/sda"), 3),
            PathBuf::from("/dev/sda3")
        );
        assert_eq!(
            partition_path(Path::new("/dev/nvme0n1"), 2),
            PathBuf::from("/dev/nvme0n1p2")
        );
        assert_eq!(
            partition_path(Path::new("/dev/mmcblk0"), 1),
            PathBuf::from("/dev/mmcblk0p1")
        );
    }
}
