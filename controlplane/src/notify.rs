//! systemd readiness (sd_notify(3)): with `Type=notify`, uturn sends `READY=1` on
//! `$NOTIFY_SOCKET` once its workers serve. After a hot upgrade the old process names the new
//! one with `MAINPID=` and the new one sends `READY=1` (the unit needs `NotifyAccess=all`, as
//! docs/uturn.service has). Without `$NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager.
fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        // An abstract socket name (Linux).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        debug!("sd_notify {state:?}: {e}");
    }
}

/// The workers serve. `upgraded`: this process took over from another, so it names itself the
/// main process too.
pub fn ready(upgraded: bool) {
    if upgraded {
        send(&format!("MAINPID={}\nREADY=1\nSTATUS=serving (hot upgrade)", std::process::id()));
    } else {
        send("READY=1\nSTATUS=serving");
    }
}

/// A hot upgrade handed everything to `pid`.
pub fn main_pid(pid: u32) {
    send(&format!("MAINPID={pid}"));
}

/// A free-form status line (`systemctl status` shows it).
pub fn status(text: &str) {
    send(&format!("STATUS={text}"));
}

/// The relay is stopping.
pub fn stopping() {
    send("STOPPING=1");
}

#[cfg(test)]
mod tests {
    #[test]
    fn readiness_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("uturn-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let rx = std::os::unix::net::UnixDatagram::bind(&dir).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        // SAFETY-free: this test alone sets the variable, before anything reads it.
        std::env::set_var("NOTIFY_SOCKET", &dir);
        super::ready(true);
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.contains("READY=1") && text.contains(&format!("MAINPID={}", std::process::id())), "{text}");
        std::env::remove_var("NOTIFY_SOCKET");
        let _ = std::fs::remove_file(&dir);
    }
}
