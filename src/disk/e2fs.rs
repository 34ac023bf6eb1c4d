//! e2fsprogs' own programs: `mke2fs` and `e2fsck`. Every call logs its full
//! command line; a failure carries the program's output.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

const DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Options for a new persistence filesystem. Inode tables and journal are
/// written at mkfs time (not lazily by the kernel afterwards), so the first
/// session is not slowed by background zeroing on a slow stick; see
/// README "First-boot cost" for the measurement behind this.
pub const MKFS_EXTENDED: &str = "lazy_itable_init=0,lazy_journal_init=0";

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

pub fn mkfs(dev: &Path, label: &str) -> Result<()> {
    let mut cmd = Command::new(find("mke2fs")?);
    cmd.args([
        "-q",
        "-t",
        "ext4",
        "-L",
        label,
        "-m",
        "1",
        "-E",
        MKFS_EXTENDED,
    ]);
    if !crate::disk::blockdev::is_block_device(dev) {
        cmd.arg("-F");
    }
    cmd.arg(dev);
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
