//! mados-persistence: persistence for live USB sticks.
//!
//! The modules are grouped by stage, and depend only downwards
//! (ARCHITECTURE.md has the code map):
//!
//! - `util`: logging and file helpers; depends on nothing here.
//! - `settings`: what the user asked for (kernel command line, config, sizes).
//! - `disk`: how a stick is read and changed (sysfs, superblocks, tables,
//!   partition planning and writing, ioctls, e2fsprogs, the persistence
//!   partition's shared operations).
//! - `boot`: what happens in the initramfs (detection, mounts, flags, state).
//! - `companion`: the daemon after boot (RAM tier sync) and `sync`.
//! - `manage`: what a person runs after boot (status, enable, disable,
//!   remove, plan) and its text rendering.

pub mod boot;
pub mod companion;
pub mod disk;
pub mod manage;
pub mod settings;
pub mod util;
