//! e2fsprogs' own programs: `mke2fs` and `e2fsck`. Every call logs its full
//! command line; a failure carries the program's output.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

const DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Options for a new persistence filesystem. Inode tables and journal are
/// written at mkfs time (not lazily by the kernel afterwards), so the first
/// session is not slowed, and no background zeroing is left behind, on a
/// slow stick; see README "First-boot cost" for the measurement behind it.
pub const MKFS_EXTENDED: &str = "lazy_itable_init=0,lazy_journal_init=0";

/// At most about this many inodes: a live system's changes, installed
/// packages and /home fit in far fewer (a whole Arch desktop has ~400k
/// files), and every inode is 256 bytes mke2fs writes at creation.
pub const MAX_INODES: u64 = 1 << 20;
/// The journal: 64 MiB whatever the size (mke2fs's default grows to 1 GiB,
/// all of it zeroed at creation).
pub const JOURNAL_MIB: u64 = 64;

/// mke2fs's arguments for a filesystem of `size` bytes labelled `label`.
/// The bytes written at creation stay about constant above 16 GiB (inode
/// tables ≤ 256 MiB, journal 64 MiB), so the first boot on a slow stick
/// does not grow with the stick.
pub fn mkfs_args(label: &str, size: u64) -> Vec<String> {
    let ratio = (size / MAX_INODES).next_power_of_two().max(16384);
    let mut a: Vec<String> = ["-q", "-t", "ext4", "-L", label, "-m", "1", "-i"]
        .map(String::from)
        .to_vec();
    a.push(ratio.to_string());
    if size >= 2 << 30 {
        a.push("-J".into());
        a.push(format!("size={JOURNAL_MIB}"));
    }
    a.push("-E".into());
    a.push(MKFS_EXTENDED.into());
    a
}

/// Find e2fsprogs' program, never a busybox applet of the same name
/// (busybox's mke2fs lacks ext4 features and -E options).
pub fn find(prog: &str) -> Result<PathBuf> {
    for d in DIRS {
        let p = Path::new(d).join(prog);
        if let Ok(real) = std::fs::canonicalize(&p) {
            if real
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("busybox"))
            {
                log::warn!(
                    "{} is busybox's applet; looking further for e2fsprogs' {prog}",
                    p.display()
                );
                continue;
            }
            return Ok(p);
        }
    }
    bail!(
        "e2fsprogs' {prog} not found in {} (a busybox applet does not do)",
        DIRS.join(":")
    )
}

fn run(cmd: &mut Command) -> Result<(i32, String)> {
    log::info!("running {cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text.trim().to_string()))
}

/// Make the filesystem on `dev`, `size` bytes of it (the rest of the
/// device is left alone).
pub fn mkfs(dev: &Path, label: &str, size: u64) -> Result<()> {
    let mut cmd = Command::new(find("mke2fs")?);
    cmd.args(mkfs_args(label, size));
    if !crate::disk::blockdev::is_block_device(dev) {
        cmd.arg("-F");
    }
    cmd.arg(dev);
    cmd.arg(format!("{}k", size / 1024));
    let (code, out) = run(&mut cmd)?;
    if code != 0 {
        bail!("mke2fs on {} failed (exit {code}): {out}", dev.display());
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Fsck {
    pub code: i32,
    pub summary: String,
    pub output: String,
}

impl Fsck {
    /// 0: clean; 1: errors corrected. Anything else: do not mount.
    pub fn mountable(&self) -> bool {
        matches!(self.code, 0 | 1)
    }
}

pub fn describe_fsck(code: i32) -> &'static str {
    match code {
        0 => "clean",
        1 => "errors corrected",
        2 => "errors corrected, reboot wanted",
        c if c & 4 != 0 => "errors left uncorrected (beyond automatic repair)",
        c if c & 8 != 0 => "operational error",
        _ => "failed",
    }
}

/// `e2fsck -p`: repair what is safe to repair without asking.
pub fn fsck(dev: &Path) -> Result<Fsck> {
    let mut cmd = Command::new(find("e2fsck")?);
    cmd.arg("-p").arg(dev);
    let (code, output) = run(&mut cmd)?;
    Ok(Fsck {
        code,
        summary: describe_fsck(code).into(),
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_tables_and_journal_do_not_grow_with_the_stick() {
        let inodes = |size: u64| {
            let a = mkfs_args("persistence", size);
            let i = a.iter().position(|x| x == "-i").unwrap();
            size / a[i + 1].parse::<u64>().unwrap()
        };
        const G: u64 = 1 << 30;
        assert_eq!(
            inodes(8 * G),
            512 << 10,
            "8 GiB keeps mke2fs's 16 KiB ratio"
        );
        assert_eq!(inodes(64 * G), 1 << 20);
        assert_eq!(inodes(256 * G), 1 << 20);
        assert!(inodes(2048 * G) <= 1 << 20);
        assert!(mkfs_args("p", 8 * G).join(" ").contains("-J size=64"));
        assert!(
            !mkfs_args("p", G).contains(&"-J".to_string()),
            "small: mke2fs's own journal"
        );
        assert!(
            mkfs_args("p", G)
                .join(" ")
                .contains("lazy_itable_init=0,lazy_journal_init=0")
        );
    }

    #[test]
    fn fsck_codes() {
        let f = |code| Fsck {
            code,
            summary: describe_fsck(code).into(),
            output: String::new(),
        };
        assert!(f(0).mountable() && f(1).mountable());
        assert!(!f(2).mountable() && !f(4).mountable() && !f(8).mountable());
        assert!(describe_fsck(4).contains("uncorrected"));
    }
}
