//! Catalog of points in time, on the local filesystem.
//!
//! `servers/<server>/points/<point:016>/` holds one `<disk>.manifest` per disk and
//! `point.json`. `point.json` is written last: a point is listed if and only if its
//! `point.json` exists, so a crash mid-commit leaves no listed point that lacks a manifest.
//! Deleting a point removes `point.json` first, for the same reason.

use lifeboat_common::manifest::{Manifest, ManifestError};
use lifeboat_common::protocol::Consistency;
use lifeboat_common::{durable, BlockHash};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("point record {path} is unreadable: {why}")]
    BadRecord { path: PathBuf, why: String },
    #[error("manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("server {server:?} has no points (known servers: {known})")]
    NoServer { server: String, known: String },
    #[error("server {server} has no point {point:?}; `lifeboat-receiver points --server {server}` lists them")]
    NoPoint { server: String, point: String },
    #[error("point {point} of server {server} has no disk {disk:?} (it has: {known})")]
    NoDisk {
        server: String,
        point: u64,
        disk: String,
        known: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub id: String,
    pub size: u64,
    /// blake3 digest of the manifest (hex).
    pub digest: String,
    /// Non-zero blocks in the point.
    pub data_blocks: u64,
    /// Blocks that differ from the previous point of this disk.
    pub changed_blocks: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointRecord {
    pub server: String,
    pub point: u64,
    /// When the agent cut the point (its clock).
    pub created_unix_ms: u64,
    /// When the receiver committed it: retention ages points by this clock, never the agent's.
    pub committed_unix_ms: u64,
    /// The agent's clock minus the receiver's when the point was committed, as measured.
    #[serde(default)]
    pub agent_clock_skew_ms: Option<i64>,
    pub consistency: Consistency,
    /// The snapshot target that holds the point ("local").
    pub target: String,
    pub disks: Vec<DiskRecord>,
    /// Why the point cannot be restored, once found damaged (from the point's `damaged` file,
    /// never from `point.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// What [`Catalog::point_manifests`] found.
pub enum PointManifests {
    /// Every manifest of the point, verified.
    Sound(Vec<Manifest>),
    /// Why the point cannot be restored.
    Damaged(String),
}

/// Every block the listed points reference, and the points found damaged on the way.
#[derive(Debug, Default)]
pub struct References {
    pub hashes: std::collections::HashSet<BlockHash>,
    /// (server, point, why): a manifest that no longer decodes or matches its record.
    pub damaged: Vec<(String, u64, String)>,
}

/// In a point's directory: why the point was found damaged.
const DAMAGED: &str = "damaged";

pub struct Catalog {
    servers: PathBuf,
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> CatalogError + '_ {
    move |source| CatalogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Catalog {
    pub fn new(state_dir: &Path) -> Catalog {
        Catalog {
            servers: state_dir.join("servers"),
        }
    }

    pub fn server_dir(&self, server: &str) -> PathBuf {
        self.servers.join(server)
    }

    pub fn point_dir(&self, server: &str, point: u64) -> PathBuf {
        self.server_dir(server)
            .join("points")
            .join(format!("{point:016}"))
    }

    /// Server ids that have a directory.
    pub fn servers(&self) -> Result<Vec<String>, CatalogError> {
        let mut out = Vec::new();
        match fs::read_dir(&self.servers) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if let Some(n) = e.file_name().to_str() {
                        if lifeboat_common::config::valid_name(n) {
                            out.push(n.to_string());
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe(&self.servers)(e)),
        }
        out.sort();
        Ok(out)
    }

    /// Listed points of a server, oldest first. Unreadable records are logged and skipped.
    pub fn points(&self, server: &str) -> Result<Vec<PointRecord>, CatalogError> {
        let dir = self.server_dir(server).join("points");
        let mut out = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(ioe(&dir)(e)),
        };
        for e in rd.flatten() {
            let p = e.path().join("point.json");
            match fs::read(&p) {
                // A damaged record is reported, never allowed to stop new points or listings.
                Ok(bytes) => match serde_json::from_slice::<PointRecord>(&bytes) {
                    Ok(mut rec) => {
                        rec.damaged = fs::read_to_string(e.path().join(DAMAGED)).ok();
                        out.push(rec)
                    }
                    Err(e) => tracing::error!(
                        "point record {} is unreadable ({e}); that point is not listed",
                        p.display()
                    ),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ioe(&p)(e)),
            }
        }
        out.sort_by_key(|p| p.point);
        Ok(out)
    }

    /// Resolves `latest` or a point number for a server.
    pub fn find(&self, server: &str, point: &str) -> Result<PointRecord, CatalogError> {
        let points = self.points(server)?;
        if points.is_empty() {
            let known = self.servers()?.join(", ");
            return Err(CatalogError::NoServer {
                server: server.to_string(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known
                },
            });
        }
        let found = if point == "latest" {
            points.last().cloned()
        } else {
            point
                .parse::<u64>()
                .ok()
                .and_then(|n| points.iter().find(|p| p.point == n).cloned())
        };
        found.ok_or_else(|| CatalogError::NoPoint {
            server: server.to_string(),
            point: point.to_string(),
        })
    }

    /// Reads and verifies (self-check and digest) the manifest of one disk of a point.
    pub fn manifest(&self, rec: &PointRecord, disk: &str) -> Result<Manifest, CatalogError> {
        let d = rec
            .disks
            .iter()
            .find(|d| d.id == disk)
            .ok_or_else(|| CatalogError::NoDisk {
                server: rec.server.clone(),
                point: rec.point,
                disk: disk.to_string(),
                known: rec
                    .disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let path = self
            .point_dir(&rec.server, rec.point)
            .join(format!("{disk}.manifest"));
        let bytes = fs::read(&path).map_err(ioe(&path))?;
        let m = Manifest::decode(&bytes).map_err(|source| CatalogError::Manifest {
            path: path.clone(),
            source,
        })?;
        if m.digest().to_hex() != d.digest {
            return Err(CatalogError::BadRecord {
                path,
                why: format!(
                    "manifest digest {} does not match the point record {}",
                    m.digest(),
                    d.digest
                ),
            });
        }
        Ok(m)
    }

    /// Unlists a point (removes `point.json` durably), then removes its files.
    pub fn delete(&self, server: &str, point: u64) -> Result<(), CatalogError> {
        let dir = self.point_dir(server, point);
        let rec = dir.join("point.json");
        match fs::remove_file(&rec) {
            Ok(()) => durable::sync_dir(&dir).map_err(ioe(&dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe(&rec)(e)),
        }
        fs::remove_dir_all(&dir).map_err(ioe(&dir))
    }

    /// Reads and verifies every manifest of a point. A manifest that is gone, does not
    /// decode or does not match its record makes the point [`PointManifests::Damaged`]; an
    /// I/O error is an error, since the manifest may be fine (its blocks must not be swept).
    pub fn point_manifests(&self, rec: &PointRecord) -> Result<PointManifests, CatalogError> {
        let mut out = Vec::with_capacity(rec.disks.len());
        for d in &rec.disks {
            match self.manifest(rec, &d.id) {
                Ok(m) => out.push(m),
                Err(CatalogError::Io { path, source })
                    if source.kind() != io::ErrorKind::NotFound =>
                {
                    return Err(CatalogError::Io { path, source })
                }
                Err(e) => return Ok(PointManifests::Damaged(e.to_string())),
            }
        }
        Ok(PointManifests::Sound(out))
    }

    /// Every block hash referenced by any listed point of any server, and the points found
    /// damaged on the way (reported, not fatal: one bad point must not stop GC for everyone).
    pub fn referenced(&self) -> Result<References, CatalogError> {
        let mut refs = References::default();
        for server in self.servers()? {
            for rec in self.points(&server)? {
                if rec.damaged.is_some() {
                    continue;
                }
                match self.point_manifests(&rec)? {
                    PointManifests::Sound(ms) => {
                        for m in ms {
                            refs.hashes
                                .extend(m.hashes.into_iter().filter(|h| !h.is_zero()));
                        }
                    }
                    PointManifests::Damaged(why) => {
                        refs.damaged.push((server.clone(), rec.point, why))
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Records durably that a point cannot be restored, and why; `points` and `servers`
    /// report it, and retention no longer counts it as a point kept.
    pub fn mark_damaged(&self, server: &str, point: u64, why: &str) -> Result<(), CatalogError> {
        let path = self.point_dir(server, point).join(DAMAGED);
        durable::write_atomic(&path, why.as_bytes()).map_err(ioe(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(server: &str, point: u64) -> PointRecord {
        PointRecord {
            server: server.into(),
            point,
            created_unix_ms: point * 1000,
            committed_unix_ms: point * 1000 + 5,
            agent_clock_skew_ms: None,
            consistency: Consistency::BestEffort,
            target: "local".into(),
            disks: vec![],
            damaged: None,
        }
    }

    #[test]
    fn listing_skips_damaged_and_unfinished_points() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::new(d.path());
        for p in 1..=3 {
            let dir = c.point_dir("s1", p);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("point.json"),
                serde_json::to_vec(&record("s1", p)).unwrap(),
            )
            .unwrap();
        }
        // A point whose record was never written (crash mid-commit) is not listed.
        std::fs::create_dir_all(c.point_dir("s1", 4)).unwrap();
        // A damaged record is skipped, not fatal.
        std::fs::write(c.point_dir("s1", 2).join("point.json"), b"{not json").unwrap();
        let points: Vec<u64> = c.points("s1").unwrap().iter().map(|p| p.point).collect();
        assert_eq!(points, vec![1, 3]);
        assert_eq!(c.find("s1", "latest").unwrap().point, 3);
        assert!(matches!(
            c.find("s1", "2"),
            Err(CatalogError::NoPoint { .. })
        ));
        assert!(matches!(
            c.find("nobody", "latest"),
            Err(CatalogError::NoServer { .. })
        ));
        c.delete("s1", 3).unwrap();
        assert_eq!(c.find("s1", "latest").unwrap().point, 1);
    }
}
