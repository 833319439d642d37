//! `restore`: write one disk of one point to a file or block device.
//!
//! Every block is read from the staging store, decoded and checked against its name, which the
//! manifest (itself self-checked and matched to the point's digest) gives. Zero blocks are left
//! sparse in a file and written as zeros on a block device. Unless `--no-verify`, the
//! destination is then read back and every block compared with the manifest, so a finished
//! restore proves its content. A missing or corrupt block stops the restore with an error that
//! names the disk, the point, the block index and its hash (exit code 65).

use super::{fmt_bytes, parallel};
use crate::catalog::Catalog;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use lifeboat_common::block::{block_len, hash_block};
use lifeboat_common::{BlockHash, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Where a restore reads the point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum From {
    /// The staging store (every point).
    Staging,
    /// The point's EBS snapshot (points on EBS).
    Ebs,
}

pub struct Request {
    pub server: String,
    pub disk: String,
    pub point: String,
    pub to: PathBuf,
    pub force: bool,
    pub verify: bool,
    pub from: From,
    /// Failback onto a disk that holds an older copy: write only the blocks that differ.
    pub only_changed: bool,
    /// With `only_changed`: the destination holds this point, so the blocks to write are
    /// those changed since it (not found by reading the destination first).
    pub since: Option<String>,
    pub json: bool,
}

/// Content that is missing, corrupt or does not match: the restore cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DataError(pub String);

/// Opens where a restore writes. A new file is created here, mode 0600 (a disk image holds
/// everything the server held), never through a symlink. Anything already there is opened
/// without following a link or blocking on a FIFO, and judged by what was opened, not by an
/// earlier look at the path: a block device needs `--force` and is opened exclusively
/// (`O_EXCL`: refused while mounted or held by anyone else); a regular file needs `--force`,
/// and must be ours with a single link.
fn open_destination(to: &Path, size: u64, force: bool, keep: bool) -> anyhow::Result<(File, bool)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    if keep && std::fs::symlink_metadata(to).is_err() {
        bail!(
            "{} does not exist: --only-changed writes over an older copy of the disk; \
             without it, restore creates the file",
            to.display()
        );
    }
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
    {
        Ok(f) => {
            // Sparse: every block not written reads as zeros.
            f.set_len(size)
                .with_context(|| format!("sizing {} to {size} bytes", to.display()))?;
            return Ok((f, false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(anyhow::Error::new(e).context(format!("creating {}", to.display()))),
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_EXCL)
        .open(to)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!(
                "{} is a symbolic link; name the file or device it points to",
                to.display()
            ),
            Some(libc::EBUSY) => anyhow::anyhow!(
                "block device {} is in use (mounted, or open exclusively by another program): \
                 unmount or release it first",
                to.display()
            ),
            _ => anyhow::Error::new(e).context(format!("opening {}", to.display())),
        })?;
    let m = f
        .metadata()
        .with_context(|| format!("inspecting {}", to.display()))?;
    if m.file_type().is_block_device() {
        if !force {
            bail!(
                "{} is a block device: everything on it will be overwritten; pass --force to \
                 restore onto it",
                to.display()
            );
        }
        let mut f = f;
        let dev_size = f.seek(SeekFrom::End(0))?;
        if dev_size < size {
            bail!(
                "block device {} holds {} bytes, less than the disk's {size}",
                to.display(),
                dev_size
            );
        }
        return Ok((f, true));
    }
    if !m.is_file() {
        bail!(
            "{} is neither a regular file nor a block device",
            to.display()
        );
    }
    if !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            to.display()
        );
    }
    if m.uid() != crate::sys::euid() || m.nlink() != 1 {
        bail!(
            "{} belongs to uid {} and has {} link(s): refusing to overwrite it (another \
             user could read the image); remove it first",
            to.display(),
            m.uid(),
            m.nlink()
        );
    }
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", to.display()))?;
    if keep {
        // The older copy stays; only its size follows the disk's (grown or shrunk).
        f.set_len(size)
    } else {
        f.set_len(0).and_then(|()| f.set_len(size))
    }
    .with_context(|| format!("sizing {} to {size} bytes", to.display()))?;
    Ok((f, false))
}

pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub fn run(state_dir: &Path, req: &Request) -> anyhow::Result<()> {
    let catalog = Catalog::new(state_dir);
    // Shared lock: retention and GC wait for the restore to finish.
    let lock = crate::gc::lock_file(state_dir)
        .with_context(|| format!("opening the lock in {}", state_dir.display()))?;
    crate::sys::flock(&lock, false, false)?;
    // In a fleet, every receiver's points (the restore then reads the shared bucket).
    crate::fleet::sync_catalog(state_dir)?;

    let rec = catalog.find(&req.server, &req.point)?;
    let manifest = catalog
        .manifest(&rec, &req.disk)
        .map_err(|e| DataError(format!("server {} point {}: {e}", rec.server, rec.point)))?;
    let size = manifest.disk_size;
    let (dst, is_device) = open_destination(&req.to, size, req.force, req.only_changed)?;
    let ctx =
        |i: usize, h: &BlockHash| format!("disk {} point {} block {i} ({h})", req.disk, rec.point);

    let data_blocks = manifest.data_blocks();
    // Failback: which blocks of the older copy differ from the point (all, without it).
    let mut how = None;
    let need: Option<Vec<bool>> = match (&req.since, req.only_changed) {
        (Some(since), _) if !req.verify => bail!(
            "--since {since} trusts that {} holds that point; only the read-back proves it, \
             so --no-verify cannot go with --since",
            req.to.display()
        ),
        (Some(since), true) => {
            let (need, from) = changed_since(state_dir, req, &rec, &manifest, since)?;
            how = Some(from);
            Some(need)
        }
        (Some(_), false) => bail!("--since goes with --only-changed"),
        (None, true) => Some(differing_blocks(&dst, &manifest, &req.to)?),
        (None, false) => None,
    };
    let mut written = need
        .as_ref()
        .map_or(manifest.hashes.len(), |n| n.iter().filter(|x| **x).count());
    let created = !is_device && !req.only_changed;
    let fail = |e: anyhow::Error| {
        if created {
            let _ = std::fs::remove_file(&req.to);
            return e.context(format!(
                "restore failed; the incomplete {} was removed",
                req.to.display()
            ));
        }
        e.context(format!(
            "restore failed; {} holds an incomplete restore",
            req.to.display()
        ))
    };
    let write_and_sync = |need: Option<&[bool]>| -> anyhow::Result<()> {
        write_blocks(state_dir, req, &rec, &manifest, &dst, is_device, need).map_err(fail)?;
        dst.sync_all()
            .with_context(|| format!("fsync of {}", req.to.display()))
    };
    write_and_sync(need.as_deref())?;

    let mut repaired = 0;
    if req.verify {
        let mut bad = read_back(&dst, &manifest, &req.to, None)?;
        if !bad.is_empty() && req.since.is_some() {
            // The destination did not hold the point named by --since everywhere: write
            // those blocks too, and prove them again.
            eprintln!(
                "{} block(s) of {} did not hold point {}'s content: writing them too",
                bad.len(),
                req.to.display(),
                req.since.as_deref().unwrap_or_default()
            );
            let mut again = vec![false; manifest.hashes.len()];
            for &i in &bad {
                again[i] = true;
            }
            write_and_sync(Some(&again))?;
            repaired = bad.len();
            // Blocks written twice count once.
            written = match &need {
                Some(n) => n.iter().zip(&again).filter(|(a, b)| **a || **b).count(),
                None => manifest.hashes.len(),
            };
            bad = read_back(&dst, &manifest, &req.to, Some(&again))?;
        }
        if let Some(&i) = bad.first() {
            return Err(DataError(format!(
                "{}: read back from {} as other content ({} block(s) differ)",
                ctx(i, &manifest.hashes[i]),
                req.to.display(),
                bad.len()
            ))
            .into());
        }
    }
    let digest = manifest.digest();
    if req.json {
        println!(
            "{}",
            serde_json::json!({
                "server": rec.server, "disk": req.disk, "point": rec.point, "to": req.to,
                "size_bytes": size, "data_blocks": data_blocks,
                "zero_blocks": manifest.hashes.len() - data_blocks,
                "verified": req.verify, "manifest_digest": digest.to_hex(),
                "from": match req.from { From::Staging => "staging", From::Ebs => "ebs" },
                "only_changed": req.only_changed, "blocks_written": written,
                "since": req.since, "changed_from": how, "blocks_repaired": repaired,
            })
        );
    } else {
        println!(
            "restored server {} disk {} point {} to {}: {} ({data_blocks} data blocks{}, {} zero blocks {})",
            rec.server,
            req.disk,
            rec.point,
            req.to.display(),
            fmt_bytes(size),
            match (req.from, req.verify) {
                (From::Staging, true) => ", each verified in the store and read back",
                (From::Staging, false) => ", each verified in the store",
                (From::Ebs, true) => ", each checked against its SHA-256 and the manifest, and read back",
                (From::Ebs, false) => ", each checked against its SHA-256 and the manifest",
            },
            manifest.hashes.len() - data_blocks,
            if is_device { "written" } else { "left sparse" },
        );
        match (&req.since, how) {
            (Some(since), Some(how)) => println!(
                "only changed blocks: {written} of {} blocks changed since point {since} \
                 ({how}) and were written{}",
                manifest.hashes.len(),
                if repaired > 0 {
                    format!(", {repaired} of them found by the read-back")
                } else {
                    String::new()
                }
            ),
            _ if req.only_changed => println!(
                "only changed blocks: {written} of {} blocks differed from {} and were written",
                manifest.hashes.len(),
                req.to.display()
            ),
            _ => {}
        }
        println!("manifest digest {digest}");
    }
    Ok(())
}

/// Writes the point's blocks that `need` asks for (all, without it) to `dst`: from the
/// staging store, each checked against its name, or from EBS.
fn write_blocks(
    state_dir: &Path,
    req: &Request,
    rec: &crate::catalog::PointRecord,
    manifest: &lifeboat_common::manifest::Manifest,
    dst: &File,
    is_device: bool,
    need: Option<&[bool]>,
) -> anyhow::Result<()> {
    let size = manifest.disk_size;
    let needed = |i: usize| need.is_none_or(|n| n[i]);
    // Zeros must be written wherever the destination may hold something else.
    let write_zeros = is_device || req.only_changed;
    let ctx =
        |i: usize, h: &BlockHash| format!("disk {} point {} block {i} ({h})", req.disk, rec.point);
    let pb = progress(size, "restore");
    let r = match req.from {
        From::Staging => {
            let store = crate::store::open_configured(state_dir)?;
            parallel(manifest.hashes.len(), |i| {
                let h = manifest.hashes[i];
                let len = block_len(i as u64, size);
                let off = i as u64 * BLOCK_SIZE as u64;
                if !needed(i) {
                    // Already holds the point's content.
                } else if h.is_zero() {
                    if write_zeros {
                        dst.write_all_at(&vec![0u8; len], off).with_context(|| {
                            format!("writing zeros at block {i} of {}", req.to.display())
                        })?;
                    }
                } else {
                    let plain = store
                        .read(&h)
                        .map_err(|e| DataError(format!("{}: {e}", ctx(i, &h))))?;
                    dst.write_all_at(&plain[..len], off)
                        .with_context(|| format!("writing block {i} to {}", req.to.display()))?;
                }
                pb.inc(len as u64);
                Ok(())
            })
        }
        From::Ebs => from_ebs(state_dir, req, rec, manifest, dst, need, &pb),
    };
    pb.finish_and_clear();
    r
}

/// Reads the destination back and compares every block (or those `only` names) with the
/// manifest; returns the blocks that differ, ascending.
fn read_back(
    dst: &File,
    manifest: &lifeboat_common::manifest::Manifest,
    to: &Path,
    only: Option<&[bool]>,
) -> anyhow::Result<Vec<usize>> {
    let size = manifest.disk_size;
    let bad = std::sync::Mutex::new(Vec::new());
    let pb = progress(size, "verify");
    parallel(manifest.hashes.len(), |i| {
        let len = block_len(i as u64, size);
        if only.is_none_or(|o| o[i]) {
            let mut buf = vec![0u8; len];
            dst.read_exact_at(&mut buf, i as u64 * BLOCK_SIZE as u64)
                .with_context(|| format!("reading back block {i} of {}", to.display()))?;
            if hash_block(&buf) != manifest.hashes[i] {
                bad.lock().unwrap_or_else(|e| e.into_inner()).push(i);
            }
        }
        pb.inc(len as u64);
        Ok(())
    })?;
    pb.finish_and_clear();
    let mut bad = bad.into_inner().unwrap_or_else(|e| e.into_inner());
    bad.sort_unstable();
    Ok(bad)
}

/// The blocks that changed between point `since` (which the destination holds) and the
/// point restored: from their manifests, and, restoring from EBS with both points on EBS,
/// also those EBS's `ListChangedBlocks` names between their snapshots. Returns them with how
/// they were found.
fn changed_since(
    state_dir: &Path,
    req: &Request,
    rec: &crate::catalog::PointRecord,
    manifest: &lifeboat_common::manifest::Manifest,
    since: &str,
) -> anyhow::Result<(Vec<bool>, &'static str)> {
    let catalog = Catalog::new(state_dir);
    let base = catalog.find(&req.server, since)?;
    let old = catalog.manifest(&base, &req.disk).map_err(|e| {
        DataError(format!(
            "server {} point {} (--since): {e}",
            base.server, base.point
        ))
    })?;
    let mut need: Vec<bool> = manifest
        .hashes
        .iter()
        .enumerate()
        .map(|(i, h)| old.hashes.get(i) != Some(h))
        .collect();
    // EBS can only add to what the manifests found: a failure there (a snapshot deleted, a
    // permission missing) is a warning, not a failed restore.
    if req.from == From::Ebs && base.point != rec.point {
        let (first, second) = (base.point.min(rec.point), base.point.max(rec.point));
        match ebs_changed(state_dir, req, first, second, &mut need) {
            Ok(Some(listed)) => {
                tracing::debug!(listed, "ListChangedBlocks");
                return Ok((need, "manifests and EBS ListChangedBlocks"));
            }
            Ok(None) => {}
            Err(e) => eprintln!(
                "warning: EBS ListChangedBlocks between the snapshots of points {first} and \
                 {second}: {e:#}; the manifests alone say what changed"
            ),
        }
    }
    Ok((need, "manifests"))
}

#[cfg(not(feature = "aws"))]
fn ebs_changed(
    _: &Path,
    _: &Request,
    _: u64,
    _: u64,
    _: &mut [bool],
) -> anyhow::Result<Option<u64>> {
    Ok(None)
}

/// Marks what `ListChangedBlocks` names between the snapshots of points `first` and
/// `second` of the disk; None when either point is not on EBS.
#[cfg(feature = "aws")]
fn ebs_changed(
    state_dir: &Path,
    req: &Request,
    first: u64,
    second: u64,
    need: &mut [bool],
) -> anyhow::Result<Option<u64>> {
    use crate::snapshots::ebs::record::{DiskState, EbsRecord};
    let catalog = Catalog::new(state_dir);
    let snapshot = |point| -> anyhow::Result<Option<String>> {
        let r = EbsRecord::load(&catalog, &req.server, point)?;
        Ok(r.disks
            .get(&req.disk)
            .filter(|u| u.state == DiskState::OnEbs)
            .and_then(|u| u.snapshot_id.clone()))
    };
    let (Some(a), Some(b)) = (snapshot(first)?, snapshot(second)?) else {
        return Ok(None);
    };
    let config = lifeboat_common::config::ReceiverConfig::load(&state_dir.join("receiver.toml"))?;
    let Some(ebs) = config.ebs else {
        return Ok(None);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let marked = rt.block_on(async {
        let aws = crate::snapshots::ebs::client::Aws::connect(&ebs).await;
        crate::snapshots::ebs::read::mark_changed(&aws, &a, &b, need).await
    })?;
    Ok(Some(marked))
}

#[cfg(not(feature = "aws"))]
fn from_ebs(
    _: &Path,
    _: &Request,
    _: &crate::catalog::PointRecord,
    _: &lifeboat_common::manifest::Manifest,
    _: &File,
    _: Option<&[bool]>,
    _: &ProgressBar,
) -> anyhow::Result<()> {
    bail!("this lifeboat-receiver was built without AWS support (the `aws` feature)")
}

/// Writes the point from its EBS snapshot: the blocks it holds, fetched many at a time and
/// checked against their SHA-256 and the manifest; zero blocks from the manifest.
#[cfg(feature = "aws")]
fn from_ebs(
    state_dir: &Path,
    req: &Request,
    rec: &crate::catalog::PointRecord,
    manifest: &lifeboat_common::manifest::Manifest,
    dst: &File,
    need: Option<&[bool]>,
    pb: &ProgressBar,
) -> anyhow::Result<()> {
    use crate::snapshots::ebs::record::{DiskState, EbsRecord};
    let cfg_path = state_dir.join("receiver.toml");
    let config = lifeboat_common::config::ReceiverConfig::load(&cfg_path)?;
    let Some(ebs) = config.ebs else {
        bail!(
            "{} has no [ebs] section: this receiver keeps points in its staging store only \
             (restore without --from ebs)",
            cfg_path.display()
        );
    };
    let catalog = Catalog::new(state_dir);
    let record = EbsRecord::load(&catalog, &rec.server, rec.point)?;
    let upload = record.disks.get(&req.disk);
    let snapshot = match upload {
        Some(u) if u.state == DiskState::OnEbs => u.snapshot_id.clone(),
        _ => None,
    };
    let Some(snapshot) = snapshot else {
        bail!(
            "point {} disk {} of server {} is not on EBS ({}); `lifeboat-receiver snapshot \
             --server {} --point {}` puts it there",
            rec.point,
            req.disk,
            rec.server,
            upload.map_or("staged".to_string(), |u| format!("{:?}", u.state)
                .to_lowercase()),
            rec.server,
            rec.point
        );
    };
    let size = manifest.disk_size;
    let needed = |i: usize| need.is_none_or(|n| n[i]);
    // A new file holds zeros already; a device, or an older copy, may not.
    let write_zeros = need.is_some()
        || dst
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device());
    // Zero blocks first.
    for (i, h) in manifest.hashes.iter().enumerate() {
        let len = block_len(i as u64, size);
        if !needed(i) {
            pb.inc(len as u64);
        } else if h.is_zero() {
            if write_zeros {
                dst.write_all_at(&vec![0u8; len], i as u64 * BLOCK_SIZE as u64)
                    .with_context(|| {
                        format!("writing zeros at block {i} of {}", req.to.display())
                    })?;
            }
            pb.inc(len as u64);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = dst.try_clone()?;
    let to = req.to.clone();
    let pbc = pb.clone();
    // One write at a time: dozens of threads writing one file at once spend their time
    // spinning on its inode lock in the kernel (measured: 8 % of the CPU, and the copies
    // slowed by it), while one writer keeps up with the fetches.
    let one_writer = std::sync::Mutex::new(());
    let write = std::sync::Arc::new(move |i: u64, data: &[u8]| -> anyhow::Result<()> {
        let len = block_len(i, size);
        let _w = one_writer.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all_at(&data[..len], i * BLOCK_SIZE as u64)
            .with_context(|| format!("writing block {i} to {}", to.display()))?;
        pbc.inc(len as u64);
        Ok(())
    });
    let manifest = std::sync::Arc::new(manifest.clone());
    let wanted: std::sync::Arc<dyn Fn(u64) -> bool + Send + Sync> = match need {
        Some(n) => {
            let n = n.to_vec();
            std::sync::Arc::new(move |i| n.get(i as usize).copied().unwrap_or(false))
        }
        None => std::sync::Arc::new(|_| true),
    };
    rt.block_on(async {
        let aws = crate::snapshots::ebs::client::Aws::connect(&ebs).await;
        crate::snapshots::ebs::read::fetch_all(
            &aws,
            &snapshot,
            manifest,
            ebs.puts_in_flight,
            wanted,
            write,
        )
        .await
    })
    .map_err(
        |e| match e.downcast::<crate::snapshots::ebs::read::BadBlock>() {
            Ok(bad) => DataError(format!("disk {} point {}: {bad}", req.disk, rec.point)).into(),
            Err(e) => e,
        },
    )?;
    Ok(())
}

/// Reads the destination (an older copy of the disk) and marks each block whose content is
/// not the point's.
fn differing_blocks(
    dst: &File,
    manifest: &lifeboat_common::manifest::Manifest,
    to: &Path,
) -> anyhow::Result<Vec<bool>> {
    let size = manifest.disk_size;
    let n = manifest.hashes.len();
    let differs: Vec<std::sync::atomic::AtomicBool> = (0..n)
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let pb = progress(size, "compare");
    parallel(n, |i| {
        let len = block_len(i as u64, size);
        let mut buf = vec![0u8; len];
        // Past the end of a shorter older copy reads short: that part differs unless zero.
        let got = read_up_to(dst, &mut buf, i as u64 * BLOCK_SIZE as u64)
            .with_context(|| format!("reading block {i} of {}", to.display()))?;
        buf[got..].fill(0);
        if hash_block(&buf) != manifest.hashes[i] {
            differs[i].store(true, std::sync::atomic::Ordering::Relaxed);
        }
        pb.inc(len as u64);
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(differs.into_iter().map(|d| d.into_inner()).collect())
}

fn read_up_to(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
