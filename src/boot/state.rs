//! `/run/mados-persistence/state.json`: what a boot did and why, for the
//! post-boot tools. The schema is documented in README.md; add fields, do
//! not rename them.

use crate::boot::detect::Reason;
use crate::boot::mounts::Mounted;
use crate::disk::e2fs::Fsck;
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
}
