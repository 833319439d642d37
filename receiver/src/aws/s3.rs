//! The S3 client of the receiver: objects under one bucket and prefix, every call through the
//! retry policy of [`super::retry`], conditional writes for what must not be overwritten
//! blindly (leases).
//!
//! Keys are given relative to the configured prefix; the prefix is added here and nowhere
//! else.

use super::retry::{CallError, Retrier};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::ObjectLockMode;
use lifeboat_common::config::{LockMode, S3Config};
use std::time::SystemTime;

/// One bucket under one prefix.
#[derive(Clone)]
pub struct S3 {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    prefix: String,
    pub retrier: Retrier,
}

/// What a conditional PUT requires of the object already there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Any object or none: an unconditional write.
    None,
    /// No object may exist (`If-None-Match: *`).
    Absent,
    /// The object must still have this ETag (`If-Match`).
    ETag(String),
}

/// A PUT refused by its condition.
#[derive(Debug)]
pub enum PutError {
    /// The condition did not hold: another writer got there first (412 Precondition Failed).
    Lost,
    /// Another conditional write of the same key is in flight (409
    /// ConditionalRequestConflict): it may yet fail, so nothing is known.
    Conflict,
    Failed(CallError),
}

impl std::fmt::Display for PutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PutError::Lost => f.write_str("the object changed since it was read"),
            PutError::Conflict => f.write_str("another conditional write of it was in flight"),
            PutError::Failed(e) => e.fmt(f),
        }
    }
}

/// What a PUT wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub etag: String,
    /// The new version's id (a bucket with versioning, as Object Lock needs).
    pub version: Option<String>,
}

/// An object's Object Lock: its mode, and when it ends.
#[derive(Clone, Copy, Debug)]
pub struct Lock {
    pub mode: LockMode,
    pub until: SystemTime,
}

/// Where an object stands under Object Lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// No such object.
    Missing,
    Unlocked,
    /// Locked until then.
    Until(SystemTime),
}

/// A call's answer, `None` where S3 said 404 (no such object or configuration).
fn absent_as_none<T>(r: Result<T, CallError>) -> Result<Option<T>, CallError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.status() == Some(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A delete marker that hides a key (see [`S3::delete_markers`]).
pub struct Marker {
    /// The key, relative to the prefix.
    pub key: String,
    pub version: String,
    /// When the DELETE came.
    pub deleted: SystemTime,
}

/// One object of a listing.
pub struct Listed {
    /// The key, relative to the prefix.
    pub key: String,
    pub modified: SystemTime,
    pub size: u64,
}

impl S3 {
    pub async fn connect(cfg: &S3Config) -> S3 {
        let shared = super::sdk_config(
            &cfg.region,
            cfg.connect_timeout_secs,
            cfg.attempt_timeout_secs,
        )
        .await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared).force_path_style(cfg.path_style);
        if let Some(u) = &cfg.endpoint_url {
            b = b.endpoint_url(u);
        }
        S3 {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            retrier: Retrier::new(cfg.max_attempts),
        }
    }

    /// Over a client built elsewhere (another credentials provider, a test's).
    pub fn from_client(
        client: aws_sdk_s3::Client,
        bucket: &str,
        prefix: &str,
        max_attempts: u32,
    ) -> S3 {
        S3 {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            retrier: Retrier::new(max_attempts),
        }
    }

    /// This client, sending no attempt of any request after `t` (see [`Retrier::send_by`]).
    pub fn with_send_by(&self, t: crate::lease::Moment) -> S3 {
        let mut s = self.clone();
        s.retrier.send_by = Some(t);
        s
    }

    /// The full key of `rel`.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// For messages: `s3://bucket/prefix+rel`.
    pub fn url(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(rel))
    }

    /// Writes `body` at `rel` if `cond` holds; returns the new ETag.
    pub async fn put(
        &self,
        rel: &str,
        body: Vec<u8>,
        cond: &Condition,
    ) -> Result<String, PutError> {
        self.put_locked(rel, body, cond, None).await.map(|w| w.etag)
    }

    /// As [`S3::put`], the new version under Object Lock until `lock.until` (the SDK sends
    /// the checksum S3 demands of a locked write).
    pub async fn put_locked(
        &self,
        rel: &str,
        body: Vec<u8>,
        cond: &Condition,
        lock: Option<&Lock>,
    ) -> Result<Written, PutError> {
        let key = self.key(rel);
        let r = self
            .retrier
            .run("PutObject", &self.url(rel), None, || {
                let mut req = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .body(ByteStream::from(body.clone()));
                match cond {
                    Condition::None => {}
                    Condition::Absent => req = req.if_none_match("*"),
                    Condition::ETag(e) => req = req.if_match(e),
                }
                if let Some(l) = lock {
                    req = req
                        .object_lock_mode(ObjectLockMode::from(l.mode.as_s3()))
                        .object_lock_retain_until_date(DateTime::from(l.until));
                }
                req.send()
            })
            .await;
        match r {
            Ok(out) => Ok(Written {
                etag: out.e_tag().unwrap_or_default().to_string(),
                version: out.version_id().map(str::to_string),
            }),
            Err(e) if e.status() == Some(412) && *cond != Condition::None => Err(PutError::Lost),
            Err(e) if e.status() == Some(409) && *cond != Condition::None => {
                Err(PutError::Conflict)
            }
            Err(e) => Err(PutError::Failed(e)),
        }
    }

    /// The object at `rel` and its ETag; `None` if there is none.
    pub async fn get(&self, rel: &str) -> Result<Option<(Vec<u8>, String)>, CallError> {
        let key = self.key(rel);
        let what = self.url(rel);
        let r =
            self.retrier
                .run("GetObject", &what, None, || async {
                    let out = self
                        .client
                        .get_object()
                        .bucket(&self.bucket)
                        .key(&key)
                        .send()
                        .await?;
                    let etag = out.e_tag().unwrap_or_default().to_string();
                    // A body cut short (a broken or stalled connection) may pass: tried again like
                    // a timeout.
                    let body =
                        out.body.collect().await.map_err(
                            aws_smithy_runtime_api::client::result::SdkError::timeout_error,
                        )?;
                    Ok((body.into_bytes().to_vec(), etag))
                })
                .await;
        absent_as_none(r)
    }

    /// Whether `rel` exists (HEAD).
    pub async fn exists(&self, rel: &str) -> Result<bool, CallError> {
        let key = self.key(rel);
        let r = self
            .retrier
            .run("HeadObject", &self.url(rel), None, || {
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
            })
            .await;
        absent_as_none(r).map(|o| o.is_some())
    }

    /// Where `rel` (its `version`, else its current one) stands under Object Lock (HEAD),
    /// and which version that is.
    pub async fn retention(
        &self,
        rel: &str,
        version: Option<&str>,
    ) -> Result<(Retention, Option<String>), CallError> {
        let key = self.key(rel);
        let r = self
            .retrier
            .run("HeadObject", &self.url(rel), None, || {
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .set_version_id(version.map(str::to_string))
                    .send()
            })
            .await;
        match r {
            Ok(out) => Ok((
                out.object_lock_retain_until_date()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .map_or(Retention::Unlocked, Retention::Until),
                out.version_id().map(str::to_string),
            )),
            // No such key, or no such version (or a delete marker).
            Err(e) if matches!(e.status(), Some(404) | Some(405)) => Ok((Retention::Missing, None)),
            Err(e) => Err(e),
        }
    }

    /// Moves the lock of `rel` (its `version`, else its current one) to `lock`
    /// (PutObjectRetention). S3 refuses to bring a lock's end nearer.
    pub async fn extend_lock(
        &self,
        rel: &str,
        version: Option<&str>,
        lock: &Lock,
    ) -> Result<(), CallError> {
        use aws_sdk_s3::types::{ObjectLockRetention, ObjectLockRetentionMode};
        let key = self.key(rel);
        let retention = ObjectLockRetention::builder()
            .mode(ObjectLockRetentionMode::from(lock.mode.as_s3()))
            .retain_until_date(DateTime::from(lock.until))
            .build();
        self.retrier
            .run("PutObjectRetention", &self.url(rel), None, || {
                self.client
                    .put_object_retention()
                    .bucket(&self.bucket)
                    .key(&key)
                    .set_version_id(version.map(str::to_string))
                    .retention(retention.clone())
                    .send()
            })
            .await
            .map(|_| ())
    }

    /// Every delete marker under `rel_prefix` that is the current version of its key (what a
    /// plain DELETE in a versioned bucket leaves, hiding the versions below it).
    pub async fn delete_markers(&self, rel_prefix: &str) -> Result<Vec<Marker>, CallError> {
        let prefix = self.key(rel_prefix);
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .retrier
                .run("ListObjectVersions", &self.url(rel_prefix), None, || {
                    self.client
                        .list_object_versions()
                        .bucket(&self.bucket)
                        .prefix(&prefix)
                        .set_key_marker(key_marker.clone())
                        .set_version_id_marker(version_marker.clone())
                        .send()
                })
                .await?;
            for m in page.delete_markers() {
                let (Some(k), Some(v)) = (m.key(), m.version_id()) else {
                    continue;
                };
                if m.is_latest() != Some(true) {
                    continue;
                }
                out.push(Marker {
                    key: k.strip_prefix(&self.prefix).unwrap_or(k).to_string(),
                    version: v.to_string(),
                    deleted: m
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes exactly `version` of `rel` (a delete marker's: the version below it is current
    /// again).
    pub async fn delete_version(&self, rel: &str, version: &str) -> Result<(), CallError> {
        let key = self.key(rel);
        self.retrier
            .run("DeleteObject", &self.url(rel), None, || {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .version_id(version)
                    .send()
            })
            .await
            .map(|_| ())
    }

    /// Whether a lifecycle rule of the bucket expires noncurrent versions (a versioned bucket
    /// keeps every overwritten and deleted object otherwise).
    pub async fn expires_noncurrent_versions(&self) -> Result<bool, CallError> {
        let what = format!("s3://{}", self.bucket);
        let r = self
            .retrier
            .run("GetBucketLifecycleConfiguration", &what, None, || {
                self.client
                    .get_bucket_lifecycle_configuration()
                    .bucket(&self.bucket)
                    .send()
            })
            .await;
        // NoSuchLifecycleConfiguration: none.
        absent_as_none(r).map(|out| {
            out.is_some_and(|out| {
                out.rules().iter().any(|r| {
                    r.status() == &aws_sdk_s3::types::ExpirationStatus::Enabled
                        && r.noncurrent_version_expiration().is_some()
                })
            })
        })
    }

    /// Whether the bucket has Object Lock enabled.
    pub async fn object_lock_enabled(&self) -> Result<bool, CallError> {
        let what = format!("s3://{}", self.bucket);
        let r = self
            .retrier
            .run("GetObjectLockConfiguration", &what, None, || {
                self.client
                    .get_object_lock_configuration()
                    .bucket(&self.bucket)
                    .send()
            })
            .await;
        // ObjectLockConfigurationNotFoundError: none.
        absent_as_none(r).map(|out| {
            out.and_then(|o| o.object_lock_configuration().cloned())
                .and_then(|c| c.object_lock_enabled().cloned())
                == Some(aws_sdk_s3::types::ObjectLockEnabled::Enabled)
        })
    }

    /// Deletes `rel` (absent already counts as deleted). With `etag`, only that version of
    /// it (`If-Match`): a lease someone else took since is left alone.
    pub async fn delete(&self, rel: &str, etag: Option<&str>) -> Result<(), PutError> {
        let key = self.key(rel);
        let r = self
            .retrier
            .run("DeleteObject", &self.url(rel), None, || {
                let mut req = self.client.delete_object().bucket(&self.bucket).key(&key);
                if let Some(e) = etag {
                    req = req.if_match(e);
                }
                req.send()
            })
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) if matches!(e.status(), Some(412) | Some(409)) && etag.is_some() => {
                Err(PutError::Lost)
            }
            Err(e) => Err(PutError::Failed(e)),
        }
    }

    /// Deletes up to 1000 keys in one request (absent ones count as deleted); fails naming
    /// the first key S3 could not delete.
    pub async fn delete_many(&self, rels: &[String]) -> Result<(), CallError> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let what = format!("{} keys under {}", rels.len(), self.url(""));
        let objects: Vec<ObjectIdentifier> = rels
            .iter()
            .filter_map(|r| ObjectIdentifier::builder().key(self.key(r)).build().ok())
            .collect();
        let Ok(delete) = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
        else {
            return Ok(());
        };
        let out = self
            .retrier
            .run("DeleteObjects", &what, None, || {
                self.client
                    .delete_objects()
                    .bucket(&self.bucket)
                    .delete(delete.clone())
                    .send()
            })
            .await?;
        match out.errors().first() {
            None => Ok(()),
            Some(e) => Err(CallError::Permanent {
                op: "DeleteObjects",
                what: format!("s3://{}/{}", self.bucket, e.key().unwrap_or("?")),
                status: None,
                code: e.code().map(str::to_string),
                message: format!(
                    "{} of {} keys not deleted, e.g. this one: {}",
                    out.errors().len(),
                    rels.len(),
                    e.message().unwrap_or("no reason given")
                ),
            }),
        }
    }

    /// Copies `from` to `to` within the bucket.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), CallError> {
        let source = format!("{}/{}", self.bucket, self.key(from));
        let key = self.key(to);
        self.retrier
            .run("CopyObject", &self.url(from), None, || {
                self.client
                    .copy_object()
                    .bucket(&self.bucket)
                    .copy_source(&source)
                    .key(&key)
                    .send()
            })
            .await
            .map(|_| ())
    }

    /// Lists at most one key under `rel_prefix`: proves the bucket answers and lets us in.
    pub async fn probe(&self, rel_prefix: &str) -> Result<(), CallError> {
        let prefix = self.key(rel_prefix);
        self.retrier
            .run("ListObjectsV2", &self.url(rel_prefix), None, || {
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&prefix)
                    .max_keys(1)
                    .send()
            })
            .await
            .map(|_| ())
    }

    /// Every object whose key starts with `rel_prefix`, in key order.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<Listed>, CallError> {
        let prefix = self.key(rel_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .retrier
                .run("ListObjectsV2", &self.url(rel_prefix), None, || {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&prefix)
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let modified = o
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    // Unknown: as if stored now, so GC's grace period still covers it.
                    .unwrap_or_else(SystemTime::now);
                out.push(Listed {
                    key: k.strip_prefix(&self.prefix).unwrap_or(k).to_string(),
                    modified,
                    size: o.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }
}
