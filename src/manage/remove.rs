//! `disable` and `remove`: requests left on the partition for the next boot,
//! or the partition deleted now when it is not in use.

use super::{
    TempMount, active_on, confirm, read_state, refuse, running_settings, target_device, usage,
};
use crate::boot::flags;
use crate::boot::state::State;
use crate::disk::stick::{
    Existing, Opened, find_claimed, find_encrypted, find_persistence, open_device, remove_partition,
};
use crate::settings::config::Settings;
use anyhow::Result;
use std::path::PathBuf;

/// The persistence partition `disable` and `remove` act on, or a refusal.
pub(super) fn locate(
    device: Option<PathBuf>,
    verb: &str,
    s: &Settings,
) -> Result<(Option<State>, PathBuf, Opened, Existing)> {
    let st = read_state();
    let disk = target_device(device, st.as_ref(), verb)?;
    let mut o = open_device(&disk, false)?;
    match find_persistence(&mut o, &s.label) {
        Some(e) => Ok((st, disk, o, e)),
        None if let Some(e) = find_encrypted(&mut o, &s.label) => Ok((st, disk, o, e)),
        None if verb == "remove"
            && let Some(e) = find_claimed(&mut o) =>
        {
            Ok((st, disk, o, e))
        }
        None => refuse(format!(
            "{} has no persistence partition labelled '{}'",
            disk.display(),
            s.label
        )),
    }
}

pub fn disable(device: Option<PathBuf>, once: bool) -> Result<()> {
    let s = &running_settings();
    let (st, disk, mut o, e) = locate(device, "disable", s)?;
    let kind = if once {
        flags::Disabled::Once
    } else {
        flags::Disabled::Always
    };
    match active_on(st.as_ref(), e.number, &disk) {
        Some(pm) => flags::set_disabled(&pm, kind)?,
        None if find_encrypted(&mut o, &s.label).is_some_and(|x| x.number == e.number) => {
            return refuse(format!(
                "partition {} on {} is encrypted and not unlocked here: run `disable` in a session booted \
                 with it, or boot with mados.persistence=off",
                e.number,
                disk.display()
            ));
        }
        None => flags::set_disabled(&TempMount::new(&disk, o.block, &e, false)?.dir, kind)?,
    }
    println!(
        "{} The data stays on partition {}; nothing is unmounted in this session. `mados-persistence enable` turns it back on.",
        if once {
            "The next boot runs in RAM mode, the one after uses persistence again."
        } else {
            "Boots run in RAM mode from now on."
        },
        e.number
    );
    Ok(())
}

pub fn remove(device: Option<PathBuf>, yes: bool) -> Result<()> {
    let s = &running_settings();
    let (st, disk, mut o, e) = locate(device, "remove", s)?;
    let active = active_on(st.as_ref(), e.number, &disk);
    let encrypted = find_encrypted(&mut o, &s.label).is_some_and(|x| x.number == e.number);
    // What is on it and the table backup kept there. A filesystem that no
    // longer mounts can still be removed: the table and the backup in the
    // claim in front of the partition are all that is needed.
    let (used, backup) = match &active {
        Some(pm) => (usage(&pm.to_string_lossy()), None),
        // not unlocked here: the table backup comes from the claim
        None if encrypted => (None, None),
        None => match TempMount::new(&disk, o.block, &e, true) {
            Ok(m) => (usage(&m.dir.to_string_lossy()), flags::read_backup(&m.dir)),
            // mounted elsewhere, or held: never removed from under its user
            Err(err) if err.downcast_ref::<super::Refused>().is_some() => return Err(err),
            Err(err) => {
                eprintln!(
                    "mados-persistence: warning: the filesystem on partition {} does not mount ({err:#}); \
                     removing it from the table anyway",
                    e.number
                );
                (None, None)
            }
        },
    };
    println!(
        "This permanently deletes partition {} on {} ({}, {} in use): every saved change, installed package and /home file on it.",
        e.number,
        disk.display(),
        crate::settings::size::human(e.size),
        used.map_or("unknown".into(), |u| crate::settings::size::human(u.used))
    );
    if encrypted {
        println!(
            "It is encrypted: its LUKS2 headers and key slots are wiped, so nobody can decrypt what was on \
             it, with any passphrase (a header backup you made would still open it: destroy it)."
        );
    }
    println!("The ISO and its EFI partition are not touched.");
    confirm("Remove it?", Some("remove"), yes)?;
    drop(o);
    if let Some(pm) = active {
        flags::set_remove(&pm)?;
        println!(
            "Persistence is in use in this session: it will be removed at the next boot, before anything is mounted."
        );
        return Ok(());
    }
    let how = remove_partition(&disk, e.number, e.start, e.size, backup.as_ref())?;
    println!(
        "Removed partition {} from {} ({how}).",
        e.number,
        disk.display()
    );
    Ok(())
}
