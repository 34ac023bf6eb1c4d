//! The stick's health record kept on the partition and the daemon's
//! count of what was written into RAM.
//!
//! `History` (`companion/health.json` on the partition, 0600): KiB the
//! persistence filesystem wrote per day over the last `MAX_DAYS` days
//! (UTC days, from ext4's `lifetime_write_kbytes`), and the last
//! `MAX_BOOTS` boots' fsck outcome, how the shutdown before each ended and
//! the filesystem's error count then. The daemon updates it after a sync
//! (at most every `SAVE_EVERY` s: each save costs the stick a write) and
//! at stop. It is untrusted input: `parse` takes at most `MAX_FILE`
//! bytes, checks every entry and refuses the whole file on anything
//! wrong (truncated, huge, garbage, days out of order); it is then
//! rebuilt from now on. Nothing at boot reads it.
//!
//! `Written`: bytes written into RAM (the tier overlays, the tmpfs dirs)
//! as the daemon sees them: each file a write event names (fanotify
//! `FAN_MODIFY`, drained once a second) counts its growth since it was
//! last seen, or its whole size when it is new to the count or shrank (a
//! rewrite). A file is its device, inode number and birth time (an inode
//! number reused by a new file is a new file); one seen already removed
//! is forgotten. Writes over a file's own bytes without growing it, and
//! several rewrites within one second, are not seen: an estimate from
//! below. At most `MAX_TRACKED` files are remembered; past that the
//! memory starts again (files then count whole once more).

use crate::boot::state::LastShutdown;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const HEALTH_FILE: &str = "companion/health.json";
pub const VERSION: u32 = 1;
pub const MAX_DAYS: usize = 30;
pub const MAX_BOOTS: usize = 10;
/// Far more than 30 days and 10 boots take (about 3 KiB).
pub const MAX_FILE: u64 = 64 << 10;
/// Seconds between two saves after syncs (each is a write to the stick).
pub const SAVE_EVERY: u64 = 1800;
const MAX_TEXT: usize = 80;
/// 1970 to 2200: a day number outside is garbage.
const MAX_DAY: u32 = 84_000;

/// KiB the persistence filesystem wrote on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// Days since 1970-01-01 (UTC).
    pub day: u32,
    pub kbytes: u64,
}

/// One boot as the daemon recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boot {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    pub started_unix_s: u64,
    /// e2fsck's exit code and summary (null: not run, a write-protected
    /// stick).
    pub fsck_code: Option<i32>,
    pub fsck: Option<String>,
    pub last_shutdown: Option<LastShutdown>,
    /// The filesystem's error count at that boot (before e2fsck).
    pub errors: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub version: u32,
    /// `lifetime_write_kbytes` at the last save: the next save adds what
    /// it grew since to its day.
    pub lifetime_kb: u64,
    /// Oldest first, at most `MAX_DAYS`, strictly increasing.
    pub days: Vec<Day>,
    /// Oldest first, at most `MAX_BOOTS`.
    pub boots: Vec<Boot>,
}

fn text_ok(s: &str) -> bool {
    s.len() <= MAX_TEXT && !s.chars().any(char::is_control)
}

/// The history in `b`, or `None` when anything in it is wrong: it is
/// then ignored and rebuilt.
pub fn parse(b: &[u8]) -> Option<History> {
    if b.len() as u64 > MAX_FILE {
        return None;
    }
    let h: History = serde_json::from_slice(b).ok()?;
    let days_ok = h.days.len() <= MAX_DAYS
        && h.days.iter().all(|d| d.day <= MAX_DAY)
        && h.days.windows(2).all(|w| w[0].day < w[1].day);
    let boots_ok = h.boots.len() <= MAX_BOOTS
        && h.boots.iter().all(|b| {
            text_ok(&b.boot_id)
                && b.fsck.as_deref().is_none_or(text_ok)
                && b.started_unix_s <= u64::from(MAX_DAY) * 86_400
        });
    (h.version == VERSION && days_ok && boots_ok).then_some(h)
}

fn cut(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl History {
    /// Add what the filesystem wrote since the last save to today
    /// (`now_s`), and record this boot. A history new or rebuilt starts
    /// from `base_kb` (the counter at this boot, from state.json) when
    /// known; a counter that went back (the superblock's copy lagging
    /// after a power cut) adds nothing and starts again from its value.
    pub fn update(&mut self, now_s: u64, lifetime_kb: u64, base_kb: Option<u64>, mut boot: Boot) {
        self.version = VERSION;
        let from = if self.lifetime_kb == 0 {
            base_kb.unwrap_or(lifetime_kb)
        } else {
            self.lifetime_kb
        };
        let grew = lifetime_kb.saturating_sub(from);
        let today = u32::try_from(now_s / 86_400)
            .unwrap_or(u32::MAX)
            .min(MAX_DAY);
        match self.days.last_mut() {
            Some(d) if d.day == today => d.kbytes = d.kbytes.saturating_add(grew),
            // a clock set back: its writes go to the latest day kept
            Some(d) if d.day > today => d.kbytes = d.kbytes.saturating_add(grew),
            _ => self.days.push(Day {
                day: today,
                kbytes: grew,
            }),
        }
        let oldest = today.saturating_sub(MAX_DAYS as u32 - 1);
        self.days.retain(|d| d.day >= oldest);
        let over = self.days.len().saturating_sub(MAX_DAYS);
        self.days.drain(..over);
        self.lifetime_kb = lifetime_kb;
        boot.boot_id = cut(&boot.boot_id);
        boot.fsck = boot.fsck.as_deref().map(cut);
        match self.boots.last_mut() {
            Some(b) if b.boot_id == boot.boot_id => {
                // the boot's own record stays as first written
            }
            _ => self.boots.push(boot),
        }
        let over = self.boots.len().saturating_sub(MAX_BOOTS);
        self.boots.drain(..over);
    }

    /// KiB written over the last `n` days up to `today` (inclusive).
    pub fn last_days(&self, today: u32, n: u32) -> u64 {
        self.days
            .iter()
            .filter(|d| d.day <= today && d.day + n > today)
            .fold(0u64, |a, d| a.saturating_add(d.kbytes))
    }
}

/// At most this many files remembered by `Written`.
pub const MAX_TRACKED: usize = 100_000;

/// A file a write event named, as `statx` of the event's fd saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub dev: u64,
    pub ino: u64,
    /// Birth time (ns; 0 where the filesystem keeps none): an inode
    /// number reused by a new file is another file.
    pub born: u64,
    pub size: u64,
    /// Unlinked already (nlink 0): counted, then forgotten.
    pub gone: bool,
}

/// Bytes written into RAM as seen from file sizes (module doc).
#[derive(Debug, Default)]
pub struct Written {
    sizes: HashMap<(u64, u64, u64), u64>,
    pub bytes: u64,
    /// Times the memory of sizes was dropped for being full.
    pub resets: u64,
}

impl Written {
    /// A write event for the file `f`.
    pub fn seen(&mut self, f: Seen) {
        let key = (f.dev, f.ino, f.born);
        let added = match self.sizes.get(&key) {
            Some(&last) if f.size >= last => f.size - last,
            _ => f.size,
        };
        self.bytes = self.bytes.saturating_add(added);
        if f.gone {
            // removed: its number may come back as another file
            self.sizes.remove(&key);
            return;
        }
        if self.sizes.len() >= MAX_TRACKED && !self.sizes.contains_key(&key) {
            self.sizes.clear();
            self.resets += 1;
        }
        self.sizes.insert(key, f.size);
    }

    pub fn tracked(&self) -> usize {
        self.sizes.len()
    }
}

/// What the RAM kept off the stick: written into the tiers and not
/// carried (`tier_written` − `synced` − what waits for the next sync,
/// never below 0), plus everything written to the tmpfs dirs.
pub fn kept_off(tier_written: u64, synced: u64, pending: u64, tmpfs_written: u64) -> u64 {
    tier_written
        .saturating_sub(synced.saturating_add(pending))
        .saturating_add(tmpfs_written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(id: &str) -> Boot {
        Boot {
            boot_id: id.into(),
            started_unix_s: 1_700_000_000,
            fsck_code: Some(0),
            fsck: Some("clean".into()),
            last_shutdown: Some(LastShutdown::Clean),
            errors: 0,
        }
    }

    const DAY: u64 = 86_400;

    #[test]
    fn days_fill_and_roll_over_thirty() {
        let mut h = History::default();
        let t0 = 20_000 * DAY;
        // a new history starts from the counter at boot
        h.update(t0 + 10, 5_000, Some(4_000), boot("a"));
        assert_eq!(
            h.days,
            [Day {
                day: 20_000,
                kbytes: 1_000
            }]
        );
        h.update(t0 + 20, 5_500, Some(4_000), boot("a"));
        assert_eq!(h.days[0].kbytes, 1_500);
        assert_eq!(h.boots.len(), 1);
        // the counter went back (a lagging superblock copy): nothing added
        h.update(t0 + 30, 5_100, None, boot("a"));
        assert_eq!(h.days[0].kbytes, 1_500);
        assert_eq!(h.lifetime_kb, 5_100);
        let mut kb = 5_100;
        for i in 1..40u64 {
            kb += 100;
            h.update(t0 + i * DAY, kb, None, boot(&format!("b{i}")));
        }
        assert_eq!(h.days.len(), MAX_DAYS);
        assert_eq!(h.days[0].day, 20_010);
        assert_eq!(h.days.last().unwrap().day, 20_039);
        assert_eq!(h.boots.len(), MAX_BOOTS);
        assert_eq!(h.boots.last().unwrap().boot_id, "b39");
        assert_eq!(h.last_days(20_039, 7), 700);
        // and it survives its own parser
        let b = serde_json::to_vec(&h).unwrap();
        assert_eq!(parse(&b), Some(h));
    }

    #[test]
    fn hostile_files_are_ignored() {
        let mut h = History::default();
        h.update(20_000 * DAY, 10, None, boot("a"));
        h.update(20_001 * DAY, 20, None, boot("b"));
        let good = serde_json::to_vec(&h).unwrap();
        assert!(parse(&good).is_some());
        // truncated at every length
        for n in 0..good.len() {
            assert_eq!(parse(&good[..n]), None, "truncated at {n}");
        }
        // garbage, binary, another version
        assert_eq!(parse(b"\xff\xfe garbage"), None);
        assert_eq!(parse(&vec![0u8; 4096]), None);
        let other = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"version\":1", "\"version\":2");
        assert_eq!(parse(other.as_bytes()), None);
        // huge: past the cap, whatever it holds
        let mut big = good.clone();
        big.extend(std::iter::repeat_n(b' ', MAX_FILE as usize));
        assert_eq!(parse(&big), None);
        // too many days, days out of order, a day in the far future
        let mut many = h.clone();
        many.days = (0..31).map(|d| Day { day: d, kbytes: 1 }).collect();
        assert_eq!(parse(&serde_json::to_vec(&many).unwrap()), None);
        let mut order = h.clone();
        order.days.swap(0, 1);
        assert_eq!(parse(&serde_json::to_vec(&order).unwrap()), None);
        let mut far = h.clone();
        far.days[1].day = u32::MAX;
        assert_eq!(parse(&serde_json::to_vec(&far).unwrap()), None);
        // a boot id full of control characters or too long
        let mut id = h.clone();
        id.boots[0].boot_id = "\u{1b}[2J".into();
        assert_eq!(parse(&serde_json::to_vec(&id).unwrap()), None);
        id.boots[0].boot_id = "x".repeat(1000);
        assert_eq!(parse(&serde_json::to_vec(&id).unwrap()), None);
        // numbers past u64 and negative ones are no history
        let neg = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"kbytes\":10", "\"kbytes\":-10");
        assert_eq!(parse(neg.as_bytes()), None);
        let huge = String::from_utf8(good)
            .unwrap()
            .replace("\"kbytes\":10", "\"kbytes\":99999999999999999999999");
        assert_eq!(parse(huge.as_bytes()), None);
        // a counter at u64::MAX saturates, never panics
        let mut s = History::default();
        s.update(20_000 * DAY, u64::MAX, Some(0), boot("a"));
        s.update(20_000 * DAY, u64::MAX, None, boot("a"));
        assert_eq!(s.days[0].kbytes, u64::MAX);
        s.update(u64::MAX, 1, None, boot("c"));
        // a rebuilt history's record of a boot is cut to its cap
        let mut r = History::default();
        r.update(0, 0, None, boot(&"é".repeat(100)));
        assert!(r.boots[0].boot_id.len() <= MAX_TEXT);
        assert!(parse(&serde_json::to_vec(&r).unwrap()).is_some());
    }

    #[test]
    fn written_counts_growth_and_rewrites() {
        let f = |ino, born, size, gone| Seen {
            dev: 1,
            ino,
            born,
            size,
            gone,
        };
        let mut w = Written::default();
        w.seen(f(10, 5, 100, false)); // new: whole
        w.seen(f(10, 5, 250, false)); // append: the tail
        w.seen(f(10, 5, 250, false)); // no growth seen
        w.seen(f(10, 5, 40, false)); // truncated and rewritten: whole
        w.seen(f(11, 5, 1000, false)); // another file
        assert_eq!(w.bytes, 100 + 150 + 40 + 1000);
        // inode 11's number reused by a new file (another birth): whole
        w.seen(f(11, 6, 1000, false));
        assert_eq!(w.bytes, 100 + 150 + 40 + 2000);
        // a file seen removed is forgotten: its number may come back
        // where there is no birth time
        w.seen(f(12, 0, 30, false));
        w.seen(f(12, 0, 30, true));
        assert_eq!(w.tracked(), 3);
        w.seen(f(12, 0, 30, false));
        assert_eq!(w.bytes, 100 + 150 + 40 + 2000 + 30 + 30);
        assert_eq!(kept_off(1390, 1000, 200, 50), 240);
        // more synced than seen (a restarted daemon): never below the tmpfs part
        assert_eq!(kept_off(10, 1000, 0, 50), 50);
        let mut w = Written::default();
        for i in 0..(MAX_TRACKED as u64 + 5) {
            w.seen(f(i, 0, 1, false));
        }
        assert_eq!(w.resets, 1);
        assert!(w.tracked() <= MAX_TRACKED);
    }
}
