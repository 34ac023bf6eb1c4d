//! The command-line surface: help with examples for every subcommand,
//! completions and the man page generated from the clap definitions, and
//! the documented exit codes for usage errors and refusals.

use std::process::{Command, Output};

fn mp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_subcommand_explains_itself_with_an_example() {
    for sub in [
        "boot",
        "plan",
        "status",
        "enable",
        "disable",
        "remove",
        "completions",
        "man",
    ] {
        let o = mp(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help failed");
        let text = stdout(&o);
        assert!(
            text.contains("Example"),
            "{sub} --help has no example:\n{text}"
        );
    }
    let top = stdout(&mp(&["--help"]));
    for sub in ["boot", "plan", "status", "enable", "disable", "remove"] {
        assert!(top.contains(sub), "--help does not list {sub}");
    }
}

#[test]
fn completions_and_man_page() {
    let bash = stdout(&mp(&["completions", "bash"]));
    assert!(
        bash.contains("_mados__persistence()") && bash.contains("enable"),
        "{bash}"
    );
    let zsh = stdout(&mp(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef mados-persistence"), "{zsh}");
    let man = stdout(&mp(&["man"]));
    assert!(
        man.contains(".TH mados-persistence 8 "),
        "the man page is in section 8 (system administration):\n{man}"
    );
    assert!(man.contains("status"), "{man}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(mp(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(mp(&["enable", "--size", "lots"]).status.code(), Some(2));
    assert_eq!(mp(&["plan"]).status.code(), Some(2), "plan needs --device");
}

#[test]
fn plan_on_a_missing_file_is_an_error_with_context() {
    let o = mp(&["plan", "--device", "/nonexistent/stick.img"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("opening /nonexistent/stick.img"), "{e}");
}

/// A 64 MiB sparse image: a protective MBR and a primary GPT (one Linux
/// partition at 2048..=4095) whose usable range starts at LBA 0, so that
/// it covers its own header: the kernel takes this GPT, libfdisk's
/// `gpt_check_lba_sanity` rejects it and reads the MBR instead.
fn disagreeing_image(path: &std::path::Path) {
    use std::io::{Seek, SeekFrom, Write};
    let n = 131072u64;
    let mut mbr = vec![0u8; 512];
    mbr[510..].copy_from_slice(&[0x55, 0xAA]);
    mbr[446 + 4] = 0xEE;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((n - 1) as u32).to_le_bytes());
    let mut arr = vec![0u8; 128 * 128];
    arr[..16].copy_from_slice(&[
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ]);
    arr[16..32].fill(7);
    arr[32..40].copy_from_slice(&2048u64.to_le_bytes());
    arr[40..48].copy_from_slice(&4095u64.to_le_bytes());
    let mut h = vec![0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    for (o, v) in [(24, 1), (32, n - 1), (40, 0), (48, n - 34), (72, 2)] {
        h[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    h[56..72].fill(0x11);
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32fast::hash(&arr).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(n * 512).unwrap();
    f.write_all(&mbr).unwrap();
    f.write_all(&h).unwrap();
    f.seek(SeekFrom::Start(1024)).unwrap();
    f.write_all(&arr).unwrap();
}

#[test]
fn plan_refuses_a_table_the_kernel_and_libfdisk_read_differently() {
    let dir = std::env::temp_dir().join(format!("mados-test-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disagree.img");
    disagreeing_image(&img);
    for json in [false, true] {
        let mut args = vec!["plan", "--device", img.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let o = mp(&args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{e}");
        assert!(
            e.contains("the kernel reads a GPT with partition 1 at sectors 2048..4096"),
            "{e}"
        );
        assert!(
            e.contains("libfdisk (fdisk, sfdisk, cfdisk) reads an MBR with partition 1 at sectors 1..131072"),
            "{e}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `status --watch` into a pipe prints a whole status once per interval
/// (no screen clearing), and Ctrl-C (SIGINT) ends it with exit 0; on a
/// terminal (a pty from `script`), `q` ends it.
#[test]
fn status_watch_prints_once_per_interval_and_quits() {
    use std::time::{Duration, Instant};
    let bin = env!("CARGO_BIN_EXE_mados-persistence");
    let c = Command::new(bin)
        .args(["status", "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t = Instant::now();
    let o = c.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "slow to stop");
    assert!(o.status.success(), "{:?}", o.status);
    let text = stdout(&o);
    let n = text.matches("persistence:").count();
    assert!((2..=4).contains(&n), "{n} refreshes in 2.5 s:\n{text}");
    assert!(!text.contains("\x1b[2J"), "cleared a pipe's screen");
    // a pty: q quits long before the next refresh
    if Command::new("script").arg("--version").output().is_ok() {
        let mut c = Command::new("script")
            .args(["-qfec", &format!("{bin} status --watch 30"), "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        use std::io::Write;
        c.stdin.as_mut().unwrap().write_all(b"q").unwrap();
        let t = Instant::now();
        let o = c.wait_with_output().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "q did not quit");
        assert!(o.status.success(), "{:?}", o.status);
        assert!(stdout(&o).contains("q or Ctrl-C quits"));
    }
}
