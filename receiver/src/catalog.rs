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
    /// How the agent cut the point: why it is best-effort, or how long the freeze took.
    #[serde(default)]
    pub consistency_why: String,
    /// The snapshot target that holds the point ("local").
    pub target: String,
    pub disks: Vec<DiskRecord>,
    /// Under S3 Object Lock until then (unix ms, the receiver's clock): its manifests and this
    /// record in the bucket cannot be deleted before, and retention keeps it (`[s3]
    /// object_lock_days`). Whether every block it names is locked as long is the lock
    /// keeper's business ([`crate::fleet::Fleet::keep_locks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_unix_ms: Option<u64>,
    /// Why the point cannot be restored, once found damaged (from the point's `damaged` file,
    /// never from `point.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// What [`Catalog::disk_manifest`] found for one disk of a point.
pub enum ManifestState {
    /// Read and verified.
    Sound(Manifest),
    /// Certainly bad (gone, corrupt, or not the manifest its record names): that disk of
    /// the point cannot be restored.
    Damaged(String),
    /// Cannot tell (an I/O error, or a format this build does not read): whatever it
    /// references must be kept.
    Unknown(String),
}

/// Every block the listed points reference, and what could not be read on the way.
#[derive(Debug, Default)]
pub struct References {
    pub hashes: std::collections::HashSet<BlockHash>,
    /// (server, point, disk, why): manifests found damaged, not yet marked so.
    pub damaged: Vec<(String, u64, String, String)>,
    /// What could not be read: while anything is here, nothing may be swept.
    pub unknown: Vec<String>,
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
        Ok(self.scan_points(server)?.0)
    }

    /// As [`Catalog::points`], with the paths of the records that could not be read (GC must
    /// not sweep what they may reference).
    pub fn scan_points(
        &self,
        server: &str,
    ) -> Result<(Vec<PointRecord>, Vec<PathBuf>), CatalogError> {
        let dir = self.server_dir(server).join("points");
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((out, unreadable)),
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
                    Err(err) => {
                        tracing::error!(
                            "point record {} is unreadable ({err}); that point is not listed",
                            p.display()
                        );
                        unreadable.push(p);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ioe(&p)(e)),
            }
        }
        out.sort_by_key(|p| p.point);
        Ok((out, unreadable))
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

    /// Writes a point from its files as another receiver wrote them (the fleet's bucket):
    /// each manifest checked against the record and made durable, `point.json` last.
    pub fn import(
        &self,
        rec: &PointRecord,
        record_json: &[u8],
        manifests: &[(String, Vec<u8>)],
    ) -> Result<(), CatalogError> {
        let dir = self.point_dir(&rec.server, rec.point);
        durable::create_dir_all_durable(&dir).map_err(ioe(&dir))?;
        for (disk, bytes) in manifests {
            let p = dir.join(format!("{disk}.manifest"));
            let m = Manifest::decode(bytes).map_err(|source| CatalogError::Manifest {
                path: p.clone(),
                source,
            })?;
            if !rec
                .disks
                .iter()
                .any(|d| d.id == *disk && d.digest == m.digest().to_hex())
            {
                return Err(CatalogError::BadRecord {
                    path: p,
                    why: format!("manifest digest {} is not the point record's", m.digest()),
                });
            }
            durable::write_atomic(&p, bytes).map_err(ioe(&p))?;
        }
        let p = dir.join("point.json");
        durable::write_atomic(&p, record_json).map_err(ioe(&p))
    }

    /// Unlists a point (removes `point.json` durably), then removes its files.
    pub fn delete(&self, server: &str, point: u64) -> Result<(), CatalogError> {
        let dir = self.point_dir(server, point);
        let rec = dir.join("point.json");
        match fs::remove_file(&rec) {
            Ok(()) => match durable::sync_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(ioe(&dir)(e)),
                _ => {}
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe(&rec)(e)),
        }
        // Gone already: another process (retention in `serve`, a command syncing a fleet's
        // catalog) deleted it meanwhile.
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ioe(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Reads and verifies the manifest of one disk of a point, saying whether it is sound,
    /// certainly damaged, or cannot be judged (see [`ManifestState`]).
    pub fn disk_manifest(&self, rec: &PointRecord, disk: &str) -> ManifestState {
        match self.manifest(rec, disk) {
            Ok(m) => ManifestState::Sound(m),
            Err(e @ CatalogError::Io { .. }) => match &e {
                CatalogError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    ManifestState::Damaged(e.to_string())
                }
                _ => ManifestState::Unknown(e.to_string()),
            },
            Err(
                e @ CatalogError::Manifest {
                    source: ManifestError::Version(_),
                    ..
                },
            ) => ManifestState::Unknown(e.to_string()),
            Err(e) => ManifestState::Damaged(e.to_string()),
        }
    }

    /// Every block hash referenced by any listed point of any server. A damaged disk
    /// manifest is reported (once: not again once its point is marked), never fatal, and the
    /// point's other disks still count; anything unreadable is listed in `unknown`.
    pub fn referenced(&self) -> Result<References, CatalogError> {
        let mut refs = References::default();
        for server in self.servers()? {
            let (points, unreadable) = self.scan_points(&server)?;
            refs.unknown.extend(
                unreadable
                    .iter()
                    .map(|p| format!("{} is unreadable", p.display())),
            );
            for rec in points {
                for d in &rec.disks {
                    match self.disk_manifest(&rec, &d.id) {
                        ManifestState::Sound(m) => refs
                            .hashes
                            .extend(m.hashes.into_iter().filter(|h| !h.is_zero())),
                        ManifestState::Damaged(why) => {
                            let known = rec.damaged.as_deref().is_some_and(|t| {
                                t.lines().any(|l| l.starts_with(&format!("disk {}:", d.id)))
                            });
                            if !known {
                                refs.damaged
                                    .push((server.clone(), rec.point, d.id.clone(), why));
                            }
                        }
                        ManifestState::Unknown(why) => refs.unknown.push(why),
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Records durably that a disk of a point cannot be restored, and why (one line per
    /// disk in the point's `damaged` file); `points` and `servers` report it, and retention no
    /// longer counts the point as one kept.
    pub fn mark_damaged(
        &self,
        server: &str,
        point: u64,
        disk: &str,
        why: &str,
    ) -> Result<(), CatalogError> {
        let path = self.point_dir(server, point).join(DAMAGED);
        let mut text = fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&format!("disk {disk}: {}\n", why.replace('\n', " ")));
        durable::write_atomic(&path, text.as_bytes()).map_err(ioe(&path))
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
            consistency_why: String::new(),
            target: "local".into(),
            disks: vec![],
            damaged: None,
            locked_until_unix_ms: None,
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
        // Deleted twice (two processes at once): the second finds nothing, and that is fine.
        c.delete("s1", 3).unwrap();
        assert_eq!(c.find("s1", "latest").unwrap().point, 1);
    }
}
