//! systemd notifications (`Type=notify`): `READY=1`, `STOPPING=1` and the watchdog's
//! `WATCHDOG=1` to `$NOTIFY_SOCKET` when the service runs under systemd; nothing otherwise.

use std::os::unix::net::UnixDatagram;

/// Tells systemd the service is ready. Errors are ignored: readiness is advisory.
pub fn ready() {
    notify("READY=1");
}

/// The unit's watchdog period (`WatchdogSec=`), when systemd watches this process.
pub fn watchdog_period() -> Option<std::time::Duration> {
    static PERIOD: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *PERIOD.get_or_init(|| {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        // WATCHDOG_PID, when set, names the process meant (not a child that inherited it).
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| std::time::Duration::from_micros(usec))
    })
}

/// Tells systemd the service is alive (`WATCHDOG=1`), at most every third of the watchdog
/// period and every 5 s; nothing when the unit has no watchdog. Called from the daemons' main loops (never
/// from a side thread, which would keep pinging while the work is stuck).
pub fn watchdog() {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let Some(period) = watchdog_period() else {
        return;
    };
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|t| t.elapsed() < (period / 3).min(std::time::Duration::from_secs(5))) {
        return;
    }
    *last = Some(std::time::Instant::now());
    notify("WATCHDOG=1");
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
