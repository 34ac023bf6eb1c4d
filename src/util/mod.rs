//! Helpers every stage uses: the log sink and file operations (tree copy,
//! atomic writes). Depends on nothing else in the crate.

pub mod fsutil;
pub mod logging;
pub mod overlayfs;
pub mod plymouth;
pub mod prompt;
pub mod safefs;
pub mod secret;
#[cfg(test)]
pub mod testutil;
pub mod treecopy;
