//! Tier writes seen as they happen, for the idle trigger: a fanotify
//! filesystem mark (`FAN_MODIFY`) on each tier's overlay. A filesystem mark
//! sees writes through every mount of the overlay, also those of processes
//! in other mount namespaces (sandboxed services); `FAN_MODIFY` fires for
//! `write`s and truncations, not for writes through a shared mapping, nor
//! for creations, removals, renames or attribute changes (those need
//! `FAN_REPORT_FID`, which overlayfs supports only from Linux 6.6). The
//! daemon therefore also samples the tier tmpfs' use (bytes and inodes);
//! what neither sees is left to the interval.
//!
//! The daemon drains the queue once a second; an overflowed queue counts as
//! a write. Without fanotify (a kernel without it, no `CAP_SYS_ADMIN`)
//! `new` fails and the daemon samples only.
//!
//! With `track`, each event's file is `fstat`ed (through the event's fd,
//! no path) and its size fed to `health::Written`: the bytes written into
//! RAM that `status` weighs against what reached the stick. The daemon
//! keeps one such watch on the tier overlays and one, for the count
//! only, on the tmpfs dirs.

use anyhow::{Context, Result};
use nix::sys::fanotify::{Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::path::Path;

pub struct Watch {
    fan: Fanotify,
    /// The bytes written, when tracked.
    pub written: Option<super::health::Written>,
    /// Queue overflows seen (writes then not counted).
    pub overflows: u64,
}

impl Watch {
    /// Mark the filesystem mounted at each of `dirs`; with `track`, count
    /// the bytes written (`written`).
    pub fn new(dirs: &[&Path], track: bool) -> Result<Watch> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            super::hot::EVENT_FLAGS,
        )
        .context("fanotify_init")?;
        for d in dirs {
            fan.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                MaskFlags::FAN_MODIFY,
                nix::fcntl::AT_FDCWD,
                Some(*d),
            )
            .with_context(|| format!("fanotify_mark on {}", d.display()))?;
        }
        Ok(Watch {
            fan,
            written: track.then(Default::default),
            overflows: 0,
        })
    }

    /// Whether a write was seen since the last call; drains the queue, at
    /// most `hot::DRAIN_MAX` events a call (each event's file descriptor
    /// is closed as it is dropped): a user writing without pause cannot
    /// hold the daemon's loop here. What is left is read at the next call;
    /// a queue that overflows meanwhile counts as a write.
    pub fn wrote(&mut self) -> bool {
        let mut any = false;
        let mut seen = 0;
        while seen < super::hot::DRAIN_MAX {
            match self.fan.read_events() {
                Ok(ev) if ev.is_empty() => return any,
                Ok(ev) => {
                    seen += ev.len();
                    for e in &ev {
                        if e.mask().contains(MaskFlags::FAN_Q_OVERFLOW) {
                            self.overflows += 1;
                        }
                        any |= e
                            .mask()
                            .intersects(MaskFlags::FAN_MODIFY | MaskFlags::FAN_Q_OVERFLOW);
                        if let (Some(w), Some(fd)) = (self.written.as_mut(), e.fd())
                            && let Some(f) = identity(fd)
                        {
                            w.seen(f);
                        }
                    }
                }
                // EAGAIN: drained; anything else leaves the sampling of
                // the tmpfs use and the interval to see the writes
                Err(nix::errno::Errno::EAGAIN) => return any,
                Err(e) => {
                    log::debug!("fanotify read: {e}");
                    return any;
                }
            }
        }
        // more queued: a write in any case (only FAN_MODIFY is marked)
        true
    }
}

/// A written file as `health::Written` counts it, from `statx` of the
/// event's fd (no path): its identity with its birth time where the
/// filesystem keeps one (tmpfs and ext4 do), so an inode number reused by
/// a new file is a new file; None for anything but a regular file.
fn identity(fd: std::os::fd::BorrowedFd) -> Option<super::health::Seen> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    // SAFETY: statx fills the zeroed struct it is given; an empty path
    // with AT_EMPTY_PATH names the fd itself.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            &mut sx,
        )
    };
    if r != 0 || u32::from(sx.stx_mode) & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let born = if sx.stx_mask & libc::STATX_BTIME != 0 {
        (sx.stx_btime.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(u64::from(sx.stx_btime.tv_nsec))
    } else {
        0
    };
    Some(super::health::Seen {
        dev: (u64::from(sx.stx_dev_major) << 32) | u64::from(sx.stx_dev_minor),
        ino: sx.stx_ino,
        born,
        size: sx.stx_size,
        gone: sx.stx_nlink == 0,
    })
}
