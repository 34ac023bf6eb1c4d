//! The write patterns `bench/run` measures inside the QEMU live system, in a
//! RAM-tier dir, the same kind of dir on the persistent overlay, and plain
//! tmpfs (built static with the product, copied into the bench live root).
//!
//!   tierbench fsync DIR N     N × (append 4 KiB, fsync) to one file
//!   tierbench journal DIR N   N SQLite-like rollback-journal transactions:
//!                             journal created, 4 KiB written and fsynced,
//!                             a 4 KiB page written into the database and
//!                             fsynced, the journal unlinked, the dir fsynced
//!   tierbench mkfiles DIR N   N files of 4 KiB made in DIR
//!   tierbench reads DIR N     every file of DIR read whole, N times
//!   tierbench opens DIR N     N opens (and closes) of DIR's files in turn,
//!                             paced at 10,000 a second (the load the
//!                             daemon's heat tracking is measured under)
//!   tierbench resident DIR 1  for each file of DIR, the bytes of it in
//!                             RAM (`mincore`), without reading it:
//!                             `RESIDENT <path> <bytes> <size>`
//!
//! Prints `OPS <pattern> <dir> <ops> <seconds> <ops/s>`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

fn fsync_dir(d: &Path) -> std::io::Result<()> {
    fs::File::open(d)?.sync_all()
}

/// Bytes of `f` in the page cache: a mapping that is never touched, and
/// `mincore` on it.
fn resident(f: &fs::File, size: u64) -> std::io::Result<u64> {
    let Some(len) = std::num::NonZeroUsize::new(size as usize) else {
        return Ok(0);
    };
    // SAFETY: a fresh read-only shared mapping, never read through.
    let addr = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            f,
            0,
        )
    }?;
    let mut v = vec![0u8; len.get().div_ceil(4096)];
    // SAFETY: one byte per page of the mapping.
    let r = unsafe { nix::libc::mincore(addr.as_ptr(), len.get(), v.as_mut_ptr()) };
    // SAFETY: the mapping above, unmapped once.
    unsafe { nix::sys::mman::munmap(addr, len.get()) }?;
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((v.iter().filter(|b| *b & 1 == 1).count() as u64 * 4096).min(size))
}

fn main() -> std::io::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        eprintln!("usage: tierbench fsync|journal|mkfiles|reads|opens|resident DIR N");
        std::process::exit(2);
    }
    let dir = Path::new(&a[2]);
    let n: u64 = a[3].parse().expect("N");
    fs::create_dir_all(dir)?;
    let page = [0x5au8; 4096];
    let t0 = Instant::now();
    match a[1].as_str() {
        "fsync" => {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("fsync.log"))?;
            for _ in 0..n {
                f.write_all(&page)?;
                f.sync_all()?;
            }
        }
        "journal" => {
            let db = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.join("bench.db"))?;
            let jp = dir.join("bench.db-journal");
            for i in 0..n {
                let mut j = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&jp)?;
                j.write_all(&page)?;
                j.sync_all()?;
                db.write_all_at(&page, (i % 64) * 4096)?;
                db.sync_all()?;
                drop(j);
                fs::remove_file(&jp)?;
                fsync_dir(dir)?;
            }
        }
        "mkfiles" => {
            for i in 0..n {
                fs::write(dir.join(format!("f{i}")), page)?;
            }
        }
        "reads" => {
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..n {
                for e in fs::read_dir(dir)? {
                    let mut f = fs::File::open(e?.path())?;
                    while std::io::Read::read(&mut f, &mut buf)? > 0 {}
                }
            }
        }
        "opens" => {
            let files: Vec<_> = fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            if files.is_empty() {
                eprintln!("no files in {}", dir.display());
                std::process::exit(2);
            }
            for i in 0..n {
                drop(fs::File::open(&files[i as usize % files.len()])?);
                // paced: the i-th open not before i / 10,000 s
                let due = std::time::Duration::from_micros(i * 100);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        "resident" => {
            let mut files: Vec<_> = fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for p in files {
                let f = fs::File::open(&p)?;
                let size = f.metadata()?.len();
                println!("RESIDENT {} {} {size}", p.display(), resident(&f, size)?);
            }
            return Ok(());
        }
        other => {
            eprintln!("unknown pattern {other}");
            std::process::exit(2);
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "OPS {} {} {n} {s:.3} {:.1}",
        a[1],
        dir.display(),
        n as f64 / s
    );
    Ok(())
}
