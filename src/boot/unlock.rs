//! Unlocking an encrypted persistence partition at boot: the passphrase
//! asked through plymouth when its daemon runs, else on the console with
//! echo off (three tries; an empty entry, Esc or nobody answering within
//! `TIMEOUT`: this boot in RAM mode, reason `locked`), `cryptsetup open`
//! (a wrong passphrase writes nothing on the partition), the mapping kept
//! for the running system.

use crate::boot::detect::Reason;
use crate::boot::state::Encryption;
use crate::disk::cryptsetup;
use crate::disk::luks::Luks2Header;
use crate::disk::stick::Encrypt;
use crate::util::plymouth;
use crate::util::prompt::{self, Entry, Unlocked};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The mapping the boot leaves open: /dev/mapper/mados-persistence.
pub const MAPPER: &str = "mados-persistence";
pub const TRIES: u32 = 3;
/// How long one question waits for an answer before the boot goes on in
/// RAM mode (an unattended machine still boots).
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// Where the question is asked.
pub const CONSOLE: &str = "/dev/console";

/// Where the questions are asked: plymouth when it runs (`plymouth
/// --ping`), else the console.
enum Asker {
    Plymouth(PathBuf),
    Console(File),
}

impl Asker {
    /// Plymouth if it runs, else `CONSOLE` opened (its error when it
    /// cannot be).
    fn new() -> std::io::Result<Asker> {
        if let Some(c) = plymouth::choose(plymouth::find(), plymouth::running) {
            log::info!("asking through plymouth ({})", c.display());
            return Ok(Asker::Plymouth(c));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(CONSOLE)
            .map(Asker::Console)
    }
    /// What state.json's `unlocked_by` says.
    fn name(&self) -> &'static str {
        match self {
            Asker::Plymouth(_) => "plymouth",
            Asker::Console(_) => "console",
        }
    }
    fn ask(&self, question: &str) -> anyhow::Result<Entry> {
        match self {
            Asker::Plymouth(c) => plymouth::ask(c, question, Some(TIMEOUT)),
            Asker::Console(console) => {
                let mut out = console;
                prompt::ask_hidden(console, &mut out, question, Some(TIMEOUT))
            }
        }
    }
    fn say(&self, msg: &str) {
        match self {
            Asker::Plymouth(c) => plymouth::say(c, msg),
            Asker::Console(console) => {
                use std::io::Write;
                let mut c = console;
                let _ = writeln!(c, "{msg}");
            }
        }
    }
}

/// What state.json says of the volume before it is unlocked.
pub fn describe(part: &Path, h: &Luks2Header) -> Encryption {
    describe_uuid(part, &h.uuid)
}

fn describe_uuid(part: &Path, uuid: &str) -> Encryption {
    let mut e = Encryption {
        device: part.display().to_string(),
        luks_version: 2,
        uuid: uuid.into(),
        ..Default::default()
    };
    match cryptsetup::dump(part) {
        Ok(d) => {
            e.key_slots = d.keyslots.len() as u32;
            if let Some(k) = d.keyslots.first() {
                e.pbkdf = k.kdf.clone();
                e.pbkdf_memory_kib = k.memory_kib;
                e.pbkdf_iterations = Some(k.iterations);
            }
        }
        Err(err) => log::warn!("reading the LUKS2 metadata of {}: {err:#}", part.display()),
    }
    e
}

/// Ask and unlock `part` (the partition node or a loop device over it) as
/// /dev/mapper/`MAPPER`. `Ok`: the mapper node to check and mount.
pub fn unlock(part: &Path, read_only: bool, e: &mut Encryption) -> Result<PathBuf, Reason> {
    if let Err(err) = cryptsetup::find() {
        return Err(Reason::new(
            "locked",
            format!(
                "{} is encrypted but this initramfs cannot unlock it ({err:#}; see README \"Encrypted \
                 persistence\" for the builder's setting)",
                part.display()
            ),
        ));
    }
    cryptsetup::load_device_mapper();
    if !cryptsetup::device_mapper_available() {
        return Err(Reason::new(
            "locked",
            format!(
                "{} is encrypted but this initramfs cannot unlock it (no device-mapper: dm_mod/dm_crypt \
                 missing; see README \"Encrypted persistence\" for the builder's setting)",
                part.display()
            ),
        ));
    }
    let asker = match Asker::new() {
        Ok(a) => a,
        Err(err) => {
            return Err(Reason::new(
                "locked",
                format!(
                    "{} is encrypted and there is no console to ask for its passphrase on ({CONSOLE}: {err})",
                    part.display()
                ),
            ));
        }
    };
    let question = format!(
        "\nPassphrase for the encrypted persistence on {} (Enter alone: this boot without it, in RAM): ",
        part.display()
    );
    let r = prompt::unlock_loop(
        TRIES,
        |_| asker.ask(&question),
        |pass| {
            log::info!("unlocking {} (LUKS2)", part.display());
            let opened = if read_only {
                cryptsetup::open_read_only(part, MAPPER, pass)
            } else {
                cryptsetup::open(part, MAPPER, pass)
            }?;
            Ok(opened.then_some(()))
        },
        |msg| {
            asker.say(msg);
            log::warn!("{msg}");
        },
    );
    match r {
        Unlocked::Open { try_no, .. } => {
            e.unlocked = true;
            e.unlocked_by = Some(asker.name().into());
            e.tries = try_no;
            e.mapper = Some(cryptsetup::mapper_path(MAPPER).display().to_string());
            log::info!("{} unlocked at try {try_no}", part.display());
            Ok(cryptsetup::mapper_path(MAPPER))
        }
        Unlocked::Locked(why) => Err(Reason::new(
            "locked",
            format!(
                "the encrypted persistence on {} was not unlocked ({why}); this boot runs in RAM and \
                 nothing on the partition was changed. The next boot asks again",
                part.display()
            ),
        )),
    }
}

/// The settings ask for encrypted persistence and none exists: a new
/// passphrase, asked twice (plymouth or the console). `Err`: this boot
/// runs in RAM (no passphrase, no way to encrypt here); no clear
/// partition is ever made instead. `Ok`: with which prompt asked it.
pub fn ask_new(
    disk: &Path,
    s: &crate::settings::config::Settings,
) -> Result<(Encrypt, &'static str), Reason> {
    let unavailable = |why: String| {
        Reason::new(
            "encrypt_unavailable",
            format!(
                "encrypted persistence is asked for, but {why}; this boot runs in RAM and no clear \
                 partition is made on {}",
                disk.display()
            ),
        )
    };
    if let Err(e) = cryptsetup::find() {
        return Err(unavailable(format!("{e:#}")));
    }
    cryptsetup::load_device_mapper();
    if !cryptsetup::device_mapper_available() {
        return Err(unavailable(
            "this initramfs has no device-mapper (dm_mod, dm_crypt)".into(),
        ));
    }
    let pbkdf = match &s.test_pbkdf {
        Some(t) => match cryptsetup::Pbkdf::parse(t) {
            Ok(p) => {
                log::warn!(
                    "mados.persistence.test_pbkdf={t}: a test-only argon2id cost ({} KiB, {} passes), \
                     weaker than the default",
                    p.memory_kib,
                    p.iterations
                );
                p
            }
            Err(e) => {
                return Err(unavailable(format!(
                    "mados.persistence.test_pbkdf={t}: {e:#}"
                )));
            }
        },
        None => cryptsetup::DEFAULT_PBKDF,
    };
    let asker = Asker::new().map_err(|e| {
        unavailable(format!(
            "there is no console to ask for a passphrase on ({CONSOLE}: {e})"
        ))
    })?;
    let first = format!(
        "\nNew passphrase for the encrypted persistence on {} (Enter alone: this boot in RAM, asked again next boot): ",
        disk.display()
    );
    let r = prompt::new_passphrase_loop(
        TRIES,
        |again| {
            let q = if again {
                "The same passphrase again: "
            } else {
                first.as_str()
            };
            asker.ask(q)
        },
        |msg| asker.say(msg),
    );
    match r {
        Ok(passphrase) => Ok((
            Encrypt {
                passphrase,
                pbkdf,
                mapper: MAPPER.into(),
            },
            asker.name(),
        )),
        Err(why) => Err(Reason::new(
            "no_passphrase",
            format!(
                "encrypted persistence is asked for and no passphrase was set ({why}); this boot runs in \
                 RAM, nothing was written to {}, and the next boot asks again",
                disk.display()
            ),
        )),
    }
}

/// state.json's `encryption` for a volume made at this boot, its
/// passphrase asked by the `asked_by` prompt.
pub fn describe_new(part: &Path, asked_by: &str) -> Encryption {
    let uuid = std::fs::File::open(part)
        .ok()
        .and_then(|mut f| crate::disk::luks::probe(&mut f).ok().flatten())
        .map(|h| h.uuid)
        .unwrap_or_default();
    let mut e = describe_uuid(part, &uuid);
    e.unlocked = true;
    e.unlocked_by = Some(format!("{asked_by}-new"));
    e.tries = 1;
    e.mapper = Some(cryptsetup::mapper_path(MAPPER).display().to_string());
    e
}
