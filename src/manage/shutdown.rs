//! `mados-persistence shutdown`: the last step of a poweroff or reboot, run
//! by systemd-shutdown from `/usr/lib/systemd/system-shutdown/` once every
//! process is killed and it has unmounted what it could. The overlays over
//! `/usr` (and `/etc`) are still mounted then, since systemd-shutdown runs
//! from them, and they hold the persistence partition. They are detached
//! here (lazily: `MNT_DETACH`); the kernel lets go of them, and so of the
//! partition, as soon as systemd-shutdown has switched to the shutdown
//! initramfs and execs its `/shutdown`: the ext4 is unmounted cleanly.
//! Without a shutdown initramfs nothing changes: systemd-shutdown maps
//! `/usr` until the machine goes down, and the journal is replayed at the
//! next boot (`status` says so). `plan` is pure and unit-tested.

use crate::boot::mounts;
use crate::disk::mountinfo::{self, Mount};
use anyhow::Result;
use std::path::Path;

/// The mountpoints that hold the persistence filesystem, the topmost
/// (last mounted) first: mounts of its device (`pdev`: the partition, the
/// `/home` bind, kept cache dirs) and overlays with a layer (upper, work
/// or a lower) on it, found below `pmount`, where boot mounted it. Never
/// `/`, and nothing else.
pub fn plan(mounts: &[Mount], pdev: Option<(u32, u32)>, pmount: &str) -> Vec<String> {
    let under = |p: &str| {
        let base = pmount.trim_end_matches('/');
        !base.is_empty() && (p == base || p.starts_with(&format!("{base}/")))
    };
    let layered_on_it = |m: &Mount| {
        m.fstype == "overlay"
            && ["upperdir", "workdir", "lowerdir"].iter().any(|k| {
                m.option(k)
                    .is_some_and(|v| v.split(':').any(|p| !p.is_empty() && under(p)))
            })
    };
    let mut out: Vec<String> = Vec::new();
    for m in mounts.iter().rev() {
        if m.mountpoint == "/" || out.contains(&m.mountpoint) {
            continue;
        }
        if Some(m.dev) == pdev || layered_on_it(m) {
            out.push(m.mountpoint.clone());
        }
    }
    out
}

/// Detach what `plan` names (a plain unmount first, lazily when busy).
/// Never fails the shutdown: what could not be detached is logged.
/// Refused (exit 3) unless PID 1 is systemd-shutdown: on a running system
/// it would pull `/usr` and `/etc` from under every process.
pub fn shutdown() -> Result<()> {
    crate::util::logging::init(true, log::LevelFilter::Info);
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if !is_systemd_shutdown(&pid1) {
        return super::refuse(format!(
            "shutdown is run by systemd-shutdown at the very end of a poweroff or reboot; \
             PID 1 is {:?} here: nothing done",
            pid1.trim()
        ));
    }
    let Some(st) = super::read_state() else {
        return Ok(());
    };
    let Some(p) = st.partition.filter(|_| st.mode == "persistent") else {
        return Ok(());
    };
    let pdev = mountinfo::dev_of(Path::new(&p.mounted_from));
    let targets = plan(&mountinfo::read(), pdev, &p.mountpoint);
    if targets.is_empty() {
        log::info!("shutdown: nothing holds {} any more", p.device);
        return Ok(());
    }
    for t in &targets {
        match mounts::umount(Path::new(t)) {
            Ok(()) => log::info!("shutdown: detached {t}"),
            Err(e) => log::warn!("shutdown: {e:#}"),
        }
    }
    log::info!(
        "shutdown: {} detached: {} is unmounted once the shutdown initramfs runs",
        targets.join(" "),
        p.device
    );
    Ok(())
}

/// PID 1's `comm` (15 bytes at most: `systemd-shutdow`).
fn is_systemd_shutdown(comm: &str) -> bool {
    let c = comm.trim_end();
    !c.is_empty() && "systemd-shutdown".starts_with(c) && c.starts_with("systemd-shutdow")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_under_systemd_shutdown() {
        assert!(is_systemd_shutdown("systemd-shutdow\n"));
        assert!(is_systemd_shutdown("systemd-shutdown"));
        for c in ["systemd\n", "init", "", "systemd-shutdownX", "sh"] {
            assert!(!is_systemd_shutdown(c), "{c:?}");
        }
    }

    // what is left when systemd-shutdown has unmounted what it could, and
    // more (the partition, a bind, a tier) for the rule's sake
    const LEFT: &str = "\
20 1 0:30 / / ro,relatime - overlay airootfs ro,lowerdir=/run/archiso/airootfs,upperdir=/run/archiso/cowspace/persistent_X/x86_64/upperdir,workdir=/run/archiso/cowspace/persistent_X/x86_64/workdir
21 20 0:21 / /run rw - tmpfs run rw,mode=755
22 21 11:0 / /run/archiso/bootmnt ro - iso9660 /dev/sda1 ro
23 21 7:0 / /run/archiso/airootfs ro - squashfs /dev/loop0 ro
24 21 8:3 / /run/mados/persistence rw - ext4 /dev/sda3 rw
25 20 0:40 / /usr ro,relatime - overlay overlay ro,lowerdir=/new_root/usr,upperdir=/run/mados/persistence/overlays/usr/upper,workdir=/run/mados/persistence/overlays/usr/work
26 20 8:3 /home /home rw - ext4 /dev/sda3 rw
27 20 0:41 / /var/log rw - overlay mados-tier rw,lowerdir=/run/mados/persistence/tier/var-log/lower,upperdir=/run/mados/tier/var-log/upper,workdir=/run/mados/tier/var-log/work
28 21 0:42 / /run/lock rw - tmpfs tmpfs rw
29 20 0:43 / /opt ro - overlay other ro,lowerdir=/run/mados/persistence-other/x,upperdir=/elsewhere/u,workdir=/elsewhere/w
";

    #[test]
    fn detaches_what_holds_the_partition_topmost_first() {
        let m = mountinfo::parse(LEFT);
        assert_eq!(
            plan(&m, Some((8, 3)), "/run/mados/persistence"),
            ["/var/log", "/home", "/usr", "/run/mados/persistence"]
        );
        // the partition's node gone: its overlays are still found by path
        assert_eq!(
            plan(&m, None, "/run/mados/persistence/"),
            ["/var/log", "/usr"]
        );
        // archiso's mounts, the root, a path that only starts alike: never
        let p = plan(&m, Some((8, 3)), "/run/mados/persistence");
        for other in ["/", "/run", "/run/archiso/bootmnt", "/run/lock", "/opt"] {
            assert!(!p.contains(&other.to_string()), "{other} in {p:?}");
        }
        // no mountpoint known: only the device
        assert_eq!(
            plan(&m, Some((8, 3)), ""),
            ["/home", "/run/mados/persistence"]
        );
        assert!(plan(&m, None, "").is_empty());
    }
}
