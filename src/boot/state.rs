//! `/run/mados-persistence/state.json`: what a boot did and why, for the
//! post-boot tools. The schema is documented in README.md; add fields, do
//! not rename them.

use crate::boot::detect::Reason;
use crate::boot::mounts::Mounted;
use crate::disk::e2fs::Fsck;
use crate::disk::superblock::Ext4Info;
use serde::{Deserialize, Serialize};

pub const STATE_DIR: &str = "mados-persistence";
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BootDevice {
    pub device: String,
    pub disk: String,
    pub kind: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Partition {
    pub device: String,
    /// The partition's number on its disk.
    #[serde(default)]
    pub number: u32,
    /// The node mounted: the partition, or a loop device over the disk when
    /// the whole disk was busy.
    pub mounted_from: String,
    /// Formatted by this boot.
    pub created: bool,
    /// How the partition came to be this boot: `existing`, `created`,
    /// `resumed` (a creation a power cut interrupted, finished) or
    /// `adopted` (a filesystem left by an earlier release, its entry put
    /// back).
    #[serde(default)]
    pub origin: String,
    pub start: u64,
    pub size: u64,
    pub mountpoint: String,
    pub fsck: Option<Fsck>,
    /// How the previous use of the filesystem ended, from its superblock
    /// read before this boot's e2fsck (null: a state.json of an older
    /// release, or the superblock could not be read).
    #[serde(default)]
    pub last_shutdown: Option<LastShutdown>,
    /// The superblock's write counter and error record as this boot found
    /// them, before e2fsck (which clears the error record when it
    /// repairs): `status` shows what was written this boot against it.
    /// Null: an older release, or the superblock could not be read.
    #[serde(default)]
    pub at_boot: Option<crate::disk::superblock::Ext4Wear>,
}

/// How the last boot left the persistence filesystem.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LastShutdown {
    /// Unmounted cleanly: nothing in its journal to replay.
    Clean,
    /// Not unmounted: its journal needed recovery, or it was not marked
    /// valid. A power cut, a stick pulled while in use, or a shutdown that
    /// could not unmount it (no shutdown initramfs: README).
    Unclean,
    /// Formatted at this boot: there was no earlier shutdown.
    New,
}

impl LastShutdown {
    /// From the superblock as this boot found it, before e2fsck (which
    /// replays the journal and so clears what tells).
    pub fn from_superblock(sb: &Ext4Info, created: bool) -> Self {
        if created {
            LastShutdown::New
        } else if !sb.clean || (sb.has_journal && sb.needs_recovery) {
            LastShutdown::Unclean
        } else {
            LastShutdown::Clean
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timing {
    pub step: String,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct State {
    pub version: u32,
    /// "persistent" or "ram".
    pub mode: String,
    pub reason: Option<Reason>,
    pub boot_device: Option<BootDevice>,
    pub partition: Option<Partition>,
    pub mounts: Vec<Mounted>,
    pub warnings: Vec<String>,
    pub timings: Vec<Timing>,
    pub cmdline: String,
    /// The live root the mounts were made under (`/new_root`).
    #[serde(default)]
    pub root: String,
    /// The ISO build booted (ISO 9660 label and UUID), when known.
    #[serde(default)]
    pub iso: Option<crate::boot::iso_build::IsoBuild>,
    /// Set when the overlays on the partition were made over another ISO
    /// build (the stick was re-flashed): what was done about it.
    #[serde(default)]
    pub iso_change: Option<crate::boot::iso_build::IsoChange>,
    /// The RAM tiers mounted this boot (the companion syncs them).
    #[serde(default)]
    pub tiers: Vec<crate::boot::tier::Tier>,
    /// The users' `~/.cache` tmpfs mounted this boot.
    #[serde(default)]
    pub user_caches: Vec<crate::boot::usercache::UserCache>,
    /// The booted kernel's modules: whether the persistent /usr shows the
    /// image's, and what was done when it did not (null: /usr not
    /// persistent, RAM mode, or an older release).
    #[serde(default)]
    pub kernel_modules: Option<crate::boot::kmod::KernelModules>,
    /// The stick is write-protected and its persistence is mounted
    /// read-only (`mode` stays "persistent": the partition is in use; a
    /// reader that knows no `read_only` sees it persistent, with no tier
    /// to sync). Changes of this boot are kept in RAM only.
    #[serde(default)]
    pub read_only: bool,
    /// What this boot did about a `set-aside restore` request (null: none).
    #[serde(default)]
    pub set_aside_restore: Option<crate::boot::set_aside::Outcome>,
    /// The persistence partition is a LUKS2 volume: how it was found and
    /// unlocked (absent for a clear one: its state.json is as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// An encrypted persistence partition at this boot. Never holds a
/// passphrase or anything derived from one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Encryption {
    /// The partition holding the volume.
    pub device: String,
    pub luks_version: u32,
    /// The volume's UUID (from its header).
    pub uuid: String,
    /// The key slots' PBKDF (`argon2id`), memory (KiB) and passes, from
    /// `luksDump` (empty when it could not be read).
    pub pbkdf: String,
    pub pbkdf_memory_kib: Option<u32>,
    pub pbkdf_iterations: Option<u32>,
    pub key_slots: u32,
    /// Unlocked this boot: by which prompt (`console`), at which try.
    pub unlocked: bool,
    pub unlocked_by: Option<String>,
    pub tries: u32,
    /// The device-mapper node the filesystem is on.
    pub mapper: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(clean: bool, has_journal: bool, needs_recovery: bool) -> Ext4Info {
        Ext4Info {
            label: "persistence".into(),
            uuid: "u".into(),
            block_size: 4096,
            blocks: 1,
            free_blocks: 1,
            has_journal,
            clean,
            needs_recovery,
            group: 0,
            wear: Default::default(),
        }
    }

    #[test]
    fn last_shutdown_from_the_superblock() {
        use LastShutdown::*;
        let f = LastShutdown::from_superblock;
        assert_eq!(f(&sb(true, true, false), false), Clean);
        // left mounted: the journal needs recovery (the valid bit stays set
        // on a journalled ext4 while it is mounted)
        assert_eq!(f(&sb(true, true, true), false), Unclean);
        // no journal: the valid bit is cleared while mounted
        assert_eq!(f(&sb(false, false, false), false), Unclean);
        assert_eq!(f(&sb(false, true, false), false), Unclean);
        // formatted this boot: nothing to tell
        assert_eq!(f(&sb(true, true, false), true), New);
        // a state.json without it still reads
        let p: Partition = serde_json::from_str(
            r#"{"device": "/dev/sda3", "mounted_from": "/dev/sda3", "created": false,
                "start": 0, "size": 0, "mountpoint": "/m", "fsck": null}"#,
        )
        .unwrap();
        assert_eq!(p.last_shutdown, None);
        assert_eq!(serde_json::to_string(&Unclean).unwrap(), "\"unclean\"");
    }
}
