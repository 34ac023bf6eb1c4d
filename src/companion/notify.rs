//! systemd's readiness protocol (`sd_notify(3)`), written by hand (no
//! libsystemd in a static binary): one datagram of `KEY=VALUE` lines to
//! the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace). Without the variable (another init, a terminal)
//! nothing is sent.

use anyhow::{Context, Result};
use std::os::unix::net::UnixDatagram;

pub fn notify(msg: &str) -> Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound().context("creating the notify socket")?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(msg.as_bytes(), &addr)
    } else {
        sock.send_to(msg.as_bytes(), &target)
    }
    .with_context(|| format!("notifying systemd at {target}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_to_the_socket() {
        let p = std::env::temp_dir().join(format!("mados-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let rx = UnixDatagram::bind(&p).unwrap();
        // SAFETY: this test is the only one touching NOTIFY_SOCKET
        unsafe { std::env::set_var("NOTIFY_SOCKET", &p) };
        assert!(notify("READY=1\nSTATUS=syncing 1 tier").unwrap());
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=syncing 1 tier");
        assert!(!notify("READY=1").unwrap(), "no socket: nothing sent");
        std::fs::remove_file(&p).unwrap();
    }
}
