//! Writes into RAM seen as they happen: for the tiers' idle trigger, and
//! (with `track`) the bytes written for `status`'s health.
//!
//! A fanotify filesystem mark (`FAN_MODIFY`) on each watched filesystem,
//! drained once a second. `FAN_MODIFY` fires for `write`s and truncations,
//! not for writes through a shared mapping, nor for creations, removals,
//! renames or attribute changes; the daemon therefore also samples the
//! tier tmpfs' use (bytes and inodes); what neither sees is left to the
//! interval. An overflowed queue counts as a write.
//!
//! Two kinds of group, the first that the kernel takes:
//! - **By file handle** (`Watch::by_handle`, `FAN_REPORT_FID`): an event
//!   names its file by handle and holds nothing. The tiers' writes are
//!   watched on the tier tmpfs (the RAM uppers: a write through the
//!   overlay is a write to its upper file, and fanotify reports it there),
//!   the tmpfs dirs on themselves (the tier tmpfs only from Linux 6.5,
//!   `upper_sees_overlay_writes`: before, overlayfs hid its writes to the
//!   upper from fanotify). Each marked dir is checked to be a tmpfs mount
//!   point at the top of its stack, opened without following a symlink
//!   and held open. With `track`, each event's file is opened by its
//!   handle on that dir (`open_by_handle_at`, `O_PATH`: nothing of the
//!   file is opened, a FIFO's or a device's open never runs) and
//!   `statx`ed. A file removed before the drain cannot be opened any more:
//!   its bytes are not counted (the count is a lower bound). Needs a
//!   filesystem with an fsid and file handles: tmpfs has both (seen on
//!   6.1 and 6.18); an overlay's filesystem mark by handle is refused.
//! - **By file descriptor** (`Watch::new`): each event carries an open fd
//!   of its file, `statx`ed with `track`. The event holds its file until
//!   it is read: a file written and removed keeps its RAM until the drain
//!   (a second, a few under a writer that outruns `hot::DRAIN_MAX`), and
//!   a write that needs that room fails with ENOSPC in a full tmpfs or
//!   tier meanwhile (`tests/root_health.rs` shows it). Only for the tiers
//!   on kernels before 6.5, on the tier overlays themselves; the tmpfs
//!   dirs are watched by handle or not at all (their bytes then not
//!   counted).
//!
//! Without fanotify (a kernel without it, no `CAP_SYS_ADMIN`) both fail
//! and the daemon samples only.

use anyhow::{Context, Result};
use nix::sys::fanotify::{Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

pub struct Watch {
    fan: Fanotify,
    /// By handle: each marked filesystem's fsid and its marked dir, held
    /// open to open the events' handles on; None: by fd.
    mounts: Option<Vec<([u8; 8], crate::util::safefs::Dir)>>,
    /// The read buffer of a watch by handle (allocated once).
    buf: Vec<u8>,
    /// The bytes written, when tracked.
    pub written: Option<super::health::Written>,
    /// Queue overflows seen (writes then not counted).
    pub overflows: u64,
}

impl Watch {
    /// By file descriptor: mark the filesystem mounted at each of `dirs`;
    /// with `track`, count the bytes written (`written`).
    pub fn new(dirs: &[&Path], track: bool) -> Result<Watch> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            super::hot::EVENT_FLAGS,
        )
        .context("fanotify_init")?;
        mark(&fan, dirs)?;
        Ok(Watch {
            fan,
            mounts: None,
            buf: vec![],
            written: track.then(Default::default),
            overflows: 0,
        })
    }

    /// By file handle (nothing held): mark the filesystem mounted at each
    /// of `dirs`. Each is checked to be a mount point of `fstype` in
    /// /proc/self/mountinfo (the top one there: not a mount a user put
    /// over it, which could make the open below wait on a FUSE server),
    /// opened without following a symlink (`safefs::Dir::open_no_symlinks`),
    /// marked through that fd, and held open (the daemon stops before the
    /// local filesystems are unmounted). The dirs that cannot be are
    /// returned with the reason; none marked is an error, as is a kernel or
    /// filesystem that refuses marks by handle.
    pub fn by_handle(dirs: &[&Path], fstype: &str, track: bool) -> Result<(Watch, Vec<String>)> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::from_bits_retain(nix::libc::FAN_REPORT_FID),
            super::hot::EVENT_FLAGS,
        )
        .context("fanotify_init (FAN_REPORT_FID)")?;
        // this thread's mounts (a thread may have a namespace of its own)
        let table = crate::disk::mountinfo::parse(
            &std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default(),
        );
        let mut mounts = vec![];
        let mut failed = vec![];
        for d in dirs {
            let r = (|| -> Result<([u8; 8], crate::util::safefs::Dir)> {
                let top = crate::disk::mountinfo::at(&table, &d.to_string_lossy())
                    .map(|m| m.fstype.clone());
                if top.as_deref() != Some(fstype) {
                    anyhow::bail!(
                        "not a {fstype} mount point (the top mount there: {})",
                        top.as_deref().unwrap_or("none")
                    );
                }
                let dir = crate::util::safefs::Dir::open_no_symlinks(d)?;
                fan.mark(
                    MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                    MaskFlags::FAN_MODIFY,
                    dir.as_fd(),
                    None::<&Path>,
                )
                .context("fanotify_mark")?;
                Ok((fsid(dir.as_fd()).context("statfs")?, dir))
            })();
            match r {
                Ok(m) => mounts.push(m),
                Err(e) => failed.push(format!("{}: {e:#}", d.display())),
            }
        }
        if mounts.is_empty() {
            anyhow::bail!("nothing marked by file handle ({})", failed.join("; "));
        }
        Ok((
            Watch {
                fan,
                mounts: Some(mounts),
                buf: vec![0u8; 16 << 10],
                written: track.then(Default::default),
                overflows: 0,
            },
            failed,
        ))
    }

    /// Whether events name files by handle (nothing held).
    pub fn holds_nothing(&self) -> bool {
        self.mounts.is_some()
    }

    /// Whether a write was seen since the last call; drains the queue, at
    /// most `hot::DRAIN_MAX` events a call: a user writing without pause
    /// cannot hold the daemon's loop here. What is left is read at the
    /// next call; a queue that overflows meanwhile counts as a write.
    pub fn wrote(&mut self) -> bool {
        if self.mounts.is_some() {
            return self.wrote_by_handle();
        }
        let mut any = false;
        let mut seen = 0;
        while seen < super::hot::DRAIN_MAX {
            match self.fan.read_events() {
                Ok(ev) if ev.is_empty() => return any,
                Ok(ev) => {
                    seen += ev.len();
                    // each event's fd is closed as it is dropped
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
                Err(e) => return self.read_failed(e, any),
            }
        }
        // more queued: a write in any case (only FAN_MODIFY is marked)
        true
    }

    fn wrote_by_handle(&mut self) -> bool {
        let mut any = false;
        let mut seen = 0;
        while seen < super::hot::DRAIN_MAX {
            // whole events only, about 56 bytes each (tmpfs' 12-byte handle)
            let n = match nix::unistd::read(self.fan.as_fd(), &mut self.buf) {
                Ok(0) => return any,
                Ok(n) => n,
                Err(e) => return self.read_failed(e, any),
            };
            for e in parse_fid_events(&self.buf[..n]) {
                seen += 1;
                if e.mask & nix::libc::FAN_Q_OVERFLOW != 0 {
                    self.overflows += 1;
                }
                any |= e.mask & (nix::libc::FAN_MODIFY | nix::libc::FAN_Q_OVERFLOW) != 0;
                let (Some(w), Some(fid), Some(mounts)) =
                    (self.written.as_mut(), e.fid, self.mounts.as_ref())
                else {
                    continue;
                };
                // gone (ESTALE: removed before the drain), or of no
                // filesystem marked here: not counted
                if let Some((_, m)) = mounts.iter().find(|(id, _)| *id == fid.fsid)
                    && let Some(fd) = open_handle(m.as_fd(), &fid)
                    && let Some(f) = identity(fd.as_fd())
                {
                    w.seen(f);
                }
            }
        }
        true
    }

    /// EAGAIN: drained; anything else leaves the sampling of the tmpfs use
    /// and the interval to see the writes.
    fn read_failed(&self, e: nix::errno::Errno, any: bool) -> bool {
        if e != nix::errno::Errno::EAGAIN {
            log::debug!("fanotify read: {e}");
        }
        any
    }
}

fn mark(fan: &Fanotify, dirs: &[&Path]) -> Result<()> {
    for d in dirs {
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            MaskFlags::FAN_MODIFY,
            nix::fcntl::AT_FDCWD,
            Some(*d),
        )
        .with_context(|| format!("fanotify_mark on {}", d.display()))?;
    }
    Ok(())
}

/// Whether a kernel of `release` (`uname -r`) reports a write through an
/// overlay on its upper file too: from Linux 6.5 ("ovl: enable fsnotify
/// events on underlying real files"); before, overlayfs opened the upper
/// file `FMODE_NONOTIFY`, and a watch of the tier tmpfs would see nothing
/// (seen: Linux 6.1 in QEMU). Anything unreadable: no.
pub fn upper_sees_overlay_writes(release: &str) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let (Some(Ok(major)), Some(Ok(minor))) = (
        it.next().map(str::parse::<u32>),
        it.next().map(str::parse::<u32>),
    ) else {
        return false;
    };
    (major, minor) >= (6, 5)
}

/// The fsid `statfs` gives the filesystem of `fd`, as fanotify reports it.
fn fsid(fd: BorrowedFd) -> Result<[u8; 8]> {
    // SAFETY: fstatfs fills the zeroed struct it is given.
    let mut s: nix::libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { nix::libc::fstatfs(fd.as_raw_fd(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fsid_t is two c_ints (__kernel_fsid_t), 8 bytes, any value
    // valid.
    let v: [u8; 8] = unsafe { std::mem::transmute(s.f_fsid) };
    Ok(v)
}

/// A file handle an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fid<'a> {
    pub fsid: [u8; 8],
    pub handle_type: i32,
    pub handle: &'a [u8],
}

/// One event of a `FAN_REPORT_FID` group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FidEvent<'a> {
    pub mask: u64,
    pub fid: Option<Fid<'a>>,
}

/// The largest handle the kernel gives (`MAX_HANDLE_SZ`).
const MAX_HANDLE: usize = 128;

/// The events in `buf` as `read` gives them from a `FAN_REPORT_FID` group:
/// each a `fanotify_event_metadata` (24 bytes), then its info records
/// (header: type, pad, length); the file's handle from its
/// `FAN_EVENT_INFO_TYPE_FID` record. Every length is checked against what
/// is left; the first malformed event ends the list.
pub fn parse_fid_events(buf: &[u8]) -> Vec<FidEvent<'_>> {
    const META: usize = 24;
    let u16_at = |b: &[u8], o: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(
            b.get(o..o.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            b.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |b: &[u8], o: usize| -> Option<u64> {
        Some(u64::from_ne_bytes(
            b.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let mut out = vec![];
    let mut rest = buf;
    while rest.len() >= META {
        let (Some(len), Some(meta_len), Some(mask)) =
            (u32_at(rest, 0), u16_at(rest, 6), u64_at(rest, 8))
        else {
            break;
        };
        let (len, meta_len) = (len as usize, usize::from(meta_len));
        if rest[4] != nix::libc::FANOTIFY_METADATA_VERSION
            || meta_len < META
            || len < meta_len
            || len > rest.len()
        {
            break;
        }
        let mut fid = None;
        let mut info = &rest[meta_len..len];
        while info.len() >= 4 {
            let Some(ilen) = u16_at(info, 2).map(usize::from) else {
                break;
            };
            if ilen < 4 || ilen > info.len() {
                break;
            }
            let rec = &info[..ilen];
            if rec[0] == nix::libc::FAN_EVENT_INFO_TYPE_FID && fid.is_none() {
                // fsid (8), then struct file_handle: bytes (4), type (4), handle
                let parsed = (|| {
                    let fsid: [u8; 8] = rec.get(4..12)?.try_into().ok()?;
                    let hb = u32_at(rec, 12)? as usize;
                    let ht = u32_at(rec, 16)? as i32;
                    if hb > MAX_HANDLE {
                        return None;
                    }
                    let handle = rec.get(20..20usize.checked_add(hb)?)?;
                    Some(Fid {
                        fsid,
                        handle_type: ht,
                        handle,
                    })
                })();
                fid = parsed;
            }
            info = &info[ilen..];
        }
        out.push(FidEvent { mask, fid });
        rest = &rest[len..];
    }
    out
}

/// Open the file `fid` names, `O_PATH` (nothing of it read), on the
/// filesystem of `mount`; None when it is gone or cannot be opened.
fn open_handle(mount: BorrowedFd, fid: &Fid) -> Option<OwnedFd> {
    use nix::libc;
    // struct file_handle: handle_bytes, handle_type, then the bytes
    let mut h = [0u8; 8 + MAX_HANDLE];
    let n = fid.handle.len();
    if n > MAX_HANDLE {
        return None;
    }
    h[0..4].copy_from_slice(&(n as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&fid.handle_type.to_ne_bytes());
    h[8..8 + n].copy_from_slice(fid.handle);
    // SAFETY: h is a struct file_handle with n bytes of handle (the
    // kernel reads handle_bytes and then that many bytes, all in h).
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            h.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a new fd, ours alone.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A written file as `health::Written` counts it, from `statx` of the
/// event's fd (no path): its identity with its birth time where the
/// filesystem keeps one (tmpfs and ext4 do), so an inode number reused by
/// a new file is a new file; None for anything but a regular file.
fn identity(fd: BorrowedFd) -> Option<super::health::Seen> {
    use nix::libc;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An event as the kernel writes it: metadata, then a FID record.
    fn event(mask: u64, fsid: [u8; 8], handle: &[u8]) -> Vec<u8> {
        let rec_len = 20 + handle.len();
        let len = 24 + rec_len;
        let mut b = vec![];
        b.extend((len as u32).to_ne_bytes());
        b.push(nix::libc::FANOTIFY_METADATA_VERSION);
        b.push(0);
        b.extend(24u16.to_ne_bytes());
        b.extend(mask.to_ne_bytes());
        b.extend((-1i32).to_ne_bytes()); // FAN_NOFD
        b.extend(42i32.to_ne_bytes()); // pid
        b.push(nix::libc::FAN_EVENT_INFO_TYPE_FID);
        b.push(0);
        b.extend((rec_len as u16).to_ne_bytes());
        b.extend(fsid);
        b.extend((handle.len() as u32).to_ne_bytes());
        b.extend(1i32.to_ne_bytes());
        b.extend(handle);
        b
    }

    #[test]
    fn kernels_that_report_overlay_writes_on_the_upper() {
        for (r, want) in [
            ("6.18.44-fc-v657", true),
            ("6.5.0", true),
            ("6.12.9-arch1-1", true),
            ("7.0.1", true),
            ("6.4.16", false),
            ("6.1.0-56-amd64", false),
            ("5.19.17", false),
            ("", false),
            ("6", false),
            ("linux", false),
            ("99999999999.1", false),
        ] {
            assert_eq!(upper_sees_overlay_writes(r), want, "{r}");
        }
    }

    #[test]
    fn events_by_handle_are_read_with_their_handles() {
        let mut b = event(nix::libc::FAN_MODIFY, [1; 8], &[9; 12]);
        b.extend(event(nix::libc::FAN_MODIFY, [2; 8], &[7; 8]));
        // an overflow: metadata alone
        let mut o = vec![];
        o.extend(24u32.to_ne_bytes());
        o.push(nix::libc::FANOTIFY_METADATA_VERSION);
        o.push(0);
        o.extend(24u16.to_ne_bytes());
        o.extend(nix::libc::FAN_Q_OVERFLOW.to_ne_bytes());
        o.extend((-1i32).to_ne_bytes());
        o.extend(0i32.to_ne_bytes());
        b.extend(&o);
        let ev = parse_fid_events(&b);
        assert_eq!(ev.len(), 3);
        assert_eq!(
            ev[0].fid,
            Some(Fid {
                fsid: [1; 8],
                handle_type: 1,
                handle: &[9; 12]
            })
        );
        assert_eq!(ev[1].fid.unwrap().handle, &[7; 8]);
        assert_eq!(ev[2].mask, nix::libc::FAN_Q_OVERFLOW);
        assert_eq!(ev[2].fid, None);
    }

    #[test]
    fn malformed_events_end_the_list_and_never_panic() {
        let good = event(nix::libc::FAN_MODIFY, [1; 8], &[9; 12]);
        // cut anywhere: the whole events before the cut, nothing invented
        for cut in 0..good.len() {
            assert!(parse_fid_events(&good[..cut]).is_empty(), "cut at {cut}");
        }
        // an event length past the buffer, below the metadata, or a
        // metadata length past the event
        for (at, v) in [(0usize, 1000u32), (0, 8), (6, 200)] {
            let mut b = good.clone();
            if at == 6 {
                b[6..8].copy_from_slice(&(v as u16).to_ne_bytes());
            } else {
                b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            }
            assert!(parse_fid_events(&b).is_empty(), "field at {at} = {v}");
        }
        // a handle longer than its record or than MAX_HANDLE: no handle
        let mut b = good.clone();
        b[36..40].copy_from_slice(&13u32.to_ne_bytes());
        assert_eq!(parse_fid_events(&b)[0].fid, None);
        let mut b = good.clone();
        b[36..40].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(parse_fid_events(&b)[0].fid, None);
        // a record length of 0 (would loop) or past the event
        for l in [0u16, 3, 1000] {
            let mut b = good.clone();
            b[26..28].copy_from_slice(&l.to_ne_bytes());
            assert_eq!(parse_fid_events(&b)[0].fid, None, "record length {l}");
        }
        // another version: not read
        let mut b = good.clone();
        b[4] = 2;
        assert!(parse_fid_events(&b).is_empty());
        // seeded mutations of two events: never a panic, never more events
        // than the bytes hold, every handle within its bytes
        let mut two = good.clone();
        two.extend(event(nix::libc::FAN_MODIFY, [3; 8], &[5; 40]));
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for round in 0..50_000 {
            let mut b = two.clone();
            for _ in 0..(1 + round % 6) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 40) as u8;
            }
            if round % 13 == 0 {
                b.truncate((x as usize) % (two.len() + 1));
            }
            let ev = parse_fid_events(&b);
            assert!(ev.len() <= b.len() / 24);
            for e in ev {
                if let Some(f) = e.fid {
                    assert!(f.handle.len() <= MAX_HANDLE);
                }
            }
        }
    }
}
