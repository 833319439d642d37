//! Who this agent is beyond its configured `server_id`, so that the receiver can refuse a
//! second machine claiming the same server (a cloned VM keeps the host name and often the
//! whole disk) instead of interleaving two machines' disks.
//!
//! The instance id is a digest of three things, each present or not: `/etc/machine-id`, the
//! hypervisor's SMBIOS product UUID (a clone gets a new one), and a random id the agent
//! creates once in its state directory (a reinstall or a second agent on one host gets a new
//! one). It is stable across restarts and reboots.

use lifeboat_common::durable;
use std::io;
use std::path::Path;

/// The file under the state directory that holds this installation's random id.
const INSTALL_ID: &str = "install-id";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// 16 hex digits, stable for this machine and installation.
    pub instance: String,
    /// The host name, for people reading the receiver's refusals and listings.
    pub hostname: String,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Loads this agent's identity, creating the installation id in `state_dir` on first use.
pub fn load(state_dir: &Path) -> io::Result<Identity> {
    let path = state_dir.join(INSTALL_ID);
    let install = match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() == 32 => s.trim().to_string(),
        Ok(_) | Err(_) => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            durable::write_atomic(&path, id.as_bytes())?;
            id
        }
    };
    let machine = read_trimmed("/etc/machine-id");
    let hardware = read_trimmed("/sys/class/dmi/id/product_uuid");
    if hardware.is_empty() {
        tracing::warn!(
            "no SMBIOS product UUID (/sys/class/dmi/id/product_uuid): this machine's instance id \
             rests on /etc/machine-id and {}; a clone of its disk that keeps both (a recovery \
             instance, a copied VM) would claim to be this machine",
            path.display()
        );
    }
    let mut h = blake3::Hasher::new();
    for part in [machine, hardware, install] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let instance = h.finalize().to_hex()[..16].to_string();
    let hostname = read_trimmed("/proc/sys/kernel/hostname");
    Ok(Identity {
        instance,
        hostname: if hostname.is_empty() {
            "unknown-host".into()
        } else {
            hostname.chars().take(255).collect()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_per_state_dir_and_distinct_across_them() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = load(a.path()).unwrap();
        assert_eq!(load(a.path()).unwrap(), first);
        assert_eq!(first.instance.len(), 16);
        assert_ne!(load(b.path()).unwrap().instance, first.instance);
    }
}
