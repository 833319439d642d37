//! moto in server mode (the pip package, installed by `tests/prereqs.sh` into its own
//! virtualenv), for EC2's images and instances: started on a free loopback port, killed on
//! drop.

use super::{free_port, wait_for, Proc};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub struct Moto {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl Moto {
    /// Starts moto; `None` (said loudly) where it is not installed, except under CI, where
    /// that is a failure.
    pub fn start(root: &Path) -> Option<Moto> {
        let exe = std::env::var("LIFEBOAT_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        if Command::new(&exe).arg("--help").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "moto_server ({exe}) is needed under CI: tests/run.sh installs it"
            );
            eprintln!("SKIPPED (loudly): {exe} not found; run tests/run.sh to install moto");
            return None;
        }
        let port = free_port();
        let mut proc = Proc::new(root.join("moto.log"));
        let mut cmd = Command::new(&exe);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        proc.start(cmd);
        wait_for("moto to listen", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Moto {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _proc: proc,
        })
    }
}
