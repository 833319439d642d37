//! systemd readiness notification (`Type=notify`): sends `READY=1` to `$NOTIFY_SOCKET` when
//! the service runs under systemd; does nothing otherwise.

use std::os::unix::net::UnixDatagram;

/// Tells systemd the service is ready. Errors are ignored: readiness is advisory.
pub fn ready() {
    notify("READY=1");
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    notify("STOPPING=1");
}

fn notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    if bytes.first() == Some(&b'@') {
        // Abstract socket names are not supported by std's path API; systemd uses a path
        // socket by default, so this is left out.
        return;
    }
    let _ = sock.send_to(msg.as_bytes(), &path);
}
