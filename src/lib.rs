//! mados-persistence: persistence for live USB sticks.
//!
//! See ARCHITECTURE.md for the code map.

pub mod cmdline;
pub mod config;
pub mod layout;
pub mod partplan;
pub mod size;
pub mod superblock;
pub mod table;
