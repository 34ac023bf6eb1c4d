//! The one binary: early boot (`boot`), planning (`plan`); after-boot
//! commands come as further subcommands. All logic is in the library.

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use mados_persistence::disk::layout;
use mados_persistence::settings::size::Size;
use mados_persistence::{boot, companion, manage};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mados-persistence",
    version,
    about = "Persistence for live USB sticks: keep /etc, /usr, /var, /opt and /home across reboots",
    long_about = "Persistence for live USB sticks.\n\n\
        In the initramfs, `boot` finds the stick the live ISO was booted from, creates or checks the \
        ext4 partition labelled `persistence` after the ISO, and layers it over the live root. \
        Anything unexpected ends in RAM mode with the reason recorded in \
        /run/mados-persistence/state.json; the stick stays bootable."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Early boot: find the stick, create/check/mount persistence, layer the overlays.
    #[command(
        after_help = "Example (mkinitcpio late hook):\n  mados-persistence boot --root /new_root"
    )]
    Boot {
        /// The live root assembled by the initramfs.
        #[arg(long, default_value = "/new_root")]
        root: PathBuf,
        /// Use this instead of /proc/cmdline.
        #[arg(long)]
        cmdline: Option<String>,
        /// Where sysfs is mounted.
        #[arg(long, default_value = "/sys", hide = true)]
        sysfs: PathBuf,
        /// The /run that will be moved into the new root.
        #[arg(long, default_value = "/run", hide = true)]
        run: PathBuf,
    },
    /// Is my work being saved, and if not, why? (no root needed)
    #[command(
        after_help = "Examples:\n  mados-persistence status\n  mados-persistence status --json | jq .mode\n  \
        mados-persistence status --watch            # live: RAM tier, syncs, cleanup, every second\n  \
        mados-persistence status --watch 5 --json   # one JSON document a line, every 5 s"
    )]
    Status {
        /// Print one JSON document (schema in README: \"status --json\").
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds (default 1, at most 3600) until q or
        /// Ctrl-C; the live numbers come from the daemon's shared-memory
        /// stats. Into a pipe or file: one status after another.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<u64>,
    },
    /// Create persistence on the boot stick (or --device), keeping this session's changes.
    #[command(after_help = "Examples:\n  sudo mados-persistence enable\n  \
        mados-persistence enable --device madOS.img --size 4G --yes   # prepare an image before its first boot")]
    Enable {
        /// A block device or disk image file (default: the stick this system booted from).
        #[arg(long)]
        device: Option<PathBuf>,
        /// Cap on the new partition's size (default: all free space after the ISO).
        #[arg(long, value_parser = parse_size)]
        size: Option<Size>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Encrypt it (LUKS2, argon2id): every boot asks for the passphrase.
        #[arg(long)]
        encrypt: bool,
        /// With --encrypt: read the passphrase from FILE (`-`: stdin; one
        /// trailing newline is not part of it) instead of asking twice.
        #[arg(long, value_name = "FILE", requires = "encrypt")]
        passphrase_file: Option<PathBuf>,
        /// Tests only: argon2id MEMORY_KIB:ITERATIONS instead of the default cost.
        #[arg(long, hide = true, requires = "encrypt")]
        pbkdf_test_cost: Option<String>,
    },
    /// Boot in RAM mode from the next boot on (or once), keeping the data.
    #[command(
        after_help = "Examples:\n  sudo mados-persistence disable --once\n  sudo mados-persistence enable   # undo"
    )]
    Disable {
        /// Only the next boot runs in RAM mode.
        #[arg(long)]
        once: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Permanently delete the persistence partition; the ISO stays bootable.
    #[command(
        after_help = "Examples:\n  sudo mados-persistence remove\n  mados-persistence remove --device madOS.img --yes"
    )]
    Remove {
        /// Do not ask (otherwise you type the word `remove`).
        #[arg(long)]
        yes: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Overlays set aside when the stick was re-flashed: list, restore, delete.
    #[command(
        subcommand,
        name = "set-aside",
        after_help = "Examples:\n  mados-persistence set-aside list\n  \
        sudo mados-persistence set-aside restore MADOS_R1_2026-01-01-00-00-00-00\n  \
        mados-persistence set-aside delete MADOS_R1_2026-01-01-00-00-00-00 --device madOS.img --yes"
    )]
    SetAside(SetAsideCmd),
    /// Change the passphrase of an encrypted persistence (the new one is added before the old one goes).
    #[command(after_help = "Examples:\n  sudo mados-persistence passphrase\n  \
        mados-persistence passphrase --device madOS.img --old-passphrase-file old --new-passphrase-file new")]
    Passphrase {
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
        /// Read the current passphrase from FILE (`-`: stdin) instead of asking.
        #[arg(long, value_name = "FILE")]
        old_passphrase_file: Option<PathBuf>,
        /// Read the new passphrase from FILE (`-`: stdin) instead of asking twice.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Save an encrypted persistence's LUKS2 header to FILE (or put one back with --restore).
    #[command(
        after_help = "A header backup opens the stick with the passphrases valid when it was made, \
        forever: keep it as safe as the stick, and destroy it after changing a passphrase that leaked.\n\n\
        Examples:\n  sudo mados-persistence header-backup /safe/place/stick-header.img\n  \
        sudo mados-persistence header-backup --restore /safe/place/stick-header.img"
    )]
    HeaderBackup {
        /// The backup file (created; never overwritten).
        file: PathBuf,
        /// Put the header in FILE back on the stick.
        #[arg(long)]
        restore: bool,
        /// With --restore: do not ask.
        #[arg(long)]
        yes: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// The companion: sync the RAM tiers (interval, idle, full, SIGUSR1) and a final sync on SIGTERM.
    #[command(
        after_help = "Run by mados-persistence.service (Type=notify); without systemd it runs in the \
        foreground and logs to stderr. SIGTERM, SIGINT or SIGHUP: final sync, then exit 0. \
        SIGUSR1: sync now.\n\nExample:\n  mados-persistence daemon"
    )]
    Daemon,
    /// Write every RAM tier to the stick now; returns 0 only when it is durable.
    #[command(
        after_help = "Examples:\n  sudo mados-persistence sync\n  sudo mados-persistence sync --json"
    )]
    Sync {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The end of a shutdown: detach the mounts that still hold the persistence partition.
    #[command(
        after_help = "Run by systemd-shutdown from /usr/lib/systemd/system-shutdown/mados-persistence.shutdown, \
        once every process is killed: the overlays over /usr and /etc are detached (lazily), and the \
        partition is unmounted cleanly when systemd-shutdown has switched to the shutdown initramfs \
        (mkinitcpio's `shutdown` hook, dracut's shutdown module). Not for use on a running system."
    )]
    Shutdown,
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  mados-persistence completions bash > /usr/share/bash-completion/completions/mados-persistence"
    )]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(
        after_help = "Example:\n  mados-persistence man > /usr/share/man/man8/mados-persistence.8"
    )]
    Man,
    /// Show a device's or image's layout, its isohybrid gaps, and what boot would do. Changes nothing.
    #[command(
        after_help = "Examples:\n  mados-persistence plan --device /dev/sdb\n  mados-persistence plan --device madOS.img --json"
    )]
    Plan {
        /// A block device or a disk image file.
        #[arg(long)]
        device: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Kernel command line whose parameters apply (e.g. mados.persistence.size=8G).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
}

#[derive(Subcommand)]
enum SetAsideCmd {
    /// What is set aside: name, the release it was made on, when, size.
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Bring NAME back at the next boot that carries its release (the overlays in use set aside in turn).
    Restore {
        /// The set-aside dir, as `list` names it.
        #[arg(required_unless_present = "cancel")]
        name: Option<String>,
        /// Withdraw a restore requested before.
        #[arg(long, conflicts_with = "name")]
        cancel: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Delete NAME for good and free its space.
    Delete {
        name: String,
        /// Do not ask (otherwise you type the word `delete`).
        #[arg(long)]
        yes: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
}

fn parse_size(s: &str) -> Result<Size, String> {
    match Size::parse(s) {
        Ok(Size::Percent(_)) => Err("give an absolute size such as 8G".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

/// Exit codes: 0 ok, 1 error, 2 usage (clap), 3 refused for safety.
fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that only print end quietly when their reader goes away
    // (`status --json | grep -q`), as Unix tools do, instead of failing on
    // EPIPE; the ones that change disks keep running to a safe end.
    if matches!(
        cli.cmd,
        Cmd::Status { .. } | Cmd::Plan { .. } | Cmd::Completions { .. } | Cmd::Man
    ) {
        // SAFETY: setting a signal's disposition back to its default
        // before any thread is started.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    // the walks by directory fd (util::safefs) hold an fd per level of a
    // tree a user may make deep: the soft open-file limit (often 1024)
    // raised to the hard one
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e)
            if e.downcast_ref::<manage::Refused>().is_some()
                || e.downcast_ref::<layout::Invalid>().is_some() =>
        {
            eprintln!("mados-persistence: {e:#}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("mados-persistence: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Boot {
            root,
            cmdline,
            sysfs,
            run,
        } => {
            let mode = boot::run_from_cli(root, cmdline, sysfs, run)?;
            // The boot goes on whatever happened; the exit code only tells the hook.
            println!("mados-persistence: mode {mode}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json, watch } => {
            manage::status(json, watch)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Enable {
            device,
            size,
            yes,
            encrypt,
            passphrase_file,
            pbkdf_test_cost,
        } => {
            let enc = if encrypt {
                Some(manage::enable::EncryptOpts {
                    passphrase_file,
                    pbkdf: match pbkdf_test_cost {
                        Some(c) => mados_persistence::disk::cryptsetup::Pbkdf::parse(&c)?,
                        None => mados_persistence::disk::cryptsetup::DEFAULT_PBKDF,
                    },
                })
            } else {
                None
            };
            manage::enable(device, size, yes, enc)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Disable { once, device } => {
            manage::disable(device, once)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Remove { yes, device } => {
            manage::remove(device, yes)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SetAside(c) => {
            match c {
                SetAsideCmd::List { json, device } => manage::set_aside::list(device, json)?,
                SetAsideCmd::Restore {
                    name,
                    cancel,
                    device,
                } => manage::set_aside::restore(device, name, cancel)?,
                SetAsideCmd::Delete { name, yes, device } => {
                    manage::set_aside::delete(device, name, yes)?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Passphrase {
            device,
            old_passphrase_file,
            new_passphrase_file,
        } => {
            manage::luks::passphrase(device, old_passphrase_file, new_passphrase_file)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::HeaderBackup {
            file,
            restore,
            yes,
            device,
        } => {
            manage::luks::header_backup(device, &file, restore, yes)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Daemon => {
            companion::daemon::run()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sync { json } => Ok(if companion::sync_command(json)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }),
        Cmd::Shutdown => {
            manage::shutdown::shutdown()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mados-persistence",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command())
                .section("8")
                .render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plan {
            device,
            json,
            cmdline,
        } => {
            manage::plan::plan(&device, json, &cmdline)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
