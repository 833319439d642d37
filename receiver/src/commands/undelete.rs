//! `undelete`: brings back what was deleted from the bucket of `[s3]` since a given time.
//!
//! In a versioned bucket (as Object Lock needs) a plain DELETE does not remove an object: it
//! puts a delete marker over it, and the versions below stay (locked ones cannot be removed
//! by anyone before their lock ends). An intruder holding the receivers' credentials, or a
//! mistake, can so hide points and blocks from every receiver. This removes the delete markers
//! placed since `--since` under the prefix, so what they hid is current again; the receivers
//! then see it at their next reading of the bucket (restart them to be sure).
//!
//! Run it with credentials allowed `s3:ListBucketVersions` and `s3:DeleteObjectVersion` on
//! the prefix: an admin's, not the receivers' role (which should not have the second).

#[cfg(not(feature = "aws"))]
pub fn run(_: &std::path::Path, _: &str, _: bool, _: bool) -> anyhow::Result<()> {
    anyhow::bail!("this lifeboat-receiver was built without AWS support (the `aws` feature)")
}

#[cfg(feature = "aws")]
pub fn run(
    state_dir: &std::path::Path,
    since: &str,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    use crate::aws::s3::S3;
    use aws_smithy_types::date_time::{DateTime, Format};
    let config = lifeboat_common::config::ReceiverConfig::load(&state_dir.join("receiver.toml"))?;
    let Some(cfg) = config.s3 else {
        anyhow::bail!("undelete works on the bucket of [s3], and receiver.toml has no [s3]");
    };
    let since = DateTime::from_str(since, Format::DateTime)
        .ok()
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--since {since:?} is not a time such as 2026-12-03T18:00:00Z (RFC 3339, UTC)"
            )
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s3 = rt.block_on(S3::connect(&cfg));
    let markers: Vec<_> = rt
        .block_on(s3.delete_markers(""))?
        .into_iter()
        .filter(|m| m.deleted >= since)
        .collect();
    let ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let mut undeleted = Vec::new();
    let mut failed = Vec::new();
    if !dry_run {
        let pb = indicatif::ProgressBar::new(markers.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message("undelete");
        for m in &markers {
            match rt.block_on(s3.delete_version(&m.key, &m.version)) {
                Ok(()) => undeleted.push(m.key.clone()),
                Err(e) => failed.push((m.key.clone(), e.to_string())),
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
    }
    if json {
        let v = serde_json::json!({
            "bucket": cfg.bucket,
            "prefix": cfg.prefix,
            "dry_run": dry_run,
            "deleted_since": markers.iter().map(|m| serde_json::json!({
                "key": m.key,
                "deleted_unix_ms": ms(m.deleted),
            })).collect::<Vec<_>>(),
            "undeleted": undeleted.len(),
            "failed": failed.iter().map(|(k, e)| serde_json::json!({"key": k, "error": e})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let rows: Vec<Vec<String>> = markers
            .iter()
            .map(|m| vec![super::fmt_utc(ms(m.deleted)), m.key.clone()])
            .collect();
        if rows.is_empty() {
            println!("nothing under {} was deleted since then", s3.url(""));
        } else {
            super::print_table(&["DELETED (UTC)", "KEY"], &rows);
            if dry_run {
                println!(
                    "{} objects would come back (--dry-run: nothing changed)",
                    rows.len()
                );
            } else {
                println!(
                    "{} objects are back; restart the receivers so that they read the bucket \
                     again",
                    undeleted.len()
                );
            }
        }
        for (k, e) in &failed {
            println!("error: {k}: {e}");
        }
    }
    if let Some((k, e)) = failed.first() {
        anyhow::bail!(
            "{} of {} delete markers could not be removed, e.g. {}: {e}",
            failed.len(),
            markers.len(),
            s3.url(k)
        );
    }
    Ok(())
}
