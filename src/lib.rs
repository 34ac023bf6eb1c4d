//! mados-persistence: persistence for live USB sticks.
//!
//! See ARCHITECTURE.md for the code map.

pub mod blockdev;
pub mod boot;
pub mod cmdline;
pub mod config;
pub mod detect;
pub mod e2fs;
pub mod flags;
pub mod fsutil;
pub mod layout;
pub mod logging;
pub mod manage;
pub mod mounts;
pub mod partplan;
pub mod size;
pub mod state;
pub mod status;
pub mod superblock;
pub mod sysfs;
pub mod table;
