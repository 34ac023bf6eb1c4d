//! `set-aside list`, `restore NAME`, `delete NAME`: the overlays
//! `on_iso_change = "set-aside"` kept on the partition (`boot::set_aside`),
//! on the boot stick or a `--device`. A restore is only a request here:
//! the next boot that carries the build those overlays were made on
//! carries it out before layering.

use super::remove::locate;
use super::{Refused, TempMount, active_on, confirm, refuse, running_settings};
use crate::boot::iso_build::IsoBuild;
use crate::boot::set_aside::{self, Entry, Request};
use crate::disk::superblock::{self, Fs};
use crate::settings::size::human;
use crate::util::safefs::Dir;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;

/// The partition's root, mounted for as long as the command runs.
struct Reached {
    root: Dir,
    /// The build the stick carries (booted, or read from its ISO).
    current: Option<IsoBuild>,
    /// The partition is the running system's.
    active: bool,
    _mount: Option<TempMount>,
}

fn reach(device: Option<PathBuf>, verb: &str, write: bool) -> Result<Reached> {
    let s = &running_settings();
    let (st, disk, mut o, e) = locate(device, verb, s)?;
    let active = active_on(st.as_ref(), e.number, &disk);
    let current = match (&active, st.as_ref().and_then(|s| s.iso.clone())) {
        (Some(_), Some(b)) => Some(b),
        _ => match superblock::probe(&mut o.file) {
            Ok(Some(Fs::Iso9660(i))) => Some(IsoBuild {
                label: i.label,
                uuid: i.uuid,
            }),
            _ => None,
        },
    };
    let block = o.block;
    drop(o);
    let (pm, mount) = match active {
        Some(pm) => (pm, None),
        None => {
            let m = TempMount::new(&disk, block, &e, !write)?;
            (m.dir.clone(), Some(m))
        }
    };
    let root = Dir::open(&pm).with_context(|| format!("opening {}", pm.display()))?;
    Ok(Reached {
        root,
        current,
        active: mount.is_none(),
        _mount: mount,
    })
}

#[derive(Serialize)]
struct Listing {
    /// The build the stick carries.
    stick: Option<IsoBuild>,
    /// A restore requested and not yet carried out.
    restore_requested: Option<Request>,
    entries: Vec<Listed>,
}

#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    entry: Entry,
    /// A restore of it would be carried out at the next boot of this stick.
    restorable_now: bool,
}

fn when(at: Option<u64>) -> String {
    let Some(at) = at else { return "?".into() };
    // UTC, without a date crate: days from the civil calendar
    let (days, secs) = (at / 86400, at % 86400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

pub fn list(device: Option<PathBuf>, json: bool) -> Result<()> {
    let r = reach(device, "list set-aside overlays on", false)?;
    let entries = set_aside::list(&r.root, true)?;
    let req = set_aside::read_request(&r.root).unwrap_or(None);
    let listing = Listing {
        stick: r.current.clone(),
        restore_requested: req,
        entries: entries
            .into_iter()
            .map(|e| Listed {
                restorable_now: e.has_overlays
                    && r.current.as_ref().is_some_and(|c| e.origin.matches(c)),
                entry: e,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    print!("{}", render(&listing));
    Ok(())
}

/// Text from the partition or the stick (names, labels, notes) as it may
/// reach a terminal: control characters escaped (a crafted stick's escape
/// sequences would act on root's terminal).
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn render(l: &Listing) -> String {
    let mut o = String::new();
    if let Some(c) = &l.stick {
        o.push_str(&format!(
            "the stick carries {} ({})\n",
            clean(&c.label),
            clean(&c.uuid)
        ));
    }
    if l.entries.is_empty() {
        o.push_str("nothing is set aside on the partition\n");
    }
    for e in &l.entries {
        let x = &e.entry;
        o.push_str(&format!(
            "{}\n  from {}; set aside {}; {}{}\n",
            clean(&x.name),
            clean(&x.origin.describe()),
            when(x.at),
            x.size
                .map_or("size unknown".into(), |s| format!("{}B", human(s))),
            if !x.has_overlays {
                "; holds no overlays (nothing to restore)"
            } else if e.restorable_now {
                "; restorable at the next boot"
            } else {
                ""
            }
        ));
        if let Some(n) = &x.note {
            o.push_str(&format!("  note: {}\n", clean(n)));
        }
    }
    if let Some(r) = &l.restore_requested {
        o.push_str(&format!(
            "restore requested: {}{}\n",
            clean(&r.name),
            if r.started.is_some() {
                " (interrupted; the next boot finishes it)"
            } else {
                " (carried out at the next boot with its release)"
            }
        ));
    }
    o
}

pub fn restore(device: Option<PathBuf>, name: Option<String>, cancel: bool) -> Result<()> {
    let r = reach(device, "restore set-aside overlays on", true)?;
    let old = match set_aside::read_request(&r.root) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mados-persistence: warning: {e:#}; replacing it");
            None
        }
    };
    if old.as_ref().is_some_and(|o| o.started.is_some()) {
        return refuse(format!(
            "a restore of {} was interrupted; boot the stick once to finish it first",
            old.as_ref().map_or(String::new(), |o| clean(&o.name))
        ));
    }
    if cancel {
        set_aside::clear_request(&r.root)?;
        match old {
            Some(o) => println!(
                "The restore of {} is withdrawn; nothing was moved.",
                clean(&o.name)
            ),
            None => println!("No restore was requested."),
        }
        return Ok(());
    }
    let Some(name) = name else {
        return refuse("name the set-aside overlays to restore (see `set-aside list`)");
    };
    let entries = set_aside::list(&r.root, false)?;
    let Some(e) = entries.iter().find(|e| e.name == name) else {
        return refuse(format!(
            "there is no set-aside/{name} on the partition (`mados-persistence set-aside list`)"
        ));
    };
    if !e.has_overlays {
        return refuse(format!(
            "set-aside/{name} holds no overlays; nothing to restore"
        ));
    }
    set_aside::write_request(
        &r.root,
        &Request {
            name: name.clone(),
            requested_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            started: None,
        },
    )?;
    if let Some(o) = old.filter(|o| o.name != name) {
        println!(
            "(this replaces the restore of {} requested before)",
            clean(&o.name)
        );
    }
    match &r.current {
        Some(c) if e.origin.matches(c) => println!(
            "{name} (made on {}) is restored at the next boot: the overlays {} are set aside in turn, \
             then {name}'s /etc /usr /var /opt are layered. /home is not touched.",
            clean(&e.origin.describe()),
            if r.active {
                "in use now"
            } else {
                "on the partition"
            }
        ),
        Some(c) => println!(
            "Not now: {name} was made on {}, and the stick carries {} ({}). The request is kept: it is \
             carried out at the first boot with that release written to the stick again (each boot until \
             then leaves it and says why). `set-aside restore --cancel` withdraws it.",
            clean(&e.origin.describe()),
            clean(&c.label),
            clean(&c.uuid)
        ),
        None => println!(
            "{name} (made on {}) is restored at the next boot that carries that release; the release on \
             the stick now could not be read.",
            clean(&e.origin.describe())
        ),
    }
    Ok(())
}

pub fn delete(device: Option<PathBuf>, name: String, yes: bool) -> Result<()> {
    let r = reach(device, "delete set-aside overlays on", true)?;
    if let Ok(Some(q)) = set_aside::read_request(&r.root)
        && q.name == name
    {
        return refuse(format!(
            "a restore of {name} is requested; withdraw it first (`set-aside restore --cancel`)"
        ));
    }
    let entries = set_aside::list(&r.root, true)?;
    let Some(e) = entries.iter().find(|e| e.name == name) else {
        return refuse(format!("there is no set-aside/{name} on the partition"));
    };
    println!(
        "This permanently deletes set-aside/{name} (from {}, {}): the /etc /usr /var /opt changes made on that release.",
        clean(&e.origin.describe()),
        e.size
            .map_or("size unknown".into(), |s| format!("{}B", human(s)))
    );
    confirm("Delete it?", Some("delete"), yes)?;
    let freed = set_aside::delete(&r.root, &name).map_err(|err| {
        if err.downcast_ref::<Refused>().is_some() {
            err
        } else {
            err.context(format!("deleting set-aside/{name}"))
        }
    })?;
    println!(
        "Deleted set-aside/{name}{}.",
        freed.map_or(String::new(), |s| format!(", {}B freed", human(s)))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stick from anyone, inspected with `--device`: its set-aside names
    /// and records reach root's terminal. No control character may (an
    /// escape sequence can retitle, rewrite or answer the terminal).
    #[test]
    fn list_shows_no_control_characters() {
        let evil = "x\u{1b}]0;owned\u{7}\u{1b}[2J\r";
        let l = Listing {
            stick: Some(IsoBuild {
                label: evil.into(),
                uuid: "u".into(),
            }),
            restore_requested: None,
            entries: vec![Listed {
                entry: Entry {
                    name: crate::util::safefs::encode(std::path::Path::new(evil)),
                    origin: set_aside::Origin::Record {
                        build: IsoBuild {
                            label: evil.into(),
                            uuid: evil.into(),
                        },
                    },
                    at: None,
                    size: None,
                    has_overlays: true,
                    note: Some(evil.into()),
                },
                restorable_now: false,
            }],
        };
        let out = render(&l);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    }

    #[test]
    fn dates_in_utc() {
        assert_eq!(when(Some(0)), "1970-01-01 00:00 UTC");
        assert_eq!(when(Some(951_782_400)), "2000-02-29 00:00 UTC");
        assert_eq!(when(Some(1_795_789_845)), "2026-11-27 14:30 UTC");
        assert_eq!(when(None), "?");
    }
}
