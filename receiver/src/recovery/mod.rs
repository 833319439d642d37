//! Recovery and drills: a point launched as an EC2 instance, in the manner of DRS.
//!
//! `recover` puts the point on EBS if it is not there yet (incrementally, from the nearest
//! snapshot), registers an image whose block device mappings are the point's snapshots (the
//! boot disk as root device), launches one instance from it with the server's launch
//! settings (`[recovery.<server>]` over `[recovery.default]`), and waits until it runs. A drill
//! is the same, tagged `lifeboat:drill = true`, so `drills` can list and clean it up.
//!
//! While a recovery runs, the point is pinned (`recovery.pin` in its catalog directory): EBS
//! retention leaves its snapshots alone. Once an image uses them, EC2 refuses to delete them
//! anyway (`InvalidSnapshot.InUse`), and retention keeps them until the image is gone.

use crate::catalog::Catalog;
use std::path::PathBuf;

#[cfg(feature = "aws")]
pub mod launch;

/// A pin file younger than this holds the point's snapshots; an older one is stale (a
/// recovery killed long ago).
pub const PIN_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

fn pin_path(catalog: &Catalog, server: &str, point: u64) -> PathBuf {
    catalog.point_dir(server, point).join("recovery.pin")
}

/// Whether a recovery in progress holds the point.
pub fn pinned(catalog: &Catalog, server: &str, point: u64) -> bool {
    std::fs::metadata(pin_path(catalog, server, point))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < PIN_MAX_AGE))
}

/// Held while a recovery of the point runs; removed when dropped.
pub struct Pin(PathBuf);

impl Pin {
    pub fn take(catalog: &Catalog, server: &str, point: u64) -> std::io::Result<Pin> {
        let p = pin_path(catalog, server, point);
        lifeboat_common::durable::write_atomic(&p, std::process::id().to_string().as_bytes())?;
        Ok(Pin(p))
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
