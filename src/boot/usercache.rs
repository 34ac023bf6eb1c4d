//! Each user's `~/.cache` in RAM (`[user_cache]`): at a persistent boot, a
//! tmpfs of `size` (mode 0700, owned by the user) over `~/.cache` for every
//! user in `/etc/passwd` whose home is on the partition (under a bind dir,
//! `/home`), with the `keep` subdirectories bound from the partition's
//! `~/.cache` so that they stay on the stick.
//!
//! The first time (and whenever the partition's `~/.cache` holds more than
//! the kept names), what is not kept is moved into `~/.cache.old` on the
//! partition, one rename per entry: nothing is deleted, a cut leaves every
//! entry in one place or the other, and the next boot finishes the moves.
//! The boot tells the user about it.
//!
//! `plan` is pure (what was seen on the partition → steps for
//! `boot::mounts::execute`); `look` reads what `plan` needs, without
//! following any symlink on the partition.

use crate::boot::mounts::{Step, escape};
use crate::boot::tier::strictly_under;
use crate::settings::config::Settings;
use crate::settings::size::human;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A user cache mounted this boot (state.json `user_caches`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserCache {
    pub user: String,
    /// `/home/alice/.cache`
    pub path: String,
    pub size: u64,
    /// Kept on the partition (bound).
    pub kept: Vec<String>,
}

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// The entries of `/etc/passwd` (malformed lines skipped: they name no
/// user the system would log in).
pub fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() != 7 || f[0].is_empty() {
                return None;
            }
            Some(Passwd {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].into(),
            })
        })
        .collect()
}

/// An entry on the partition as `look` saw it (lstat: a symlink is Other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Missing,
    Dir { uid: u32 },
    Other,
}

/// What `plan` needs to know about one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub user: Passwd,
    /// The home on the partition (`<pm>/home/alice`).
    pub stick_home: PathBuf,
    pub home: Kind,
    /// `~/.cache` on the partition, and its entries with their kinds.
    pub cache: Kind,
    pub entries: Vec<(String, Kind)>,
    /// `~/.cache.old` on the partition, and the names in it.
    pub old: Kind,
    pub old_names: Vec<String>,
}

/// Where a home lives on the partition: below a bind dir, in plain
/// components. `None` for a home elsewhere (in RAM, or `/root`).
pub fn stick_home(home: &str, pm: &Path, s: &Settings) -> Option<PathBuf> {
    let home = home.trim_end_matches('/');
    s.bind_dirs.iter().find_map(|b| {
        let rest = strictly_under(home, b)?;
        rest.split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
            .then(|| pm.join(escape(b)).join(rest))
    })
}

const OLD: &str = ".cache.old";

/// A name for `name` in `~/.cache.old` that is not taken.
fn free_name(name: &str, taken: &[String]) -> String {
    let mut cand = name.to_string();
    let mut n = 1u32;
    while taken.contains(&cand) {
        cand = format!("{name}.{n}");
        n += 1;
    }
    cand
}

/// The steps for all users, what will be mounted, and what to tell the
/// user (warnings). `root` is the live root, `ram` the RAM size.
pub fn plan(
    root: &Path,
    s: &Settings,
    ram: u64,
    seen: &[Seen],
) -> (Vec<Step>, Vec<UserCache>, Vec<String>) {
    let mut steps = Vec::new();
    let mut caches = Vec::new();
    let mut notes = Vec::new();
    let size = s.user_cache.size.resolve(ram);
    let mut homes_done: Vec<&str> = Vec::new();
    for v in seen {
        let u = &v.user;
        let home = u.home.trim_end_matches('/');
        if homes_done.contains(&home) {
            continue;
        }
        homes_done.push(home);
        let cache_dir = format!("{home}/.cache");
        let mut skip =
            |why: String| notes.push(format!("{}'s ~/.cache stays on the stick: {why}", u.name));
        match v.home {
            Kind::Missing => continue,
            Kind::Other => {
                skip(format!("{home} on the partition is not a directory"));
                continue;
            }
            Kind::Dir { uid } if uid != u.uid => {
                skip(format!("{home} belongs to uid {uid}, not {}", u.uid));
                continue;
            }
            Kind::Dir { .. } => {}
        }
        if let Some(d) = s.tier.dirs.iter().find(|d| {
            s.tier.enabled
                && (**d == cache_dir
                    || strictly_under(d, &cache_dir).is_some()
                    || strictly_under(&cache_dir, d).is_some())
        }) {
            skip(format!("the RAM tier has {d}"));
            continue;
        }
        let (cs, os) = (v.stick_home.join(".cache"), v.stick_home.join(OLD));
        let own = |path: PathBuf| Step::MkdirAs {
            path,
            uid: u.uid,
            gid: u.gid,
            mode: 0o700,
        };
        match v.cache {
            Kind::Missing => steps.push(own(cs.clone())),
            Kind::Dir { uid } if uid == u.uid => {}
            Kind::Dir { uid } => {
                skip(format!("{cache_dir} belongs to uid {uid}"));
                continue;
            }
            Kind::Other => {
                skip(format!("{cache_dir} on the partition is not a directory"));
                continue;
            }
        }
        let leftovers: Vec<&String> = v
            .entries
            .iter()
            .map(|(n, _)| n)
            .filter(|n| !s.user_cache.keep.contains(n))
            .collect();
        if !leftovers.is_empty() {
            match v.old {
                Kind::Dir { uid } if uid == u.uid => {}
                Kind::Missing => steps.push(own(os.clone())),
                _ => {
                    skip(format!(
                        "{home}/{OLD} is in the way (not a directory of {})",
                        u.name
                    ));
                    continue;
                }
            }
            let mut taken = v.old_names.clone();
            for n in &leftovers {
                let to = free_name(n, &taken);
                steps.push(Step::Rename {
                    from: cs.join(n),
                    to: os.join(&to),
                });
                taken.push(to);
            }
            notes.push(format!(
                "{}'s ~/.cache is in RAM from this boot on; {} entr{} of the old ~/.cache that \
                 user_cache.keep does not name ({}) moved to {home}/{OLD} on the stick: nothing \
                 was deleted, remove it when you no longer need it",
                u.name,
                leftovers.len(),
                if leftovers.len() == 1 { "y" } else { "ies" },
                leftovers
                    .iter()
                    .take(5)
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if leftovers.len() > 5 { ", …" } else { "" }
            ));
        }
        let mut kept = Vec::new();
        for k in &s.user_cache.keep {
            match v.entries.iter().find(|(n, _)| n == k).map(|(_, k)| k) {
                None => steps.push(own(cs.join(k))),
                Some(Kind::Dir { .. }) => {}
                Some(_) => {
                    notes.push(format!(
                        "{}'s ~/.cache/{k} is not a directory on the stick; it is in RAM like the rest",
                        u.name
                    ));
                    continue;
                }
            }
            kept.push(k.clone());
        }
        let target = root.join(cache_dir.trim_start_matches('/'));
        steps.push(Step::Mount {
            source: "tmpfs".into(),
            target: target.clone(),
            fstype: "tmpfs".into(),
            options: format!(
                "size={size},mode=0700,uid={},gid={},nosuid,nodev",
                u.uid, u.gid
            ),
        });
        for k in &kept {
            steps.push(own(target.join(k)));
            steps.push(Step::Bind {
                source: cs.join(k),
                target: target.join(k),
            });
        }
        log::info!(
            "{}'s ~/.cache in RAM (up to {}), kept on the stick: {}",
            u.name,
            human(size),
            if kept.is_empty() {
                "nothing".into()
            } else {
                kept.join(", ")
            }
        );
        caches.push(UserCache {
            user: u.name.clone(),
            path: cache_dir,
            size,
            kept,
        });
    }
    (steps, caches, notes)
}

fn kind(p: &Path) -> Kind {
    match std::fs::symlink_metadata(p) {
        Err(_) => Kind::Missing,
        Ok(m) if m.file_type().is_dir() => Kind::Dir { uid: m.uid() },
        Ok(_) => Kind::Other,
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Read the users (from the live root's `/etc/passwd`, after the
/// persistent `/etc` is mounted) and what their homes on the partition at
/// `pm` hold. Names that are not UTF-8 are left alone (never moved).
pub fn look(root: &Path, pm: &Path, s: &Settings) -> anyhow::Result<Vec<Seen>> {
    use anyhow::Context;
    let passwd = root.join("etc/passwd");
    let text = match crate::util::fsutil::read_nofollow(&passwd, 16 << 20) {
        // no user database: no users
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        r => r.with_context(|| format!("reading {}", passwd.display()))?,
    };
    let mut out = Vec::new();
    for user in parse_passwd(&String::from_utf8_lossy(&text)) {
        let Some(sh) = stick_home(&user.home, pm, s) else {
            continue;
        };
        let cache = sh.join(".cache");
        let home = kind(&sh);
        let ck = if home == Kind::Missing {
            Kind::Missing
        } else {
            kind(&cache)
        };
        let entries = if matches!(ck, Kind::Dir { .. }) {
            names(&cache)
                .into_iter()
                .map(|n| {
                    let k = kind(&cache.join(&n));
                    (n, k)
                })
                .collect()
        } else {
            vec![]
        };
        let old = kind(&sh.join(OLD));
        let old_names = if matches!(old, Kind::Dir { .. }) {
            names(&sh.join(OLD))
        } else {
            vec![]
        };
        out.push(Seen {
            user,
            stick_home: sh,
            home,
            cache: ck,
            entries,
            old,
            old_names,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::size::Size;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn alice() -> Passwd {
        Passwd {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/alice".into(),
        }
    }

    fn seen(entries: &[(&str, Kind)]) -> Seen {
        Seen {
            user: alice(),
            stick_home: p("/pm/home/alice"),
            home: Kind::Dir { uid: 1000 },
            cache: Kind::Dir { uid: 1000 },
            entries: entries
                .iter()
                .map(|(n, k)| (n.to_string(), k.clone()))
                .collect(),
            old: Kind::Missing,
            old_names: vec![],
        }
    }

    fn settings() -> Settings {
        let mut s = Settings::default();
        s.user_cache.size = Size::Bytes(64 << 20);
        s
    }

    #[test]
    fn passwd_lines() {
        let u = parse_passwd(
            "root:x:0:0::/root:/bin/bash\nalice:x:1000:1000:Alice A:/home/alice:/bin/sh\n\
             broken:x:notanumber:1::/home/b:/bin/sh\n:x:1:1::/h:/s\nshort:x:1\n",
        );
        assert_eq!(u.len(), 2);
        assert_eq!(u[1], alice());
    }

    #[test]
    fn homes_on_the_stick_are_plain_paths_under_a_bind_dir() {
        let s = settings();
        let pm = p("/pm");
        assert_eq!(
            stick_home("/home/alice/", &pm, &s),
            Some(p("/pm/home/alice"))
        );
        assert_eq!(stick_home("/home/a/b", &pm, &s), Some(p("/pm/home/a/b")));
        assert_eq!(stick_home("/home", &pm, &s), None);
        assert_eq!(stick_home("/root", &pm, &s), None);
        assert_eq!(stick_home("/home/../etc", &pm, &s), None);
        assert_eq!(stick_home("/home//x", &pm, &s), None);
        assert_eq!(stick_home("/homer/x", &pm, &s), None);
    }

    #[test]
    fn the_first_time_leftovers_move_aside_and_kept_dirs_are_bound() {
        let s = settings();
        let v = seen(&[
            ("paru", Kind::Dir { uid: 1000 }),
            ("chromium", Kind::Dir { uid: 1000 }),
            ("fontconfig", Kind::Other),
        ]);
        let (steps, caches, notes) = plan(&p("/new_root"), &s, 8 << 30, &[v]);
        let own = |q: &str| Step::MkdirAs {
            path: p(q),
            uid: 1000,
            gid: 1000,
            mode: 0o700,
        };
        assert_eq!(
            steps,
            vec![
                own("/pm/home/alice/.cache.old"),
                Step::Rename {
                    from: p("/pm/home/alice/.cache/chromium"),
                    to: p("/pm/home/alice/.cache.old/chromium")
                },
                Step::Rename {
                    from: p("/pm/home/alice/.cache/fontconfig"),
                    to: p("/pm/home/alice/.cache.old/fontconfig")
                },
                own("/pm/home/alice/.cache/mesa_shader_cache"),
                Step::Mount {
                    source: "tmpfs".into(),
                    target: p("/new_root/home/alice/.cache"),
                    fstype: "tmpfs".into(),
                    options: format!("size={},mode=0700,uid=1000,gid=1000,nosuid,nodev", 64 << 20),
                },
                own("/new_root/home/alice/.cache/paru"),
                Step::Bind {
                    source: p("/pm/home/alice/.cache/paru"),
                    target: p("/new_root/home/alice/.cache/paru")
                },
                own("/new_root/home/alice/.cache/mesa_shader_cache"),
                Step::Bind {
                    source: p("/pm/home/alice/.cache/mesa_shader_cache"),
                    target: p("/new_root/home/alice/.cache/mesa_shader_cache")
                },
            ]
        );
        assert_eq!(caches[0].kept, ["paru", "mesa_shader_cache"]);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("2 entries") && notes[0].contains("chromium, fontconfig"),
            "{notes:?}"
        );
    }

    #[test]
    fn later_boots_only_mount_and_names_taken_in_the_old_dir_are_not_reused() {
        let s = settings();
        let v = seen(&[
            ("paru", Kind::Dir { uid: 1000 }),
            ("mesa_shader_cache", Kind::Dir { uid: 1000 }),
        ]);
        let (steps, _, notes) = plan(&p("/r"), &s, 8 << 30, &[v]);
        assert!(notes.is_empty());
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Rename { .. })
                || matches!(s, Step::MkdirAs { path, .. } if path.starts_with("/pm"))),
            "{steps:?}"
        );
        assert_eq!(steps.len(), 5, "{steps:?}");
        // a cut in the middle of the moves, or a cache made while the
        // feature was off: the names already in ~/.cache.old are kept
        let mut v = seen(&[("x", Kind::Other)]);
        v.old = Kind::Dir { uid: 1000 };
        v.old_names = vec!["x".into(), "x.1".into()];
        let (steps, _, _) = plan(&p("/r"), &s, 8 << 30, &[v]);
        assert_eq!(
            steps[0],
            Step::Rename {
                from: p("/pm/home/alice/.cache/x"),
                to: p("/pm/home/alice/.cache.old/x.2")
            }
        );
    }

    #[test]
    fn refusals() {
        let s = settings();
        let mut cases = Vec::new();
        let mut v = seen(&[]);
        v.home = Kind::Dir { uid: 1001 };
        cases.push((v, "belongs to uid 1001"));
        let mut v = seen(&[]);
        v.home = Kind::Other;
        cases.push((v, "not a directory"));
        let mut v = seen(&[]);
        v.cache = Kind::Other;
        cases.push((v, ".cache on the partition is not a directory"));
        let mut v = seen(&[]);
        v.cache = Kind::Dir { uid: 0 };
        cases.push((v, "belongs to uid 0"));
        let mut v = seen(&[("junk", Kind::Other)]);
        v.old = Kind::Other;
        cases.push((v, ".cache.old is in the way"));
        for (v, why) in cases {
            let (steps, caches, notes) = plan(&p("/r"), &s, 8 << 30, &[v]);
            assert!(steps.is_empty() && caches.is_empty(), "{why}: {steps:?}");
            assert!(
                notes.len() == 1 && notes[0].contains(why),
                "{why}: {notes:?}"
            );
        }
        // a kept name that is a file (or a symlink) is not bound
        let v = seen(&[("paru", Kind::Other)]);
        let (steps, caches, notes) = plan(&p("/r"), &s, 8 << 30, &[v]);
        assert_eq!(caches[0].kept, ["mesa_shader_cache"]);
        assert!(notes[0].contains("paru is not a directory"));
        assert!(!steps.iter().any(|s| matches!(s, Step::Rename { .. })));
        // a user without a home on the stick: nothing, silently
        let mut v = seen(&[]);
        v.home = Kind::Missing;
        assert_eq!(plan(&p("/r"), &s, 8 << 30, &[v]), (vec![], vec![], vec![]));
        // the RAM tier has the cache (or a dir in it)
        let mut s2 = settings();
        s2.tier.dirs.push("/home/alice/.cache/pip".into());
        let (steps, _, notes) = plan(&p("/r"), &s2, 8 << 30, &[seen(&[])]);
        assert!(
            steps.is_empty() && notes[0].contains("RAM tier"),
            "{notes:?}"
        );
        // two users with one home: once
        let (_, caches, _) = plan(&p("/r"), &s, 8 << 30, &[seen(&[]), seen(&[])]);
        assert_eq!(caches.len(), 1);
    }
}
