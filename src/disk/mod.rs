//! How a stick is read and changed: block devices in sysfs, superblocks,
//! partition tables (parsed into a validated `Layout`), pure partition
//! planning, the sector-write executor, ioctls, e2fsprogs, and the
//! operations on a stick's persistence partition that `boot` and `manage`
//! share (`stick`). Depends on `settings` and `util`.

pub mod blockdev;
pub mod claim;
pub mod cryptsetup;
pub mod e2fs;
pub mod layout;
pub mod luks;
pub mod mountinfo;
pub mod partplan;
pub mod stick;
pub mod superblock;
pub mod sysfs;
pub mod table;
