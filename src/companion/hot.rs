//! File opens seen as they happen, to feed `heat`: a fanotify filesystem
//! mark (`FAN_OPEN | FAN_OPEN_EXEC`) on each filesystem the live system
//! reads from.
//!
//! Which filesystem reports an open depends on the kernel
//! (`bench/fanotify-layers`): on Debian's 6.1 only the overlays do (the
//! root, `/etc /usr /var /opt`), not their ext4 upper nor the squashfs
//! below; newer kernels report on both. So the daemon marks the mount
//! points of the live root as `state.json` lists them, and an event names
//! the file as the system sees it (its path and identity through the
//! overlay), which is also what `pin` maps.
//!
//! Reads through a mapping fire nothing and every `read` would fire
//! `FAN_ACCESS`, so opens are the measure: a program started, a library
//! loaded, a file opened. The daemon's own opens (its pins) are skipped.
//! A queue overflow loses events, counted; heat is a sample anyway.
//!
//! A close after writing (`FAN_CLOSE_WRITE`) counts as a write of the
//! file's directory (`writeheat`); an open of a file the caller watches
//! for (the hot set's, not yet used this boot) is reported as a first use.

use crate::companion::heat::{FileId, Heat};
use crate::companion::writeheat::DirHeat;
use anyhow::{Context, Result, bail};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;

pub struct Hot {
    fan: Fanotify,
    me: i32,
    /// Opens counted into heat, and queue overflows, since the start.
    pub events: u64,
    pub overflows: u64,
}

/// Where a drain puts what it saw.
pub struct Sink<'a> {
    pub heat: &'a mut Heat,
    pub dirs: &'a mut DirHeat,
    /// Files whose first open is wanted (their id, as `fstat` of the open
    /// shows it); those opened are pushed to `first`.
    pub watch: &'a HashMap<FileId, usize>,
    pub first: &'a mut Vec<FileId>,
}

/// How the kernel opens each event's fd in the daemon: read-only, and
/// `O_NONBLOCK`, so that the open of a FIFO a user opened on a marked
/// filesystem (a FIFO in `/var/tmp`) never waits for a writer. `O_NOCTTY`
/// is not accepted here (`fanotify_init` fails with EINVAL); the marks are
/// on the overlays and the partition, where no user can make a terminal
/// node, and an event fd is only `fstat`ed and named, never read.
pub const EVENT_FLAGS: EventFFlags = EventFFlags::O_RDONLY
    .union(EventFFlags::O_LARGEFILE)
    .union(EventFFlags::O_CLOEXEC)
    .union(EventFFlags::O_NONBLOCK);

/// At most this many events a drain, so about a second: what the daemon
/// spends on tracking stays bounded (each event costs the kernel an open
/// and the daemon a `fstat`, about 4 µs natively) whatever the load. The
/// rest wait in the queue; once it is full the kernel drops new events
/// (counted as overflows): heat then samples the opens.
pub const DRAIN_MAX: usize = 4096;

impl Hot {
    /// Mark each of `marks`: the whole filesystem mounted there (`true`:
    /// an overlay), or that mount alone (`false`: a bind of a directory of
    /// the partition, whose filesystem also holds the overlays' uppers,
    /// which newer kernels report on as well). Those that cannot be marked
    /// are returned with the reason; none marked is an error.
    pub fn new(marks: &[(&Path, bool)]) -> Result<(Hot, Vec<String>)> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EVENT_FLAGS,
        )
        .context("fanotify_init")?;
        let mut failed = vec![];
        let mut marked = 0;
        for (m, whole) in marks {
            let kind = if *whole {
                MarkFlags::FAN_MARK_FILESYSTEM
            } else {
                MarkFlags::FAN_MARK_MOUNT
            };
            match fan.mark(
                MarkFlags::FAN_MARK_ADD | kind,
                MaskFlags::FAN_OPEN | MaskFlags::FAN_OPEN_EXEC | MaskFlags::FAN_CLOSE_WRITE,
                nix::fcntl::AT_FDCWD,
                Some(*m),
            ) {
                Ok(()) => marked += 1,
                Err(e) => failed.push(format!("{}: {e}", m.display())),
            }
        }
        if marked == 0 {
            bail!("no filesystem could be marked ({})", failed.join("; "));
        }
        Ok((
            Hot {
                fan,
                me: std::process::id() as i32,
                events: 0,
                overflows: 0,
            },
            failed,
        ))
    }

    /// Count the opens queued since the last call into `heat` at `now`
    /// (and the writes into `dirs`); returns how many opens were counted.
    pub fn drain(&mut self, sink: &mut Sink, now: f64) -> usize {
        let mut n = 0;
        let mut seen = 0;
        while seen < DRAIN_MAX {
            let evs = match self.fan.read_events() {
                Ok(evs) if !evs.is_empty() => evs,
                _ => break, // EAGAIN: drained (anything else: next time)
            };
            seen += evs.len();
            for e in evs {
                if e.mask().contains(MaskFlags::FAN_Q_OVERFLOW) {
                    self.overflows += 1;
                    continue;
                }
                if e.pid() == self.me {
                    continue;
                }
                let Some(fd) = e.fd() else { continue };
                let Ok(st) = nix::sys::stat::fstat(fd.as_fd()) else {
                    continue;
                };
                if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
                    continue;
                }
                let path = || -> Option<String> {
                    let p = std::fs::read_link(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&fd)
                    ))
                    .ok()?;
                    let p = p.to_str()?;
                    // a file deleted since it was opened: nothing to pin
                    (!p.ends_with(" (deleted)")).then(|| p.to_string())
                };
                if e.mask().contains(MaskFlags::FAN_CLOSE_WRITE)
                    && let Some(p) = path()
                    && let Some((dir, _)) = p.rsplit_once('/')
                {
                    sink.dirs.touch(if dir.is_empty() { "/" } else { dir }, now);
                }
                let opened = e
                    .mask()
                    .intersects(MaskFlags::FAN_OPEN | MaskFlags::FAN_OPEN_EXEC);
                if !opened || st.st_size <= 0 {
                    continue;
                }
                let (id, size) = ((st.st_dev, st.st_ino), st.st_size as u64);
                if sink.watch.contains_key(&id) {
                    sink.first.push(id);
                }
                // a file seen before: its path is known (one syscall less)
                if sink.heat.touch_known(id, size, now) {
                    n += 1;
                    continue;
                }
                let Some(p) = path() else { continue };
                sink.heat.touch(id, &p, size, now);
                n += 1;
            }
        }
        self.events += n as u64;
        n
    }
}
