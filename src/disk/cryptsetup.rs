//! The only caller of `cryptsetup` (LUKS2 on the persistence partition).
//! Every call logs its full command line, which never holds a secret:
//! passphrases go to cryptsetup over pipes (`--key-file -` on stdin, a
//! second one as `/proc/self/fd/3`: `/dev/fd` is a link only some systems
//! make), never in argv, the environment, a log or a file. A failure
//! carries cryptsetup's stderr.
//!
//! Argument building is pure (unit-tested); `luksDump --dump-json-metadata`
//! is parsed as untrusted input (bounded, every field checked).

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The LUKS2 label our volume carries (found without unlocking it).
pub const LABEL: &str = "persistence";

pub use crate::util::secret::{MAX_PASSPHRASE, Secret, wipe};

/// The argon2id cost written into a key slot. Fixed iterations
/// (`--pbkdf-force-iterations`): no benchmark, so the cost does not depend
/// on the machine that formatted the stick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Pbkdf {
    /// KiB.
    pub memory_kib: u32,
    pub iterations: u32,
    /// Lanes; cryptsetup caps them at the formatting machine's CPUs (the
    /// work and the memory stay the same, only how much of it can run in
    /// parallel changes).
    pub parallel: u32,
}

/// The default: 256 MiB, 4 passes, 4 lanes. It opens on a 1 GiB-RAM
/// machine with room to spare (see README "Encrypted persistence": the
/// measurement and why not cryptsetup's own 1 GiB).
pub const DEFAULT_PBKDF: Pbkdf = Pbkdf {
    memory_kib: 256 * 1024,
    iterations: 4,
    parallel: 4,
};

impl Pbkdf {
    /// `MEMKIB:ITER` (tests only: a cheap cost for unlocks under QEMU TCG).
    pub fn parse(s: &str) -> Result<Pbkdf> {
        let (m, i) = s
            .split_once(':')
            .context("expected MEMORY_KIB:ITERATIONS")?;
        let p = Pbkdf {
            memory_kib: m.parse().context("memory (KiB)")?,
            iterations: i.parse().context("iterations")?,
            parallel: 1,
        };
        p.check()?;
        Ok(p)
    }
    /// cryptsetup's own bounds for argon2 (memory 32 KiB..4 GiB, at
    /// least 4 iterations, 1..16 lanes).
    pub fn check(&self) -> Result<()> {
        if !(32..=4 * 1024 * 1024).contains(&self.memory_kib) {
            bail!(
                "argon2 memory {} KiB outside 32 KiB..4 GiB",
                self.memory_kib
            );
        }
        if !(4..=1 << 20).contains(&self.iterations) {
            bail!("argon2 iterations {} outside 4..2^20", self.iterations);
        }
        if !(1..=16).contains(&self.parallel) {
            bail!("argon2 lanes {} outside 1..16", self.parallel);
        }
        Ok(())
    }
}

/// `luksFormat`'s arguments: LUKS2, argon2id at `p`, the passphrase read
/// from stdin (`--key-file -`: all of it, no newline handling, so the
/// bytes are exactly the passphrase). No label yet: `label_args` sets it
/// once the filesystem inside is made, so a volume labelled `persistence`
/// is always a finished one (a cut before leaves an unlabelled header that
/// the next run formats again, never asking for a passphrase that was not
/// durable).
pub fn format_args(dev: &Path, p: &Pbkdf) -> Vec<String> {
    let mut a: Vec<String> = [
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--pbkdf",
        "argon2id",
    ]
    .map(String::from)
    .to_vec();
    a.extend([
        "--pbkdf-memory".into(),
        p.memory_kib.to_string(),
        "--pbkdf-force-iterations".into(),
        p.iterations.to_string(),
        "--pbkdf-parallel".into(),
        p.parallel.to_string(),
        "--key-file".into(),
        "-".into(),
        dev.display().to_string(),
    ]);
    a
}

/// `config --label persistence`: the last step of a creation.
pub fn label_args(dev: &Path) -> Vec<String> {
    vec![
        "config".into(),
        "--batch-mode".into(),
        "--label".into(),
        LABEL.into(),
        dev.display().to_string(),
    ]
}

/// `open`: map `dev` as /dev/mapper/`name`.
pub fn open_args(dev: &Path, name: &str) -> Vec<String> {
    vec![
        "open".into(),
        "--type".into(),
        "luks2".into(),
        "--key-file".into(),
        "-".into(),
        dev.display().to_string(),
        name.into(),
    ]
}

/// `open --readonly`: a write-protected stick.
pub fn open_read_only_args(dev: &Path, name: &str) -> Vec<String> {
    let mut a = open_args(dev, name);
    a.insert(1, "--readonly".into());
    a
}

/// `open --test-passphrase`: the passphrase checked, nothing mapped.
pub fn test_args(dev: &Path) -> Vec<String> {
    vec![
        "open".into(),
        "--type".into(),
        "luks2".into(),
        "--test-passphrase".into(),
        "--key-file".into(),
        "-".into(),
        dev.display().to_string(),
    ]
}

pub fn close_args(name: &str) -> Vec<String> {
    vec!["close".into(), name.into()]
}

/// `luksAddKey`: the existing passphrase on stdin, the new one on fd 3,
/// the new slot at the same cost as the first.
pub fn add_key_args(dev: &Path, p: &Pbkdf) -> Vec<String> {
    vec![
        "luksAddKey".into(),
        "--batch-mode".into(),
        "--pbkdf".into(),
        "argon2id".into(),
        "--pbkdf-memory".into(),
        p.memory_kib.to_string(),
        "--pbkdf-force-iterations".into(),
        p.iterations.to_string(),
        "--pbkdf-parallel".into(),
        p.parallel.to_string(),
        "--key-file".into(),
        "-".into(),
        "--new-keyfile".into(),
        "/proc/self/fd/3".into(),
        dev.display().to_string(),
    ]
}

/// `luksRemoveKey`: the slot the passphrase on stdin opens is removed.
pub fn remove_key_args(dev: &Path) -> Vec<String> {
    vec![
        "luksRemoveKey".into(),
        "--batch-mode".into(),
        "--key-file".into(),
        "-".into(),
        dev.display().to_string(),
    ]
}

pub fn header_backup_args(dev: &Path, file: &Path) -> Vec<String> {
    vec![
        "luksHeaderBackup".into(),
        "--batch-mode".into(),
        "--header-backup-file".into(),
        file.display().to_string(),
        dev.display().to_string(),
    ]
}

pub fn header_restore_args(dev: &Path, file: &Path) -> Vec<String> {
    vec![
        "luksHeaderRestore".into(),
        "--batch-mode".into(),
        "--header-backup-file".into(),
        file.display().to_string(),
        dev.display().to_string(),
    ]
}

/// `luksErase`: every key slot wiped; the volume key is gone for good.
pub fn erase_args(dev: &Path) -> Vec<String> {
    vec![
        "luksErase".into(),
        "--batch-mode".into(),
        dev.display().to_string(),
    ]
}

pub fn dump_args(dev: &Path) -> Vec<String> {
    vec![
        "luksDump".into(),
        "--dump-json-metadata".into(),
        dev.display().to_string(),
    ]
}

/// cryptsetup, never a busybox applet or a stand-in of another name.
pub fn find() -> Result<PathBuf> {
    for d in DIRS {
        let p = Path::new(d).join("cryptsetup");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("cryptsetup not found in {}", DIRS.join(":"))
}

/// How a call ended. cryptsetup's exit codes: 2 is a wrong passphrase
/// (no key slot opened), 5 the device busy or already mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    WrongPassphrase,
    Failed { code: i32, stderr: String },
}

impl Outcome {
    pub fn classify(code: i32, stdout: &[u8], stderr: &[u8]) -> Outcome {
        match code {
            0 => Outcome::Ok(String::from_utf8_lossy(stdout).into_owned()),
            2 => Outcome::WrongPassphrase,
            c => Outcome::Failed {
                code: c,
                stderr: String::from_utf8_lossy(stderr).trim().to_string(),
            },
        }
    }
    /// Ok's output, else an error naming the step.
    pub fn ok(self, what: &str) -> Result<String> {
        match self {
            Outcome::Ok(out) => Ok(out),
            Outcome::WrongPassphrase => bail!("{what}: no key slot opens with this passphrase"),
            Outcome::Failed { code, stderr } => {
                bail!("{what}: cryptsetup failed (exit {code}): {stderr}")
            }
        }
    }
}

/// A pipe already holding `data` (at most a pipe's buffer, 64 KiB; our
/// secrets are at most 512 bytes), write end closed: the read end for
/// the child.
fn pipe_with(data: &[u8]) -> Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making a pipe")?;
    let mut w = std::fs::File::from(w);
    w.write_all(data).context("writing into the pipe")?;
    drop(w);
    Ok(r)
}

/// Run cryptsetup with `args` (logged), `stdin_secret` on its stdin and
/// `fd3_secret` on its fd 3.
pub fn run(
    args: &[String],
    stdin_secret: Option<&Secret>,
    fd3_secret: Option<&Secret>,
) -> Result<Outcome> {
    let prog = find()?;
    let mut cmd = Command::new(&prog);
    cmd.args(args);
    // no locale-dependent messages, no askpass plugins from the environment
    cmd.env("LC_ALL", "C");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin_secret {
        Some(s) => {
            cmd.stdin(Stdio::from(pipe_with(s.expose())?));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    let fd3 = fd3_secret.map(|s| pipe_with(s.expose())).transpose()?;
    if let Some(fd) = &fd3 {
        let raw = fd.as_raw_fd();
        use std::os::unix::process::CommandExt;
        // SAFETY: dup2 is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec set
                let r = if raw == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(raw, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    log::info!("running {} {}", prog.display(), args.join(" "));
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", prog.display()))?;
    drop(fd3);
    let code = out.status.code().unwrap_or(-1);
    let o = Outcome::classify(code, &out.stdout, &out.stderr);
    if let Outcome::Failed { code, stderr } = &o {
        log::warn!("cryptsetup {} failed (exit {code}): {stderr}", args[0]);
    }
    Ok(o)
}

/// Format `dev` as LUKS2 (`format_args`).
pub fn format(dev: &Path, pass: &Secret, p: &Pbkdf) -> Result<()> {
    p.check()?;
    run(&format_args(dev, p), Some(pass), None)?
        .ok(&format!("formatting {} as LUKS2", dev.display()))
        .map(drop)
}

/// Label the volume `persistence` (`label_args`), then sync it.
pub fn set_label(dev: &Path) -> Result<()> {
    run(&label_args(dev), None, None)?
        .ok(&format!("labelling the LUKS2 volume on {}", dev.display()))?;
    sync_device(dev)
}

/// Map `dev` as /dev/mapper/`name`. `Ok(false)`: the passphrase opens no
/// slot (nothing mapped, nothing written).
pub fn open(dev: &Path, name: &str, pass: &Secret) -> Result<bool> {
    match run(&open_args(dev, name), Some(pass), None)? {
        Outcome::WrongPassphrase => Ok(false),
        o => o.ok(&format!("unlocking {}", dev.display())).map(|_| true),
    }
}

/// `open`, the mapping read-only.
pub fn open_read_only(dev: &Path, name: &str, pass: &Secret) -> Result<bool> {
    match run(&open_read_only_args(dev, name), Some(pass), None)? {
        Outcome::WrongPassphrase => Ok(false),
        o => o
            .ok(&format!("unlocking {} read-only", dev.display()))
            .map(|_| true),
    }
}

/// Does `pass` open a slot of `dev`? Nothing mapped.
pub fn test_passphrase(dev: &Path, pass: &Secret) -> Result<bool> {
    match run(&test_args(dev), Some(pass), None)? {
        Outcome::WrongPassphrase => Ok(false),
        o => o
            .ok(&format!("checking a passphrase on {}", dev.display()))
            .map(|_| true),
    }
}

pub fn close(name: &str) -> Result<()> {
    run(&close_args(name), None, None)?
        .ok(&format!("closing /dev/mapper/{name}"))
        .map(drop)
}

/// Can this kernel map a volume? Opening device-mapper's control node
/// loads dm_mod where it is a module (its devname alias); a node left by
/// libdevmapper on a kernel without device-mapper fails to open (ENODEV).
pub fn device_mapper_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .is_ok()
}

/// `modprobe`'s arguments for device-mapper and its crypt target.
pub fn modprobe_args() -> Vec<String> {
    vec!["-a".into(), "dm_mod".into(), "dm_crypt".into()]
}

/// At boot, before `device_mapper_available`: an initramfs that makes no
/// static device nodes (mkinitcpio's) has no /dev/mapper/control until
/// dm_mod is loaded (devtmpfs then makes it), and nothing loads it, so
/// `modprobe -a dm_mod dm_crypt` (logged; a failure only warned about,
/// the check after it says what is missing).
pub fn load_device_mapper() {
    if Path::new("/dev/mapper/control").exists() {
        return;
    }
    let Some(modprobe) = DIRS
        .iter()
        .map(|d| Path::new(d).join("modprobe"))
        .find(|p| p.is_file())
    else {
        log::warn!("no modprobe to load dm_mod and dm_crypt with");
        return;
    };
    let args = modprobe_args();
    log::info!("running {} {}", modprobe.display(), args.join(" "));
    match Command::new(&modprobe)
        .args(&args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => log::warn!(
            "{} {} failed: {}",
            modprobe.display(),
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => log::warn!("starting {}: {e}", modprobe.display()),
    }
}

pub fn mapper_path(name: &str) -> PathBuf {
    Path::new("/dev/mapper").join(name)
}

/// An unlocked volume, closed when dropped unless `keep` is called (the
/// boot hands its mapping on to the running system).
#[derive(Debug)]
pub struct Mapping {
    pub name: String,
    pub path: PathBuf,
    keep: bool,
}

impl Mapping {
    /// Unlock `dev` as /dev/mapper/`name`; an error when the passphrase
    /// opens no key slot.
    pub fn open(dev: &Path, name: &str, pass: &Secret) -> Result<Mapping> {
        if !open(dev, name, pass)? {
            bail!(
                "unlocking {}: no key slot opens with this passphrase",
                dev.display()
            );
        }
        Ok(Mapping {
            name: name.into(),
            path: mapper_path(name),
            keep: false,
        })
    }
    /// Leave it open after this value is gone.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = close(&self.name)
        {
            log::error!("{e:#}");
        }
    }
}

/// The bytes at the start of a volume we made that hold its headers and
/// key slots (cryptsetup's LUKS2 default data offset): zeroed when its
/// creation fails, so nothing half-made is taken for a volume later.
pub const HEADER_AREA: u64 = 16 << 20;

/// Zero the header area of a volume this run made on `dev` (never one
/// found there: the callers refuse to format over any LUKS header).
pub fn wipe_new_header(dev: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    let len = f.seek(SeekFrom::End(0))?.min(HEADER_AREA);
    f.seek(SeekFrom::Start(0))?;
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        done += n as u64;
    }
    f.sync_all()
        .with_context(|| format!("wiping the LUKS header made on {}", dev.display()))
}

/// Change the passphrase, crash-safe: the new one is added as a new key
/// slot, the header synced, and only then the old slot removed. A cut
/// between leaves both working; never none.
pub fn change_passphrase(dev: &Path, old: &Secret, new: &Secret, p: &Pbkdf) -> Result<()> {
    p.check()?;
    run(&add_key_args(dev, p), Some(old), Some(new))?
        .ok(&format!("adding the new passphrase to {}", dev.display()))?;
    sync_device(dev)?;
    if !test_passphrase(dev, new)? {
        bail!(
            "the new passphrase does not open {} after adding it; the old one still does",
            dev.display()
        );
    }
    run(&remove_key_args(dev), Some(old), None)?.ok(&format!(
        "removing the old passphrase from {}",
        dev.display()
    ))?;
    sync_device(dev)
}

fn sync_device(dev: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dev.display()))
}

pub fn header_backup(dev: &Path, file: &Path) -> Result<()> {
    run(&header_backup_args(dev, file), None, None)?
        .ok(&format!("backing up the LUKS header of {}", dev.display()))
        .map(drop)
}

pub fn header_restore(dev: &Path, file: &Path) -> Result<()> {
    run(&header_restore_args(dev, file), None, None)?
        .ok(&format!("restoring the LUKS header of {}", dev.display()))
        .map(drop)
}

/// Wipe every key slot (`luksErase`); the data can no longer be
/// decrypted by anyone.
pub fn erase(dev: &Path) -> Result<()> {
    run(&erase_args(dev), None, None)?
        .ok(&format!("erasing the LUKS key slots of {}", dev.display()))
        .map(drop)
}

/// What `status` shows of a volume, from `luksDump --dump-json-metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Dump {
    pub keyslots: Vec<Keyslot>,
    /// The data segment's cipher and where the data starts.
    pub cipher: String,
    pub data_offset: u64,
    pub sector_size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Keyslot {
    pub id: u32,
    pub kdf: String,
    pub memory_kib: Option<u32>,
    pub iterations: u32,
    pub cpus: Option<u32>,
}

/// More is not a LUKS2 header's JSON we made (its JSON area is 12 KiB;
/// the format allows 4 MiB).
pub const MAX_DUMP: usize = 64 * 1024;
const MAX_SLOTS: usize = 32;

/// Parse `luksDump --dump-json-metadata` output: untrusted (it is the
/// header's JSON as written on the stick). Bounded size, at most 32
/// slots, every number checked; anything else is an error.
pub fn parse_dump(text: &[u8]) -> Result<Dump> {
    if text.len() > MAX_DUMP {
        bail!(
            "LUKS2 metadata of {} bytes: more than {MAX_DUMP}",
            text.len()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(text).context("LUKS2 metadata is not JSON")?;
    let num = |x: &serde_json::Value, what: &str| -> Result<u64> {
        match x {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .with_context(|| format!("LUKS2 metadata: {what} is not a number"))
    };
    let small = |x: &serde_json::Value, what: &str| -> Result<u32> {
        u32::try_from(num(x, what)?).with_context(|| format!("LUKS2 metadata: {what} too large"))
    };
    let slots = v
        .get("keyslots")
        .and_then(|k| k.as_object())
        .context("LUKS2 metadata: no keyslots")?;
    if slots.len() > MAX_SLOTS {
        bail!("LUKS2 metadata: {} key slots", slots.len());
    }
    let mut keyslots = vec![];
    for (id, s) in slots {
        let id: u32 = id.parse().context("LUKS2 metadata: a key slot id")?;
        let kdf = s
            .get("kdf")
            .context("LUKS2 metadata: a key slot without kdf")?;
        let kind = kdf
            .get("type")
            .and_then(|t| t.as_str())
            .filter(|t| t.len() <= 32)
            .context("LUKS2 metadata: kdf type")?
            .to_string();
        let (memory_kib, iterations, cpus) = if kind.starts_with("argon2") {
            (
                Some(small(
                    kdf.get("memory").unwrap_or(&serde_json::Value::Null),
                    "kdf memory",
                )?),
                small(
                    kdf.get("time").unwrap_or(&serde_json::Value::Null),
                    "kdf time",
                )?,
                Some(small(
                    kdf.get("cpus").unwrap_or(&serde_json::Value::Null),
                    "kdf cpus",
                )?),
            )
        } else {
            (
                None,
                small(
                    kdf.get("iterations").unwrap_or(&serde_json::Value::Null),
                    "kdf iterations",
                )?,
                None,
            )
        };
        keyslots.push(Keyslot {
            id,
            kdf: kind,
            memory_kib,
            iterations,
            cpus,
        });
    }
    keyslots.sort_by_key(|k| k.id);
    let seg = v
        .get("segments")
        .and_then(|s| s.get("0"))
        .context("LUKS2 metadata: no segment 0")?;
    let cipher = seg
        .get("encryption")
        .and_then(|e| e.as_str())
        .filter(|e| e.len() <= 64)
        .context("LUKS2 metadata: segment cipher")?
        .to_string();
    Ok(Dump {
        keyslots,
        cipher,
        data_offset: num(
            seg.get("offset").unwrap_or(&serde_json::Value::Null),
            "segment offset",
        )?,
        sector_size: small(
            seg.get("sector_size").unwrap_or(&serde_json::Value::Null),
            "sector size",
        )?,
    })
}

/// `luksDump --dump-json-metadata` of `dev`, parsed.
pub fn dump(dev: &Path) -> Result<Dump> {
    let out = run(&dump_args(dev), None, None)?
        .ok(&format!("reading the LUKS2 header of {}", dev.display()))?;
    parse_dump(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},
      "area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},
      "kdf":{"type":"argon2id","time":4,"memory":262144,"cpus":2,"salt":"6rbW"}}},
      "tokens":{},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
      "encryption":"aes-xts-plain64","sector_size":4096}},"digests":{},"config":{"json_size":"12288","keyslots_size":"16744448"}}"#;

    #[test]
    fn modprobe_loads_device_mapper_and_its_crypt_target() {
        assert_eq!(modprobe_args(), ["-a", "dm_mod", "dm_crypt"]);
    }

    #[test]
    fn format_args_fix_the_cost_and_keep_the_passphrase_off_the_command_line() {
        let a = format_args(Path::new("/dev/sdb3"), &DEFAULT_PBKDF).join(" ");
        assert_eq!(
            a,
            "luksFormat --batch-mode --type luks2 --pbkdf argon2id --pbkdf-memory 262144 \
             --pbkdf-force-iterations 4 --pbkdf-parallel 4 --key-file - /dev/sdb3"
        );
        assert_eq!(
            label_args(Path::new("/dev/sdb3")).join(" "),
            "config --batch-mode --label persistence /dev/sdb3"
        );
        let o = open_args(Path::new("/dev/sdb3"), "mados-persistence").join(" ");
        assert_eq!(
            o,
            "open --type luks2 --key-file - /dev/sdb3 mados-persistence"
        );
        let k = add_key_args(Path::new("/dev/sdb3"), &DEFAULT_PBKDF).join(" ");
        assert!(
            k.contains("--key-file - --new-keyfile /proc/self/fd/3 /dev/sdb3"),
            "{k}"
        );
        assert!(k.contains("--pbkdf-force-iterations 4"), "{k}");
        assert_eq!(
            remove_key_args(Path::new("/d")).join(" "),
            "luksRemoveKey --batch-mode --key-file - /d"
        );
        assert_eq!(
            erase_args(Path::new("/d")).join(" "),
            "luksErase --batch-mode /d"
        );
        assert_eq!(
            header_backup_args(Path::new("/d"), Path::new("/f")).join(" "),
            "luksHeaderBackup --batch-mode --header-backup-file /f /d"
        );
        assert_eq!(
            test_args(Path::new("/d")).join(" "),
            "open --type luks2 --test-passphrase --key-file - /d"
        );
    }

    #[test]
    fn pbkdf_bounds() {
        assert!(DEFAULT_PBKDF.check().is_ok());
        assert_eq!(
            Pbkdf::parse("65536:4").unwrap(),
            Pbkdf {
                memory_kib: 65536,
                iterations: 4,
                parallel: 1
            }
        );
        assert!(Pbkdf::parse("16:4").is_err(), "below argon2's 32 KiB");
        assert!(
            Pbkdf::parse("65536:1").is_err(),
            "cryptsetup wants 4 passes at least"
        );
        assert!(Pbkdf::parse("65536").is_err());
        assert!(Pbkdf::parse("x:4").is_err());
    }

    #[test]
    fn outcomes() {
        assert_eq!(Outcome::classify(0, b"x", b""), Outcome::Ok("x".into()));
        assert_eq!(
            Outcome::classify(2, b"", b"No key available"),
            Outcome::WrongPassphrase
        );
        let f = Outcome::classify(5, b"", b"Device busy\n");
        assert_eq!(
            f,
            Outcome::Failed {
                code: 5,
                stderr: "Device busy".into()
            }
        );
        let e = f.ok("unlocking /dev/sdb3").unwrap_err().to_string();
        assert!(
            e.contains("exit 5") && e.contains("Device busy") && e.contains("unlocking"),
            "{e}"
        );
        assert!(
            Outcome::WrongPassphrase
                .ok("x")
                .unwrap_err()
                .to_string()
                .contains("passphrase")
        );
    }

    #[test]
    fn dump_parsed_from_cryptsetups_own_output() {
        let d = parse_dump(SAMPLE.as_bytes()).unwrap();
        assert_eq!(
            d,
            Dump {
                keyslots: vec![Keyslot {
                    id: 0,
                    kdf: "argon2id".into(),
                    memory_kib: Some(262144),
                    iterations: 4,
                    cpus: Some(2)
                }],
                cipher: "aes-xts-plain64".into(),
                data_offset: 16 << 20,
                sector_size: 4096,
            }
        );
    }

    #[test]
    fn hostile_dumps_are_errors_not_panics() {
        assert!(parse_dump(&vec![b' '; MAX_DUMP + 1]).is_err());
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"keyslots":[]}"#,
            r#"{"keyslots":{"x":{}},"segments":{}}"#,
            r#"{"keyslots":{"0":{"kdf":{"type":"argon2id","time":-1,"memory":1,"cpus":1}}},"segments":{}}"#,
            r#"{"keyslots":{"0":{"kdf":{"type":"argon2id","time":4,"memory":99999999999,"cpus":1}}},"segments":{}}"#,
            r#"{"keyslots":{},"segments":{"0":{"encryption":"aes","offset":"-5","sector_size":512}}}"#,
        ] {
            assert!(parse_dump(bad.as_bytes()).is_err(), "{bad}");
        }
        let many: String = (0..40)
            .map(|i| format!(r#""{i}":{{"kdf":{{"type":"pbkdf2","iterations":1000}}}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let doc = format!(
            r#"{{"keyslots":{{{many}}},"segments":{{"0":{{"encryption":"a","offset":"0","sector_size":512}}}}}}"#
        );
        assert!(
            parse_dump(doc.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("40 key slots")
        );
        // seeded mutations of the real sample: never a panic
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..3000 {
            let mut b = SAMPLE.as_bytes().to_vec();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
            }
            let _ = parse_dump(&b);
        }
    }
}
