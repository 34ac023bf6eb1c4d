//! Which filesystem reports a file's opens: marks each path given with a
//! fanotify filesystem mark (`FAN_OPEN | FAN_OPEN_EXEC | FAN_CLOSE_WRITE`),
//! runs the command after `--`, and prints one line per event: the mark
//! that saw it (the filesystem's mount point given), the event, and the
//! path the event's descriptor names. Used to learn, on the kernel the ISO
//! ships, whether opens through the live root's overlays are reported on
//! the overlay, its ext4 upper or its squashfs lower (issue 10's heat
//! feed). Needs CAP_SYS_ADMIN.
//!
//! Usage: fanprobe MOUNT... -- COMMAND [ARGS...]

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::os::fd::AsRawFd;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: fanprobe MOUNT... -- COMMAND [ARGS...]");
        std::process::exit(2);
    };
    let (mounts, cmd) = (&args[..sep], &args[sep + 1..]);
    // one group a mount, so that each event names the mark that saw it
    let groups: Vec<(String, Fanotify)> = mounts
        .iter()
        .filter_map(|m| {
            let fan = Fanotify::init(
                InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
                EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
            )
            .map_err(|e| eprintln!("fanotify_init: {e}"))
            .ok()?;
            fan.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                MaskFlags::FAN_OPEN | MaskFlags::FAN_OPEN_EXEC | MaskFlags::FAN_CLOSE_WRITE,
                nix::fcntl::AT_FDCWD,
                Some(m.as_str()),
            )
            .map_err(|e| println!("FANPROBE mark {m}: {e}"))
            .ok()?;
            Some((m.clone(), fan))
        })
        .collect();
    let me = std::process::id();
    let status = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(127);
    for (m, fan) in &groups {
        while let Ok(evs) = fan.read_events() {
            if evs.is_empty() {
                break;
            }
            for e in evs {
                if e.pid() as u32 == me {
                    continue;
                }
                let path = e
                    .fd()
                    .and_then(|fd| {
                        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
                    })
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "?".into());
                println!("FANPROBE {m} {:?} {path}", e.mask());
            }
        }
    }
    println!("FANPROBE done rc={status}");
}
