//! `enable`: create persistence on the boot stick (or `--device`) with the
//! same planning and safety code as `boot`, and save the RAM session into it.

use super::{
    RUN_DIR, TempMount, active_on, confirm, in_use, pending_path, read_state, refuse,
    running_settings, step, target_device,
};
use crate::boot::{flags, iso_build, mounts, session};
use crate::disk::blockdev;
use crate::disk::cryptsetup::Pbkdf;
use crate::disk::mountinfo;
use crate::disk::stick::{
    self, Encrypt, Existing, Origin, Prepared, find_encrypted, find_persistence, open_device,
};
use crate::settings::config::Settings;
use crate::settings::size::human;
use crate::util::secret::Secret;
use crate::util::treecopy;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `enable --encrypt`: where the passphrase comes from and the cost.
pub struct EncryptOpts {
    /// A file holding it (one trailing newline is not part of it), `-`
    /// for stdin; none: asked twice on the terminal.
    pub passphrase_file: Option<PathBuf>,
    pub pbkdf: Pbkdf,
}

/// The new passphrase: from the file or stdin, else typed twice on the
/// terminal (echo off), the same both times.
fn new_passphrase(from: Option<&Path>) -> Result<Secret> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(crate::util::secret::MAX_PASSPHRASE + 2);
    match from {
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .lock()
                .take(crate::util::secret::MAX_PASSPHRASE as u64 + 2)
                .read_to_end(&mut buf)
                .context("reading the passphrase from stdin")?;
            return Secret::from_file_bytes(buf);
        }
        Some(p) => {
            std::fs::File::open(p)
                .and_then(|f| {
                    f.take(crate::util::secret::MAX_PASSPHRASE as u64 + 2)
                        .read_to_end(&mut buf)
                })
                .with_context(|| format!("reading the passphrase from {}", p.display()))?;
            return Secret::from_file_bytes(buf);
        }
        None => {}
    }
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| {
            super::Refused(
                "no terminal to type a passphrase on; pass --passphrase-file FILE (or -)".into(),
            )
        })?;
    use crate::util::prompt::{Entry, ask_hidden};
    for _ in 0..3 {
        let mut out = &tty;
        let first = match ask_hidden(
            &tty,
            &mut out,
            "New passphrase for the persistence partition: ",
            None,
        )? {
            Entry::Line(p) => p,
            _ => return refuse("no passphrase entered; nothing was changed"),
        };
        let second = match ask_hidden(&tty, &mut out, "The same passphrase again: ", None)? {
            Entry::Line(p) => p,
            _ => return refuse("no passphrase entered; nothing was changed"),
        };
        if first.same_as(&second) {
            return Ok(first);
        }
        println!("The two entries differ; again.");
    }
    refuse("the passphrase was not entered the same twice; nothing was changed")
}

pub fn enable(
    device: Option<PathBuf>,
    size: Option<crate::settings::size::Size>,
    yes: bool,
    encrypt: Option<EncryptOpts>,
) -> Result<()> {
    let s = &running_settings();
    let st = read_state();
    let disk = target_device(device, st.as_ref(), "enable")?;
    let is_boot = st
        .as_ref()
        .and_then(|s| s.boot_device.as_ref())
        .is_some_and(|b| mountinfo::same_device(Path::new(&b.disk), &disk));
    let mut o = open_device(&disk, false)?;
    if let Some(e) = find_encrypted(&mut o, &s.label) {
        println!(
            "{} already has encrypted persistence (partition {}, {}); nothing to create.",
            disk.display(),
            e.number,
            crate::settings::size::human(e.size)
        );
        return Ok(());
    }
    if encrypt.is_some()
        && let Some(e) = find_persistence(&mut o, &s.label)
    {
        return refuse(format!(
            "{} already has persistence in clear (partition {}); encrypting it in place is not built. \
             To start over encrypted: save what you keep, `mados-persistence remove` (its data is lost), \
             then `mados-persistence enable --encrypt`",
            disk.display(),
            e.number
        ));
    }
    if encrypt.is_some() && !crate::disk::cryptsetup::device_mapper_available() {
        return refuse(format!(
            "this kernel cannot map an encrypted volume (no device-mapper: /dev/mapper/control does not \
             open; dm_mod and dm_crypt are needed); nothing was written to {}",
            disk.display()
        ));
    }
    if let Some(e) = find_persistence(&mut o, &s.label) {
        // idempotent: already there; enable only clears disable/remove requests
        let cleared = match active_on(st.as_ref(), e.number, &disk) {
            Some(pm) => flags::clear(&pm)?,
            None => flags::clear(&TempMount::new(&disk, o.block, &e, false)?.dir)?,
        };
        let _ = std::fs::remove_file(pending_path());
        println!(
            "{} already has persistence (partition {}, {}); nothing to create.",
            disk.display(),
            e.number,
            crate::settings::size::human(e.size)
        );
        if cleared {
            println!("The request to disable or remove it was cleared: the next boot uses it.");
        }
        return Ok(());
    }
    if o.block && !is_boot {
        let busy = in_use(&disk);
        if !busy.is_empty() {
            return refuse(format!(
                "{} is in use ({})",
                disk.display(),
                busy.join(", ")
            ));
        }
    }
    let mut settings = s.clone();
    if let Some(sz) = size {
        settings.max_size = Some(sz);
    }
    let prepared = match stick::prepare(&mut o, &settings) {
        Ok(p) => p,
        Err(e) => {
            return refuse(format!(
                "not creating persistence on {}: {e:#}",
                disk.display()
            ));
        }
    };
    let (number, start, len) = prepared.partition();
    match &prepared {
        Prepared::Resume(c) => println!(
            "Partition {number} on {} (byte {start}, {}) was started by an earlier run that did not finish \
             (a power cut or a pulled stick). Will finish it: write its table entry again and format it.\n\
             Table sectors that will hold what that run meant to write: {}.",
            disk.display(),
            human(len),
            c.backup
                .regions
                .iter()
                .map(|r| r.what.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Prepared::Adopt(plan) | Prepared::Create(plan) => {
            if matches!(prepared, Prepared::Adopt(_)) {
                println!(
                    "A '{}' filesystem is already in the free space at byte {start} ({}), left by an earlier \
                     release on this stick. Will put its partition entry back exactly there and NOT format it: \
                     its data is kept.",
                    settings.label,
                    human(len)
                );
            } else {
                println!(
                    "Will create partition {number} on {} in the {} table: byte {start} to {} ({}), {}ext4 labelled '{}'.",
                    disk.display(),
                    format!("{:?}", plan.table).to_uppercase(),
                    start + len,
                    human(len),
                    if encrypt.is_some() {
                        "encrypted (LUKS2, argon2id, labelled 'persistence'), holding "
                    } else {
                        ""
                    },
                    settings.label
                );
            }
            println!(
                "Nothing before byte {} (the ISO, its EFI partition, the tables) is changed but these sectors:",
                plan.used_end
            );
            for w in &plan.writes {
                println!("  {} bytes at {}: {}", w.len, w.offset, w.what);
            }
        }
    }
    if encrypt.is_none() && stick::unfinished_encrypted(&mut o, &settings.label) {
        return refuse(format!(
            "partition {number} on {} was being created encrypted when it was cut; it is finished \
             encrypted only: run `mados-persistence enable --encrypt`",
            disk.display()
        ));
    }
    let adopt_encrypted = prepared.origin() == Origin::Adopted
        && stick::encrypted_at(&mut o, start, len, &settings.label);
    if encrypt.is_some() && prepared.origin() == Origin::Adopted && !adopt_encrypted {
        return refuse(format!(
            "{} holds a clear persistence filesystem left by an earlier release: it is restored as it \
             was, not encrypted over (its data would be lost): run `enable` without --encrypt, or wipe it \
             first",
            disk.display()
        ));
    }
    confirm("Go on?", None, yes)?;
    let enc = match &encrypt {
        // an encrypted volume to adopt keeps its own passphrase
        Some(_) if adopt_encrypted => None,
        Some(opts) => Some(Encrypt {
            passphrase: new_passphrase(opts.passphrase_file.as_deref())?,
            pbkdf: opts.pbkdf,
            mapper: format!("mados-persistence-new-{}", std::process::id()),
        }),
        None => None,
    };
    drop(o);
    let total = if is_boot { 3 } else { 2 };
    step(
        1,
        total,
        &match prepared.origin() {
            Origin::Adopted => format!("restoring the entry of partition {number} (no formatting)"),
            _ => format!(
                "writing partition {number} (a backup of every table sector it touches is kept first) and \
                 formatting {} with mke2fs; this can take a minute on a slow stick",
                human(len)
            ),
        },
    );
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(RUN_DIR)?;
    // Decide again on the device opened for writing; go on only if that is
    // still what was shown.
    let mut w = stick::open_device(&disk, true)?;
    let again = stick::prepare(&mut w, &settings)?;
    if again.partition() != (number, start, len) || again.origin() != prepared.origin() {
        return refuse(format!(
            "{} changed while you were asked; nothing was written",
            disk.display()
        ));
    }
    let c = stick::execute(w, &disk, &settings, again, Path::new(RUN_DIR), enc.as_ref())?;
    drop(enc);
    println!("      done in {:.1} s", t0.elapsed().as_secs_f64());
    let e = Existing {
        number: c.number,
        start: c.start,
        size: c.size,
        uuid: String::new(),
    };
    let backup = c.backup.clone();
    let c_origin = c.origin;
    if adopt_encrypted {
        drop(c);
        println!(
            "Persistence restored on {} (partition {}, its data kept): it is encrypted, and the next boot \
             asks for its passphrase. This session's changes are not copied into it (it is not unlocked here).",
            disk.display(),
            e.number
        );
        return Ok(());
    }
    // an encrypted one is mounted through the volume `execute` left open
    // (closed after the unmount: `m` is dropped before `_open`)
    let (_open, m) = match c.mapping.is_some() {
        true => {
            step(2, total, "saving the table backup on the new partition");
            let m = super::TempMount::on(&c.target, false, None)?;
            (Some(c), m)
        }
        false => {
            drop(c);
            step(2, total, "saving the table backup on the new partition");
            (
                None,
                TempMount::new(&disk, blockdev::is_block_device(&disk), &e, false)?,
            )
        }
    };
    flags::write_backup(&m.dir, &backup)?;
    if is_boot {
        step(3, total, "copying this session's changes into it");
        // a filesystem adopted from an earlier release holds that build's
        // overlays: set them aside first (as the next boot would), so the
        // session goes into fresh overlays and is not set aside with them
        if let Some(cur) = st.as_ref().and_then(|s| s.iso.as_ref())
            && let Some(ch) = iso_build::reconcile(&m.dir, cur, settings.on_iso_change)
                .context("checking which ISO build the partition's overlays belong to")?
        {
            // the path as it is on the partition (this mount is temporary)
            let on_part = ch.set_aside.as_ref().map(|p| {
                let p = Path::new(p);
                format!(
                    "the partition's {}",
                    p.strip_prefix(&m.dir).unwrap_or(p).display()
                )
            });
            println!(
                "      {}",
                iso_build::describe(&iso_build::IsoChange {
                    set_aside: on_part,
                    ..ch
                })
            );
        }
        // all or nothing: copied into a staging dir, made durable and
        // marked complete, then put in place (a cut before the mark drops
        // the copy at the next boot; after it, the next boot finishes)
        let saved = save_session(&session::staging(&m.dir), &settings)?;
        session::mark_complete(&m.dir)?;
        session::finish(&m.dir)?;
        crate::util::fsutil::write_atomic(&pending_path(), b"enabled\n")?;
        nix::unistd::syncfs(std::fs::File::open(&m.dir)?).context("syncing the partition")?;
        println!(
            "      saved {} entries ({}B) of this session",
            saved.entries,
            human(saved.bytes)
        );
        if !saved.not_carried.is_empty() {
            drop(m);
            anyhow::bail!(
                "persistence was created on {} and takes effect at the next boot, but these parts of this \
                 session were NOT saved:\n  {}",
                disk.display(),
                saved.not_carried.join("\n  ")
            );
        }
    }
    drop(m);
    drop(_open);
    if encrypt.is_some() {
        println!(
            "It is encrypted: every boot asks for the passphrase on the console before using it. Nobody \
             can recover the data without it. The boot can unlock it only if the ISO's initramfs carries \
             cryptsetup and dm_crypt (the builder's `encrypt = true`, README \"Encrypted persistence\"); \
             otherwise it boots in RAM mode, reason 'locked'."
        );
    }
    println!(
        "Persistence {} on {} (partition {}).{}",
        match c_origin {
            Origin::Created => "created",
            Origin::Resumed => "finished",
            Origin::Adopted => "restored (its data kept)",
        },
        disk.display(),
        e.number,
        if is_boot {
            " It takes effect at the next boot; this session's changes so far are in it."
        } else {
            ""
        }
    );
    Ok(())
}

/// A writable live root that is not an overlay (dracut's device-mapper
/// snapshot, a root copied to RAM) holds this session's changes mixed
/// with the image: they cannot be told apart, so they are not saved, and
/// `enable` must say so rather than claim the session was saved.
fn unsaved_root(root: Option<(&str, &str)>, writable: bool) -> Option<String> {
    match root {
        Some((fstype, source)) if writable && fstype != "overlay" => Some(format!(
            "this session's changes to the live root: / is {fstype} on {source} (a device-mapper \
             snapshot or a copy of the image), not an overlay, so they cannot be told from the image \
             (the bind dirs, /home, were saved)"
        )),
        _ => None,
    }
}

/// Save the RAM session on the new partition, from wherever it really is:
/// the upper layer of every overlay that holds this session's changes,
/// found in the overlays' own mount options (archiso's root overlay, whose
/// upper is `/run/archiso/cowspace/<cow_directory>/upperdir`; dracut's; our
/// own RAM-mode overlays on /etc /usr /var /opt), copied faithfully
/// (whiteouts, opaque dirs, xattrs, owners, modes, times, links, nodes);
/// the bind dirs (`/home`) as they are now, into `pm` laid out like the
/// partition (the staging dir of `boot::session`). Returns what was saved
/// and what could not be.
fn save_session(pm: &Path, s: &Settings) -> Result<treecopy::Report> {
    let mi = mountinfo::read();
    let upper_of = |mountpoint: &str| {
        mountinfo::at(&mi, mountpoint)
            .filter(|m| m.fstype == "overlay")
            .and_then(|m| m.option("upperdir"))
            .map(PathBuf::from)
    };
    let root_upper = upper_of("/");
    let mut total = treecopy::Report::default();
    if root_upper.is_none() {
        let root = mountinfo::at(&mi, "/");
        let writable = nix::sys::statvfs::statvfs("/")
            .is_ok_and(|v| !v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
        total.not_carried.extend(unsaved_root(
            root.map(|m| (m.fstype.as_str(), m.source.as_str())),
            writable,
        ));
    }
    let mut add = |r: treecopy::Report| {
        total.entries += r.entries;
        total.bytes += r.bytes;
        total.not_carried.extend(r.not_carried);
    };
    for d in &s.overlay_dirs {
        let esc = mounts::escape(d);
        let dst = pm.join("overlays").join(&esc).join("upper");
        // the root overlay's changes under d, then an overlay on d itself
        // (it lies above the root overlay, so it is copied last)
        let sources = [
            root_upper
                .as_ref()
                .map(|u| u.join(d.trim_start_matches('/'))),
            upper_of(d),
        ];
        for src in sources.into_iter().flatten() {
            if src.is_dir() {
                add(treecopy::copy(&src, &dst).with_context(|| format!("saving {d}"))?);
            }
        }
        std::fs::create_dir_all(pm.join("overlays").join(&esc).join("work"))?;
    }
    for d in &s.bind_dirs {
        let src = Path::new(d);
        if src.is_dir() {
            let dst = pm.join(mounts::escape(d));
            add(treecopy::copy(src, &dst).with_context(|| format!("saving {d}"))?);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::unsaved_root;

    #[test]
    fn a_writable_root_that_is_not_an_overlay_is_not_claimed_saved() {
        assert_eq!(unsaved_root(Some(("overlay", "airootfs")), true), None);
        assert_eq!(unsaved_root(Some(("squashfs", "/dev/loop0")), false), None);
        assert_eq!(unsaved_root(None, true), None);
        let n = unsaved_root(Some(("ext4", "/dev/mapper/live-rw")), true).unwrap();
        assert!(
            n.contains("/dev/mapper/live-rw") && n.contains("not an overlay"),
            "{n}"
        );
    }
}
