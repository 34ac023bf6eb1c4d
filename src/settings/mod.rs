//! What the user asked for: the kernel command line, the config file and
//! the defaults merged into `Settings`, and size values. Depends only on
//! `util`.

pub mod cmdline;
pub mod config;
pub mod size;
