//! `enable`: create persistence on the boot stick (or `--device`) with the
//! same planning and safety code as `boot`, and save the RAM session into it.

use super::{
    RUN_DIR, TempMount, active_on, confirm, mount_sources, pending_path, read_state, refuse,
    running_settings, step, target_device,
};
use crate::boot::{flags, mounts};
use crate::disk::stick::{Existing, find_persistence, open_device};
use crate::disk::{blockdev, partplan, sysfs::Sysfs};
use crate::settings::config::Settings;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub fn enable(
    device: Option<PathBuf>,
    size: Option<crate::settings::size::Size>,
    yes: bool,
) -> Result<()> {
    let s = &running_settings();
    let st = read_state();
    let disk = target_device(device, st.as_ref(), "enable")?;
    let is_boot = st
        .as_ref()
        .and_then(|s| s.boot_device.as_ref())
        .is_some_and(|b| Path::new(&b.disk) == disk);
    let mut o = open_device(&disk, false)?;
    if let Some(e) = find_persistence(&mut o, &s.label) {
        // idempotent: already there; enable only clears disable/remove requests
        let cleared = match active_on(st.as_ref(), e.number, &disk) {
            Some(pm) => flags::clear(&pm)?,
            None => flags::clear(&TempMount::new(&disk, o.block, &e, false)?.dir)?,
        };
        let _ = std::fs::remove_file(pending_path());
        println!(
            "{} already has persistence (partition {}, {}); nothing to create.",
            disk.display(),
            e.number,
            crate::settings::size::human(e.size)
        );
        if cleared {
            println!("The request to disable or remove it was cleared: the next boot uses it.");
        }
        return Ok(());
    }
    if o.block && !is_boot {
        let name = disk
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let busy: Vec<String> = Sysfs::default()
            .partitions_of(&name)
            .into_iter()
            .map(|k| format!("/dev/{}", k.name))
            .chain(std::iter::once(disk.display().to_string()))
            .filter(|n| mount_sources().contains(n))
            .collect();
        if !busy.is_empty() {
            return refuse(format!(
                "{} is in use (mounted: {})",
                disk.display(),
                busy.join(", ")
            ));
        }
    }
    let mut settings = s.clone();
    if let Some(sz) = size {
        settings.max_size = Some(sz);
    }
    let opts = partplan::PlanOptions {
        min_free: settings.min_free,
        max_size: settings.max_size.map(|m| m.resolve(u64::MAX)),
        ..Default::default()
    };
    let plan = match partplan::plan(&o.layout, &opts) {
        Ok(p) => p,
        Err(r) => {
            return refuse(format!(
                "not creating persistence on {}: {r}",
                disk.display()
            ));
        }
    };
    println!(
        "Will create partition {} on {} in the {} table: byte {} to {} ({}), ext4 labelled '{}'.",
        plan.number,
        disk.display(),
        format!("{:?}", plan.table).to_uppercase(),
        plan.start,
        plan.start + plan.size,
        crate::settings::size::human(plan.size),
        settings.label
    );
    println!(
        "Nothing before byte {} (the ISO, its EFI partition, the tables) is changed but these sectors:",
        plan.used_end
    );
    for w in &plan.writes {
        println!("  {} bytes at {}: {}", w.len, w.offset, w.what);
    }
    confirm("Create it?", None, yes)?;
    drop(o);
    let total = if is_boot { 3 } else { 2 };
    step(
        1,
        total,
        &format!(
            "creating partition {} (a backup of every table sector it touches is kept) and formatting {} \
             with mke2fs; this can take a minute on a slow stick",
            plan.number,
            crate::settings::size::human(plan.size)
        ),
    );
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(RUN_DIR)?;
    let c = crate::disk::stick::create_partition(&disk, &settings, Path::new(RUN_DIR))?;
    println!("      done in {:.1} s", t0.elapsed().as_secs_f64());
    let e = Existing {
        number: c.number,
        start: c.start,
        size: c.size,
        uuid: String::new(),
    };
    let backup = c.backup.clone();
    drop(c);
    step(2, total, "saving the table backup on the new partition");
    let m = TempMount::new(&disk, blockdev::is_block_device(&disk), &e, false)?;
    flags::write_backup(&m.dir, &backup)?;
    if is_boot {
        step(3, total, "copying this session's changes into it");
        save_session(&m.dir, &settings)?;
        crate::util::fsutil::write_atomic(&pending_path(), b"enabled\n")?;
    }
    drop(m);
    println!(
        "Persistence created on {} (partition {}).{}",
        disk.display(),
        e.number,
        if is_boot {
            " It takes effect at the next boot; this session's changes so far are in it."
        } else {
            ""
        }
    );
    Ok(())
}

/// Copy the RAM session's changes to a new partition: the overlay uppers
/// (archiso's cow or ours) and the bind dirs as they are now.
fn save_session(pm: &Path, s: &Settings) -> Result<()> {
    let uppers = [
        PathBuf::from("/run/archiso/cowspace/upper"),
        PathBuf::from("/run/mados/cow"),
    ];
    for d in &s.overlay_dirs {
        let esc = mounts::escape(d);
        let dst = pm.join("overlays").join(&esc).join("upper");
        for (i, base) in uppers.iter().enumerate() {
            let src = if i == 0 {
                base.join(d.trim_start_matches('/'))
            } else {
                base.join(&esc).join("upper")
            };
            if src.is_dir() {
                std::fs::create_dir_all(&dst)?;
                crate::util::fsutil::copy_tree(&src, &dst)
                    .with_context(|| format!("saving {d}"))?;
            }
        }
        std::fs::create_dir_all(pm.join("overlays").join(&esc).join("work"))?;
    }
    for d in &s.bind_dirs {
        let src = Path::new(d);
        if src.is_dir() {
            let dst = pm.join(mounts::escape(d));
            std::fs::create_dir_all(&dst)?;
            crate::util::fsutil::copy_tree(src, &dst).with_context(|| format!("saving {d}"))?;
        }
    }
    Ok(())
}
