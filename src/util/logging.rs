//! The `log` facade's sink: `/dev/kmsg` in early boot (one write per record,
//! `<prio>mados-persistence: msg`), stderr otherwise. Every record is also
//! kept so that `boot` can store the log on the persistence partition.
//!
//! The kernel rate-limits writes to /dev/kmsg per open file (a burst of 10
//! lines per 5 s, unless `printk.devkmsg=on`), and a boot logs more than
//! that: the fsck and mount lines were being dropped from the console. Each
//! record therefore opens /dev/kmsg anew (a boot logs a few dozen lines),
//! rather than changing the system-wide `printk_devkmsg` setting.

use std::io::Write;
use std::sync::Mutex;

pub struct Logger {
    kmsg: Option<Mutex<std::path::PathBuf>>,
    pub lines: Mutex<Vec<String>>,
    level: log::LevelFilter,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = format!("{}", r.args());
        let prio = match r.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            _ => 7,
        };
        match &self.kmsg {
            Some(k) => {
                let path = k.lock().unwrap();
                if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&*path) {
                    let _ = f.write_all(format!("<{prio}>mados-persistence: {msg}\n").as_bytes());
                }
            }
            None => {
                let tag = match r.level() {
                    log::Level::Error => "error: ",
                    log::Level::Warn => "warning: ",
                    _ => "",
                };
                eprintln!("mados-persistence: {tag}{msg}");
            }
        }
        self.lines
            .lock()
            .unwrap()
            .push(format!("{:<5} {msg}", r.level()));
    }
    fn flush(&self) {}
}

/// Install the logger once. `kmsg`: write to /dev/kmsg when it opens.
pub fn init(kmsg: bool, level: log::LevelFilter) {
    let path = std::path::PathBuf::from("/dev/kmsg");
    let kmsg =
        (kmsg && std::fs::OpenOptions::new().write(true).open(&path).is_ok()).then_some(path);
    let l = LOGGER.get_or_init(|| Logger {
        kmsg: kmsg.map(Mutex::new),
        lines: Mutex::new(vec![]),
        level,
    });
    if log::set_logger(l).is_ok() {
        log::set_max_level(level);
    }
}

/// Everything logged so far.
pub fn captured() -> Vec<String> {
    LOGGER
        .get()
        .map(|l| l.lines.lock().unwrap().clone())
        .unwrap_or_default()
}
