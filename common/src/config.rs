//! Configuration files: `agent.toml` and the receiver's `receiver.toml`.
//!
//! One serde struct per file, unknown fields refused, then [`AgentConfig::validate`] /
//! [`ReceiverConfig::validate`] check what serde cannot, each error naming the field.
//! Reference: docs/configuration.md.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        field: field.into(),
        message: message.into(),
    }
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Which block-reader engine the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReaderEngine {
    /// io_uring where the kernel offers it, else pread.
    #[default]
    Auto,
    IoUring,
    Pread,
}

/// How the agent finds the blocks that changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrackerKind {
    /// eBPF where it loads and the disk is a block device it can see; else the hash scan,
    /// with the reason logged and shown in `status`.
    #[default]
    Auto,
    /// eBPF or nothing: the agent refuses to start a disk it cannot track.
    Ebpf,
    /// Hash scan of every block on every cycle (points are best-effort).
    Scan,
}

impl TrackerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrackerKind::Auto => "auto",
            TrackerKind::Ebpf => "ebpf",
            TrackerKind::Scan => "scan",
        }
    }
}

/// `/etc/lifeboat/agent.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Names this server at the receiver; default: the host name.
    #[serde(default)]
    pub server_id: Option<String>,
    /// Where the agent keeps its acknowledged manifests and pending point.
    #[serde(default = "default_agent_state_dir")]
    pub state_dir: PathBuf,
    /// Seconds between consistency points (a point is cut no more often than this).
    #[serde(default = "default_point_interval")]
    pub point_interval_secs: u64,
    /// Upper bound on the bytes the agent sends, in Mbit/s; 0 = no limit.
    #[serde(default)]
    pub bandwidth_limit_mbps: u64,
    /// zstd level for blocks on the wire (1–19): the level used when CPU is the bottleneck.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// Highest zstd level the agent climbs to when the network is the bottleneck and CPU is
    /// spare (set it equal to `compression_level` for a fixed level).
    #[serde(default = "default_compression_level_max")]
    pub compression_level_max: i32,
    /// Hash and compression threads; 0 = one per CPU.
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub reader: ReaderEngine,
    /// Block reads in flight at once (io_uring queue depth; the batch size of pread).
    #[serde(default = "default_reader_queue_depth")]
    pub reader_queue_depth: usize,
    /// How changed blocks are found: "auto" (eBPF, else hash scan), "ebpf" or "scan".
    #[serde(default)]
    pub tracker: TrackerKind,
    /// Freeze the mounted filesystems of the disks (FIFREEZE) while each point's final delta
    /// is read, so that points are crash-consistent. `false`: points are best-effort.
    #[serde(default = "default_true")]
    pub freeze: bool,
    /// Longest a freeze may last, in milliseconds; past it the filesystems are thawed and the
    /// point is best-effort. A watchdog process enforces it even if the agent dies.
    #[serde(default = "default_freeze_timeout_ms")]
    pub freeze_timeout_ms: u64,
    /// Pre-copy until the dirty set is at most this many MiB, then freeze and read the rest
    /// into memory (this bounds the memory a point's final delta takes).
    #[serde(default = "default_freeze_max_delta_mib")]
    pub freeze_max_delta_mib: u64,
    /// Size of the eBPF ring buffer in KiB (a power of two); events that do not fit are
    /// counted as lost and the disk is rescanned.
    #[serde(default = "default_ebpf_ring_buffer_kib")]
    pub ebpf_ring_buffer_kib: u64,
    /// Keep a 16-bit checksum of every 4 KiB page of each block read whole (264 bytes per
    /// block in `state_dir`, 0.05 % of the disk), so that a block a scan finds changed goes as
    /// the pages that changed rather than whole. `false`: no file, whole blocks.
    #[serde(default = "default_true")]
    pub page_sums: bool,
    /// Where `/metrics` (Prometheus) and `/healthz` are served; "" serves neither.
    #[serde(default = "default_agent_metrics_listen")]
    pub metrics_listen: String,
    /// `/healthz` answers 503 when the receiver acknowledged nothing for this long.
    #[serde(default = "default_health_stall_secs")]
    pub health_stall_secs: u64,
    /// Log filter (RUST_LOG syntax); `--log`/`LIFEBOAT_LOG` win over it. Default "info".
    #[serde(default)]
    pub log: Option<String>,
    pub receiver: ReceiverEndpoint,
    pub disks: Vec<DiskConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverEndpoint {
    /// host:port of the receiver.
    pub address: String,
    /// More receivers of the same fleet (host:port each), tried in turn after `address` when
    /// it does not answer. A receiver that does not hold this server sends the agent to the
    /// one that does, listed here or not.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// TLS server name checked against the receiver's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// SHA-256 of the receiver's CA certificate, as printed by `lifeboat-receiver init`.
    pub ca_fingerprint: String,
    /// The enrolment token printed by `lifeboat-receiver init` (or a server's own, from
    /// `token-add --server`). Not used once the agent enrolled a certificate
    /// (`lifeboat-agent enroll`); may then be left out.
    #[serde(default)]
    pub token: String,
    /// Seconds without an answer, with work outstanding, before the receiver is considered
    /// hung and the agent reconnects.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_timeout_secs() -> u64 {
    120
}

impl ReceiverEndpoint {
    /// Every receiver to try, `address` first, each once.
    pub fn all_addresses(&self) -> Vec<String> {
        let mut out = vec![self.address.clone()];
        for a in &self.addresses {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Names the disk at the receiver (letters, digits, '-', '_', '.').
    pub id: String,
    /// A block device or a regular file.
    pub path: PathBuf,
}

fn default_agent_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lifeboat")
}
fn default_point_interval() -> u64 {
    10
}
fn default_reader_queue_depth() -> usize {
    8
}
fn default_true() -> bool {
    true
}
fn default_freeze_timeout_ms() -> u64 {
    2000
}
fn default_freeze_max_delta_mib() -> u64 {
    256
}
fn default_agent_metrics_listen() -> String {
    "127.0.0.1:9811".into()
}
fn default_receiver_metrics_listen() -> String {
    "127.0.0.1:9810".into()
}
fn default_health_stall_secs() -> u64 {
    600
}

/// `log`: a filter in RUST_LOG syntax.
fn check_log(path: &Path, log: Option<&str>) -> Result<(), ConfigError> {
    match log.map(tracing_subscriber::EnvFilter::try_new) {
        Some(Err(e)) => Err(invalid(
            path,
            "log",
            format!(
                "{:?} is not a log filter ({e}): e.g. \"info\" or \"lifeboat_agent=debug\"",
                log.unwrap_or_default()
            ),
        )),
        _ => Ok(()),
    }
}

/// `metrics_listen`: empty (no endpoint) or an `ip:port` to bind.
fn check_metrics_listen(path: &Path, addr: &str) -> Result<(), ConfigError> {
    if addr.is_empty() || addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    Err(invalid(
        path,
        "metrics_listen",
        format!(
            "{addr:?} must be ip:port (\"127.0.0.1:9811\"; \"0.0.0.0:9811\" for every \
             address), or \"\" to serve no metrics"
        ),
    ))
}

fn default_ebpf_ring_buffer_kib() -> u64 {
    4096
}
fn default_compression_level() -> i32 {
    1
}
fn default_compression_level_max() -> i32 {
    9
}
pub fn default_server_name() -> String {
    "lifeboat-receiver".to_string()
}

/// True for names safe as one path component: `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// True for what TLS can check a certificate against: an IP address, or a DNS name of
/// dot-separated labels of letters, digits and inner hyphens.
pub fn valid_server_name(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Parses `sha256:<64 hex>` (or bare hex) into 32 bytes.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hexpart = s.strip_prefix("sha256:").unwrap_or(s);
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut out).ok()?;
    Some(out)
}

impl AgentConfig {
    /// Reads, parses and validates an agent config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let c: AgentConfig = load(path)?;
        c.validate(path)?;
        Ok(c)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if let Some(id) = &self.server_id {
            if !valid_name(id) {
                return Err(invalid(
                    path,
                    "server_id",
                    format!("{id:?} must be 1-64 of [A-Za-z0-9._-]"),
                ));
            }
        }
        if self.point_interval_secs == 0 || self.point_interval_secs > 86_400 {
            return Err(invalid(
                path,
                "point_interval_secs",
                "must be between 1 and 86400",
            ));
        }
        if !(1..=19).contains(&self.compression_level) {
            return Err(invalid(
                path,
                "compression_level",
                "must be between 1 and 19",
            ));
        }
        if !(self.compression_level..=19).contains(&self.compression_level_max) {
            return Err(invalid(
                path,
                "compression_level_max",
                format!(
                    "must be between compression_level ({}) and 19",
                    self.compression_level
                ),
            ));
        }
        if self.bandwidth_limit_mbps > 1_000_000 {
            return Err(invalid(
                path,
                "bandwidth_limit_mbps",
                "must be at most 1000000 (1 Tbit/s); 0 means no limit",
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid(path, "state_dir", "must be an absolute path"));
        }
        if self.workers > 256 {
            return Err(invalid(path, "workers", "must be at most 256"));
        }
        if !(1..=128).contains(&self.reader_queue_depth) {
            return Err(invalid(
                path,
                "reader_queue_depth",
                "must be between 1 and 128 (each read in flight holds a 512 KiB buffer)",
            ));
        }
        if !(100..=10_000).contains(&self.freeze_timeout_ms) {
            return Err(invalid(
                path,
                "freeze_timeout_ms",
                "must be between 100 and 10000 (a frozen filesystem blocks every writer; the \
                 service's stop timeout of 30 s must leave room for the thaw)",
            ));
        }
        if !(1..=16_384).contains(&self.freeze_max_delta_mib) {
            return Err(invalid(
                path,
                "freeze_max_delta_mib",
                "must be between 1 and 16384",
            ));
        }
        let rb = self.ebpf_ring_buffer_kib;
        if !(4..=1 << 20).contains(&rb) || !rb.is_power_of_two() {
            return Err(invalid(
                path,
                "ebpf_ring_buffer_kib",
                "must be a power of two between 4 and 1048576",
            ));
        }
        check_metrics_listen(path, &self.metrics_listen)?;
        check_log(path, self.log.as_deref())?;
        if !(10..=86_400).contains(&self.health_stall_secs) {
            return Err(invalid(
                path,
                "health_stall_secs",
                "must be between 10 and 86400",
            ));
        }
        if self.receiver.address.is_empty() || !self.receiver.address.contains(':') {
            return Err(invalid(path, "receiver.address", "must be host:port"));
        }
        if let Some(a) = self
            .receiver
            .addresses
            .iter()
            .find(|a| a.is_empty() || !a.contains(':'))
        {
            return Err(invalid(
                path,
                "receiver.addresses",
                format!("{a:?} is not host:port"),
            ));
        }
        if !valid_server_name(&self.receiver.server_name) {
            return Err(invalid(
                path,
                "receiver.server_name",
                format!(
                    "{:?} is not a DNS name or IP address (default \"lifeboat-receiver\")",
                    self.receiver.server_name
                ),
            ));
        }
        if parse_fingerprint(&self.receiver.ca_fingerprint).is_none() {
            return Err(invalid(
                path,
                "receiver.ca_fingerprint",
                "must be sha256:<64 hex digits> as printed by `lifeboat-receiver init`",
            ));
        }
        if !(2..=3600).contains(&self.receiver.timeout_secs) {
            return Err(invalid(
                path,
                "receiver.timeout_secs",
                "must be between 2 and 3600",
            ));
        }
        if self.disks.is_empty() {
            return Err(invalid(
                path,
                "disks",
                "at least one [[disks]] entry is needed",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_name(&d.id) {
                return Err(invalid(
                    path,
                    format!("disks[{i}].id"),
                    format!("{:?} must be 1-64 of [A-Za-z0-9._-]", d.id),
                ));
            }
            if !seen.insert(&d.id) {
                return Err(invalid(
                    path,
                    format!("disks[{i}].id"),
                    format!("{:?} is used twice", d.id),
                ));
            }
            if !d.path.is_absolute() {
                return Err(invalid(
                    path,
                    format!("disks[{i}].path"),
                    format!("{:?} must be an absolute path", d.path),
                ));
            }
        }
        Ok(())
    }

    /// The configured server id, else the host name.
    pub fn server_id(&self) -> String {
        if let Some(id) = &self.server_id {
            return id.clone();
        }
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name: String = name
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        if valid_name(&name) {
            name
        } else {
            "server".to_string()
        }
    }
}

/// `<state-dir>/receiver.toml`, written by `lifeboat-receiver init`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Address the TLS listener binds.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where `/metrics` (Prometheus) and `/healthz` are served; "" serves neither.
    #[serde(default = "default_receiver_metrics_listen")]
    pub metrics_listen: String,
    /// Log filter (RUST_LOG syntax) for `serve`; `--log`/`LIFEBOAT_LOG` win over it. Default
    /// "info".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Most agents connected at once (after authentication); more are refused with a clear,
    /// retryable error.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most connections still in their handshake (TLS, preface, Hello) at once. Drawn from
    /// their own budget, so unauthenticated peers can never take the slots agents need.
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// Of those, most from one source address (so one address cannot take them all).
    #[serde(default = "default_max_pending_handshakes_per_source")]
    pub max_pending_handshakes_per_source: usize,
    /// Seconds a peer has for the whole handshake (TLS, preface and Hello together).
    #[serde(default = "default_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
    /// Largest disk an agent may replicate, GiB (default 65536 = 64 TiB). The receiver keeps
    /// 64 MiB of manifest in memory per TiB of an open disk.
    #[serde(default = "default_max_disk_size_gib")]
    pub max_disk_size_gib: u64,
    /// Most disks one server may replicate (counting every disk the receiver holds for it).
    #[serde(default = "default_max_disks_per_server")]
    pub max_disks_per_server: usize,
    /// Memory for the manifests of all open disks together, MiB: an open disk takes 2 × 64
    /// MiB per TiB (its live manifest and its last point's). A disk that would pass it is
    /// refused with a retryable error naming this setting.
    #[serde(default = "default_max_manifest_memory_mib")]
    pub max_manifest_memory_mib: u64,
    /// Largest difference tolerated between an agent's clock and the receiver's before it is
    /// logged and flagged in `servers` (retention always uses the receiver's clock).
    #[serde(default = "default_max_clock_skew_secs")]
    pub max_clock_skew_secs: u64,
    /// A server id belongs to one machine: another machine claiming it is refused while the
    /// holder is connected or was heard from less than this many minutes ago.
    #[serde(default = "default_server_lease_minutes")]
    pub server_lease_minutes: u64,
    /// Days an enrolled agent's client certificate is valid (default 365). The agent renews
    /// it by itself once two thirds of that have passed.
    #[serde(default = "default_agent_certificate_days")]
    pub agent_certificate_days: u64,
    /// The EBS snapshot target; absent: points stay in the staging store only (the local
    /// target, the embedded default).
    #[serde(default)]
    pub ebs: Option<EbsConfig>,
    /// The staging store in an S3 bucket instead of `<state-dir>/store`; absent: the
    /// directory store.
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// Fleet mode: several receivers share the bucket of `[s3]`, each server owned by one of
    /// them at a time through a lease; absent: the bucket's prefix belongs to this receiver.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    /// How `recover` launches each server: `[recovery.default]` for all, `[recovery.<server>]`
    /// for one (its keys override the default's).
    #[serde(default)]
    pub recovery: std::collections::BTreeMap<String, LaunchConfig>,
}

/// Launch settings of a recovery or drill instance (`[recovery.<server>]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// e.g. "m6i.large" (default "t3.medium").
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Option<Vec<String>>,
    pub key_name: Option<String>,
    /// A launch template for everything else (its settings apply where these are unset).
    pub launch_template_id: Option<String>,
    /// "x86_64" (default) or "arm64".
    pub architecture: Option<String>,
    /// "legacy-bios", "uefi" or "uefi-preferred" (default).
    pub boot_mode: Option<String>,
    /// The disk id that boots (root device); default the disk named "root", else the first.
    pub boot_disk: Option<String>,
    /// EBS volume type of the recovered disks (default "gp3").
    pub volume_type: Option<String>,
}

impl LaunchConfig {
    /// `self` over `base`: each key set here wins.
    pub fn over(&self, base: &LaunchConfig) -> LaunchConfig {
        LaunchConfig {
            instance_type: self.instance_type.clone().or(base.instance_type.clone()),
            subnet_id: self.subnet_id.clone().or(base.subnet_id.clone()),
            security_group_ids: self
                .security_group_ids
                .clone()
                .or(base.security_group_ids.clone()),
            key_name: self.key_name.clone().or(base.key_name.clone()),
            launch_template_id: self
                .launch_template_id
                .clone()
                .or(base.launch_template_id.clone()),
            architecture: self.architecture.clone().or(base.architecture.clone()),
            boot_mode: self.boot_mode.clone().or(base.boot_mode.clone()),
            boot_disk: self.boot_disk.clone().or(base.boot_disk.clone()),
            volume_type: self.volume_type.clone().or(base.volume_type.clone()),
        }
    }

    fn validate(&self, path: &Path, key: &str) -> Result<(), ConfigError> {
        let field = |f: &str| format!("recovery.{key}.{f}");
        if let Some(a) = &self.architecture {
            if !["x86_64", "arm64"].contains(&a.as_str()) {
                return Err(invalid(
                    path,
                    field("architecture"),
                    format!("{a:?} is not x86_64 or arm64"),
                ));
            }
        }
        if let Some(b) = &self.boot_mode {
            if !["legacy-bios", "uefi", "uefi-preferred"].contains(&b.as_str()) {
                return Err(invalid(
                    path,
                    field("boot_mode"),
                    format!("{b:?} is not legacy-bios, uefi or uefi-preferred"),
                ));
            }
        }
        if let Some(v) = &self.volume_type {
            if !["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"].contains(&v.as_str()) {
                return Err(invalid(
                    path,
                    field("volume_type"),
                    format!("{v:?} is not an EBS volume type"),
                ));
            }
        }
        if let Some(t) = &self.instance_type {
            if t.is_empty() || !t.contains('.') {
                return Err(invalid(
                    path,
                    field("instance_type"),
                    format!("{t:?} is not an instance type such as \"m6i.large\""),
                ));
            }
        }
        Ok(())
    }
}

/// `[ebs]` in receiver.toml: points materialized as incremental EBS snapshots through the
/// EBS direct APIs. Credentials come from the standard AWS chain (environment, profile,
/// instance role, web identity), never from this file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EbsConfig {
    /// The recovery region, e.g. "eu-west-1".
    pub region: String,
    /// Another endpoint for the EBS direct APIs (a VPC endpoint, or a test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Another endpoint for EC2 (DescribeSnapshots, DeleteSnapshot, images, instances).
    #[serde(default)]
    pub ec2_endpoint_url: Option<String>,
    /// Encrypt snapshots (with `kms_key_arn`, else the account's default EBS key).
    #[serde(default = "default_true")]
    pub encrypted: bool,
    #[serde(default)]
    pub kms_key_arn: Option<String>,
    /// A committed point goes to EBS when the newest one there is at least this old.
    #[serde(default = "default_ebs_every_minutes")]
    pub every_minutes: u64,
    /// Snapshots kept: one per 10 minutes for an hour, hourly for a day, daily for this
    /// many days (DRS's default policy); the newest is always kept.
    #[serde(default = "default_daily_days")]
    pub daily_days: u64,
    /// PutSnapshotBlock requests in flight per snapshot (the API takes about 1000 a second).
    #[serde(default = "default_ebs_puts_in_flight")]
    pub puts_in_flight: usize,
    /// Seconds to open a connection.
    #[serde(default = "default_ebs_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// Seconds one attempt of one request may take, reading its answer included.
    #[serde(default = "default_ebs_attempt_timeout_secs")]
    pub attempt_timeout_secs: u64,
    /// Attempts per request for what may pass (throttling, 5xx, timeouts, "does not exist"
    /// right after StartSnapshot), with jittered exponential backoff between them.
    #[serde(default = "default_ebs_max_attempts")]
    pub max_attempts: u32,
    /// Minutes EBS gives a started snapshot to complete (StartSnapshot's Timeout), and the
    /// receiver waits for DescribeSnapshots to say `completed`.
    #[serde(default = "default_ebs_snapshot_timeout_minutes")]
    pub snapshot_timeout_minutes: u64,
}

fn default_ebs_every_minutes() -> u64 {
    10
}
fn default_ebs_puts_in_flight() -> usize {
    64
}
fn default_ebs_connect_timeout_secs() -> u64 {
    5
}
fn default_ebs_attempt_timeout_secs() -> u64 {
    60
}
fn default_ebs_max_attempts() -> u32 {
    8
}
fn default_ebs_snapshot_timeout_minutes() -> u64 {
    60
}

impl EbsConfig {
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if !region_ok(&self.region) {
            return Err(invalid(
                path,
                "ebs.region",
                format!(
                    "{:?} is not a region name such as \"eu-west-1\"",
                    self.region
                ),
            ));
        }
        for (key, url) in [
            ("ebs.endpoint_url", &self.endpoint_url),
            ("ebs.ec2_endpoint_url", &self.ec2_endpoint_url),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(invalid(path, key, format!("{u:?} is not an http(s) URL")));
                }
            }
        }
        if let Some(k) = &self.kms_key_arn {
            if !self.encrypted {
                return Err(invalid(
                    path,
                    "ebs.kms_key_arn",
                    "needs encrypted = true (a KMS key encrypts)",
                ));
            }
            if !k.starts_with("arn:") {
                return Err(invalid(
                    path,
                    "ebs.kms_key_arn",
                    format!("{k:?} is not a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>)"),
                ));
            }
        }
        if !(1..=7 * 24 * 60).contains(&self.every_minutes) {
            return Err(invalid(
                path,
                "ebs.every_minutes",
                "must be between 1 and 10080 (7 days)",
            ));
        }
        if !(1..=365).contains(&self.daily_days) {
            return Err(invalid(path, "ebs.daily_days", "must be between 1 and 365"));
        }
        if !(1..=1000).contains(&self.puts_in_flight) {
            return Err(invalid(
                path,
                "ebs.puts_in_flight",
                "must be between 1 and 1000 (the API's rate per snapshot)",
            ));
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return Err(invalid(
                path,
                "ebs.connect_timeout_secs",
                "must be between 1 and 300",
            ));
        }
        if !(1..=3600).contains(&self.attempt_timeout_secs) {
            return Err(invalid(
                path,
                "ebs.attempt_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(invalid(
                path,
                "ebs.max_attempts",
                "must be between 1 and 100",
            ));
        }
        // StartSnapshot's Timeout is 10..=4320 minutes.
        if !(10..=4320).contains(&self.snapshot_timeout_minutes) {
            return Err(invalid(
                path,
                "ebs.snapshot_timeout_minutes",
                "must be between 10 and 4320 (what StartSnapshot accepts)",
            ));
        }
        Ok(())
    }
}

/// `[s3]` in receiver.toml: the staging store's blocks in an S3 bucket (or an S3-compatible
/// server) under `prefix`. Credentials come from the standard AWS chain, never from this file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket; it must exist (the receiver never creates or configures buckets).
    pub bucket: String,
    /// Every object's key starts with this (e.g. "lifeboat/"); default none.
    #[serde(default)]
    pub prefix: String,
    /// The bucket's region, e.g. "eu-west-1".
    pub region: String,
    /// Another endpoint (a VPC endpoint, an S3-compatible server, a test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[serde(default)]
    pub path_style: bool,
    /// Seconds to open a connection.
    #[serde(default = "default_ebs_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// Seconds one attempt of one request may take, reading its answer included.
    #[serde(default = "default_s3_attempt_timeout_secs")]
    pub attempt_timeout_secs: u64,
    /// Attempts per request for what may pass (5xx, timeouts, broken connections), with
    /// jittered exponential backoff; throttling (`SlowDown`, 503) slows every request down
    /// and is tried again without counting against this.
    #[serde(default = "default_ebs_max_attempts")]
    pub max_attempts: u32,
    /// Requests in flight at once for one batch of blocks.
    #[serde(default = "default_s3_requests_in_flight")]
    pub requests_in_flight: usize,
    /// Under S3 Object Lock, the days each day's point (the newest of a UTC day) stays locked
    /// from its commit; finer points are locked as long as retention keeps them, and every
    /// block a locked point names as long as the point. A locked version can be deleted by no
    /// one (ransomware holding the receiver's credentials included) before its lock ends.
    /// Needs a bucket with Object Lock, and `[fleet]` (a fleet of one receiver is fine): only
    /// a fleet keeps its points in the bucket. None (the default): nothing is locked.
    #[serde(default)]
    pub object_lock_days: Option<u32>,
    /// `governance` (the default: a user granted `s3:BypassGovernanceRetention` may still
    /// remove a lock) or `compliance` (no one can, the root account included, until it ends).
    #[serde(default)]
    pub object_lock_mode: LockMode,
}

/// S3 Object Lock's retention modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    #[default]
    Governance,
    Compliance,
}

impl LockMode {
    /// As S3 spells it.
    pub fn as_s3(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// `[fleet]` in receiver.toml: this receiver is one of several sharing the bucket of `[s3]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// host:port where agents reach this receiver; other receivers send agents here when this
    /// one holds their server's lease.
    pub address: String,
    /// Seconds a server's lease lasts without renewal (renewed every third of it). A dead
    /// receiver's servers move to another one after about this long. Default 30.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
}

fn default_lease_seconds() -> u64 {
    30
}

impl FleetConfig {
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let port_ok = self
            .address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(invalid(
                path,
                "fleet.address",
                format!(
                    "{:?} is not host:port (where agents reach this receiver)",
                    self.address
                ),
            ));
        }
        if !(3..=3600).contains(&self.lease_seconds) {
            return Err(invalid(
                path,
                "fleet.lease_seconds",
                "must be between 3 and 3600",
            ));
        }
        Ok(())
    }
}

fn default_s3_attempt_timeout_secs() -> u64 {
    30
}
fn default_s3_requests_in_flight() -> usize {
    32
}

impl S3Config {
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        // Bucket names: 3-63 of a-z, 0-9, '.', '-', starting and ending with a letter or digit.
        let b = &self.bucket;
        let edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !(3..=63).contains(&b.len())
            || !b
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
            || !edge(b.chars().next())
            || !edge(b.chars().last())
        {
            return Err(invalid(
                path,
                "s3.bucket",
                format!("{b:?} is not a bucket name (3-63 of a-z, 0-9, '.', '-')"),
            ));
        }
        let key_char = |c: char| c.is_ascii_alphanumeric() || "/._-".contains(c);
        if self.prefix.len() > 512
            || self.prefix.starts_with('/')
            || !self.prefix.chars().all(key_char)
        {
            return Err(invalid(
                path,
                "s3.prefix",
                format!(
                    "{:?}: at most 512 of A-Z, a-z, 0-9, '/', '.', '_', '-', not starting with '/'",
                    self.prefix
                ),
            ));
        }
        if !region_ok(&self.region) {
            return Err(invalid(
                path,
                "s3.region",
                format!(
                    "{:?} is not a region name such as \"eu-west-1\"",
                    self.region
                ),
            ));
        }
        if let Some(u) = &self.endpoint_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(invalid(
                    path,
                    "s3.endpoint_url",
                    format!("{u:?} is not an http(s) URL"),
                ));
            }
        }
        for (key, v, range) in [
            (
                "s3.connect_timeout_secs",
                self.connect_timeout_secs,
                1..=300,
            ),
            (
                "s3.attempt_timeout_secs",
                self.attempt_timeout_secs,
                1..=3600,
            ),
            ("s3.max_attempts", self.max_attempts as u64, 1..=100),
            (
                "s3.object_lock_days",
                self.object_lock_days.map_or(1, u64::from),
                1..=36500,
            ),
            (
                "s3.requests_in_flight",
                self.requests_in_flight as u64,
                1..=1024,
            ),
        ] {
            if !range.contains(&v) {
                return Err(invalid(
                    path,
                    key,
                    format!("must be between {} and {}", range.start(), range.end()),
                ));
            }
        }
        Ok(())
    }
}

fn region_ok(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 32
        && r.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Which points are kept: everything of the last `recent_minutes`, then DRS's policy: one
/// point per 10 minutes for an hour, hourly for a day, daily for `daily_days` days.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default = "default_recent_minutes")]
    pub recent_minutes: u64,
    #[serde(default = "default_daily_days")]
    pub daily_days: u64,
    /// Blocks younger than this are never garbage-collected (covers dedupe answers in flight).
    #[serde(default = "default_gc_grace_minutes")]
    pub gc_grace_minutes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            recent_minutes: default_recent_minutes(),
            daily_days: default_daily_days(),
            gc_grace_minutes: default_gc_grace_minutes(),
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:7443".to_string()
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_pending_handshakes() -> usize {
    64
}
fn default_max_pending_handshakes_per_source() -> usize {
    8
}
fn default_handshake_timeout_secs() -> u64 {
    10
}
fn default_max_disk_size_gib() -> u64 {
    64 * 1024
}
fn default_max_disks_per_server() -> usize {
    64
}
fn default_max_manifest_memory_mib() -> u64 {
    8192
}
fn default_max_clock_skew_secs() -> u64 {
    300
}
fn default_server_lease_minutes() -> u64 {
    30
}
fn default_agent_certificate_days() -> u64 {
    365
}
fn default_recent_minutes() -> u64 {
    10
}
fn default_daily_days() -> u64 {
    7
}
fn default_gc_grace_minutes() -> u64 {
    10
}

impl ReceiverConfig {
    /// [`ReceiverConfig::max_disk_size_gib`] in bytes.
    pub fn max_disk_bytes(&self) -> u64 {
        self.max_disk_size_gib.saturating_mul(1 << 30)
    }

    pub fn load(path: &Path) -> Result<ReceiverConfig, ConfigError> {
        let c: ReceiverConfig = load(path)?;
        c.validate(path)?;
        Ok(c)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        check_metrics_listen(path, &self.metrics_listen)?;
        check_log(path, self.log.as_deref())?;
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                path,
                "listen",
                format!("{:?} is not ip:port", self.listen),
            ));
        }
        if !(1..=365).contains(&self.retention.daily_days) {
            return Err(invalid(
                path,
                "retention.daily_days",
                "must be between 1 and 365",
            ));
        }
        if self.retention.recent_minutes > 7 * 24 * 60 {
            return Err(invalid(
                path,
                "retention.recent_minutes",
                "must be at most 10080 (7 days)",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid(path, "max_connections", "must be at least 1"));
        }
        if self.max_pending_handshakes == 0 {
            return Err(invalid(
                path,
                "max_pending_handshakes",
                "must be at least 1",
            ));
        }
        if self.max_pending_handshakes_per_source == 0 {
            return Err(invalid(
                path,
                "max_pending_handshakes_per_source",
                "must be at least 1",
            ));
        }
        if !(1..=300).contains(&self.handshake_timeout_secs) {
            return Err(invalid(
                path,
                "handshake_timeout_secs",
                "must be between 1 and 300",
            ));
        }
        if !(1..=256 * 1024).contains(&self.max_disk_size_gib) {
            return Err(invalid(
                path,
                "max_disk_size_gib",
                "must be between 1 and 262144 (256 TiB)",
            ));
        }
        if !(1..=crate::protocol::MAX_DISKS).contains(&self.max_disks_per_server) {
            return Err(invalid(
                path,
                "max_disks_per_server",
                format!("must be between 1 and {}", crate::protocol::MAX_DISKS),
            ));
        }
        if self.server_lease_minutes > 7 * 24 * 60 {
            return Err(invalid(
                path,
                "server_lease_minutes",
                "must be at most 10080 (7 days)",
            ));
        }
        if self.max_manifest_memory_mib < 64 {
            return Err(invalid(
                path,
                "max_manifest_memory_mib",
                "must be at least 64",
            ));
        }
        if self.max_clock_skew_secs == 0 {
            return Err(invalid(path, "max_clock_skew_secs", "must be at least 1"));
        }
        if !(1..=3650).contains(&self.agent_certificate_days) {
            return Err(invalid(
                path,
                "agent_certificate_days",
                "must be 1-3650 (agents renew their certificates after two thirds of it)",
            ));
        }
        if self.retention.gc_grace_minutes > 7 * 24 * 60 {
            return Err(invalid(
                path,
                "retention.gc_grace_minutes",
                "must be at most 10080 (7 days)",
            ));
        }
        if let Some(e) = &self.ebs {
            e.validate(path)?;
        }
        if let Some(s) = &self.s3 {
            s.validate(path)?;
        }
        if let Some(f) = &self.fleet {
            if self.s3.is_none() {
                return Err(invalid(
                    path,
                    "fleet",
                    "needs [s3]: the receivers of a fleet share its bucket",
                ));
            }
            f.validate(path)?;
        }
        if self
            .s3
            .as_ref()
            .is_some_and(|s| s.object_lock_days.is_some())
            && self.fleet.is_none()
        {
            return Err(invalid(
                path,
                "s3.object_lock_days",
                "needs [fleet] (one receiver makes a fleet of one): Object Lock protects what \
                 is in the bucket, and only a fleet keeps its points there, beside the blocks",
            ));
        }
        for (key, l) in &self.recovery {
            if key != "default" && !valid_name(key) {
                return Err(invalid(
                    path,
                    format!("recovery.{key}"),
                    "must be \"default\" or a server id (1-64 of [A-Za-z0-9._-])",
                ));
            }
            l.validate(path, key)?;
        }
        Ok(())
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            listen: default_listen(),
            metrics_listen: default_receiver_metrics_listen(),
            log: None,
            retention: RetentionConfig::default(),
            max_connections: default_max_connections(),
            max_pending_handshakes: default_max_pending_handshakes(),
            max_pending_handshakes_per_source: default_max_pending_handshakes_per_source(),
            handshake_timeout_secs: default_handshake_timeout_secs(),
            max_disk_size_gib: default_max_disk_size_gib(),
            max_disks_per_server: default_max_disks_per_server(),
            max_manifest_memory_mib: default_max_manifest_memory_mib(),
            max_clock_skew_secs: default_max_clock_skew_secs(),
            server_lease_minutes: default_server_lease_minutes(),
            agent_certificate_days: default_agent_certificate_days(),
            ebs: None,
            s3: None,
            fleet: None,
            recovery: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
server_id = "web-01"
[receiver]
address = "127.0.0.1:7443"
ca_fingerprint = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
token = "t"
[[disks]]
id = "root"
path = "/dev/sda"
"#;

    fn check(text: &str) -> Result<AgentConfig, ConfigError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        AgentConfig::load(&p)
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = check(GOOD).unwrap();
        assert_eq!(c.point_interval_secs, 10);
        assert_eq!(c.reader, ReaderEngine::Auto);
        assert_eq!(c.server_id(), "web-01");
    }

    #[test]
    fn errors_name_the_field() {
        let e = check(&format!("{GOOD}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = check(&GOOD.replace("sha256:0000", "sha256:zz00"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("receiver.ca_fingerprint"), "{e}");
        let e = check(&format!("{GOOD}[[disks]]\nid = \"root\"\npath = \"/x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("disks[1].id") && e.contains("twice"), "{e}");
        let e = check(&GOOD.replace("web-01", "../etc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server_id"), "{e}");
        for (extra, field) in [
            ("compression_level_max = 30\n", "compression_level_max"),
            (
                "compression_level = 5\ncompression_level_max = 3\n",
                "compression_level_max",
            ),
            ("state_dir = \"var/lib\"\n", "state_dir"),
            (
                "bandwidth_limit_mbps = 9999999999\n",
                "bandwidth_limit_mbps",
            ),
        ] {
            let e = check(&format!("{extra}{GOOD}")).unwrap_err().to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let e = check(&GOOD.replace("token = \"t\"", "token = \"t\"\nserver_name = \"a b\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("receiver.server_name"), "{e}");
        let e = check(&GOOD.replace("/dev/sda", "dev/sda"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("disks[0].path"), "{e}");
    }

    #[test]
    fn receiver_config_validation() {
        let mut c = ReceiverConfig::default();
        assert!(c.validate(Path::new("r.toml")).is_ok());
        c.retention.daily_days = 400;
        let e = c.validate(Path::new("r.toml")).unwrap_err().to_string();
        assert!(e.contains("retention.daily_days"), "{e}");
    }

    #[test]
    fn ebs_section_parses_with_defaults_and_names_each_bad_field() {
        let parse = |text: &str| -> Result<ReceiverConfig, String> {
            let c: ReceiverConfig = toml::from_str(text).map_err(|e| e.to_string())?;
            c.validate(Path::new("r.toml")).map_err(|e| e.to_string())?;
            Ok(c)
        };
        let c = parse("[ebs]\nregion = \"eu-west-1\"\n").unwrap();
        let e = c.ebs.unwrap();
        assert!(e.encrypted, "encrypted by default");
        assert_eq!(
            (e.every_minutes, e.daily_days, e.puts_in_flight),
            (10, 7, 64)
        );
        assert!(
            parse("").unwrap().ebs.is_none(),
            "no [ebs]: the local target only"
        );
        for (extra, field) in [
            ("region = \"EU West\"", "ebs.region"),
            (
                "region = \"eu-west-1\"\nendpoint_url = \"ftp://x\"",
                "ebs.endpoint_url",
            ),
            (
                "region = \"eu-west-1\"\nencrypted = false\nkms_key_arn = \"arn:aws:kms:x\"",
                "ebs.kms_key_arn",
            ),
            (
                "region = \"eu-west-1\"\nkms_key_arn = \"alias/x\"",
                "ebs.kms_key_arn",
            ),
            (
                "region = \"eu-west-1\"\nputs_in_flight = 0",
                "ebs.puts_in_flight",
            ),
            (
                "region = \"eu-west-1\"\nsnapshot_timeout_minutes = 5",
                "ebs.snapshot_timeout_minutes",
            ),
            (
                "region = \"eu-west-1\"\nmax_attempts = 0",
                "ebs.max_attempts",
            ),
        ] {
            let e = parse(&format!("[ebs]\n{extra}\n")).unwrap_err();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let e = parse("[ebs]\nregion = \"eu-west-1\"\nbucket = \"x\"\n").unwrap_err();
        assert!(e.contains("bucket"), "unknown keys are refused: {e}");
    }

    #[test]
    fn s3_section_parses_with_defaults_and_names_each_bad_field() {
        let parse = |text: &str| -> Result<ReceiverConfig, String> {
            let c: ReceiverConfig = toml::from_str(text).map_err(|e| e.to_string())?;
            c.validate(Path::new("r.toml")).map_err(|e| e.to_string())?;
            Ok(c)
        };
        let c = parse("[s3]\nbucket = \"dr-staging\"\nregion = \"eu-west-1\"\n").unwrap();
        let s = c.s3.unwrap();
        assert_eq!((s.prefix.as_str(), s.path_style), ("", false));
        assert_eq!((s.max_attempts, s.requests_in_flight), (8, 32));
        for (text, field) in [
            (
                "bucket = \"Dr_Staging\"\nregion = \"eu-west-1\"",
                "s3.bucket",
            ),
            ("bucket = \"ab\"\nregion = \"eu-west-1\"", "s3.bucket"),
            ("bucket = \"-dr\"\nregion = \"eu-west-1\"", "s3.bucket"),
            ("bucket = \"dr-1\"\nregion = \"Europe\"", "s3.region"),
            (
                "bucket = \"dr-staging\"\nregion = \"eu-west-1\"\nprefix = \"/x\"",
                "s3.prefix",
            ),
            (
                "bucket = \"dr-staging\"\nregion = \"eu-west-1\"\nprefix = \"a b+\"",
                "s3.prefix",
            ),
            (
                "bucket = \"dr-staging\"\nregion = \"eu-west-1\"\nendpoint_url = \"s3.local\"",
                "s3.endpoint_url",
            ),
            (
                "bucket = \"dr-staging\"\nregion = \"eu-west-1\"\nrequests_in_flight = 0",
                "s3.requests_in_flight",
            ),
        ] {
            let e = parse(&format!("[s3]\n{text}\n")).unwrap_err();
            assert!(e.contains(field), "{text}: {e}");
        }
        let s3 = "[s3]\nbucket = \"dr-staging\"\nregion = \"eu-west-1\"\n";
        let c = parse(&format!("{s3}[fleet]\naddress = \"rx1:7443\"\n")).unwrap();
        assert_eq!(c.fleet.unwrap().lease_seconds, 30);
        let locked = format!("{s3}object_lock_days = 30\nobject_lock_mode = \"compliance\"\n");
        let c = parse(&format!("{locked}[fleet]\naddress = \"rx1:7443\"\n")).unwrap();
        let s = c.s3.unwrap();
        assert_eq!(
            (s.object_lock_days, s.object_lock_mode),
            (Some(30), LockMode::Compliance)
        );
        assert_eq!(
            parse(s3).unwrap().s3.unwrap().object_lock_mode,
            LockMode::Governance
        );
        for (text, field) in [
            ("[fleet]\naddress = \"rx1:7443\"\n", "[s3]"),
            (
                &*format!("{s3}[fleet]\naddress = \"rx1\"\n"),
                "fleet.address",
            ),
            (
                &*format!("{s3}[fleet]\naddress = \"rx1:1\"\nlease_seconds = 1\n"),
                "fleet.lease_seconds",
            ),
            (&*format!("{s3}object_lock_days = 7\n"), "needs [fleet]"),
            (
                &*format!("{s3}object_lock_days = 0\n[fleet]\naddress = \"rx1:1\"\n"),
                "s3.object_lock_days",
            ),
            (
                &*format!("{s3}object_lock_mode = \"legal\"\n"),
                "object_lock_mode",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn recovery_settings_merge_over_the_default_and_name_bad_values() {
        let c: ReceiverConfig = toml::from_str(
            "[recovery.default]\ninstance_type = \"m6i.large\"\nsubnet_id = \"subnet-1\"\n\
             [recovery.db-01]\ninstance_type = \"r6i.xlarge\"\nboot_disk = \"sys\"\n",
        )
        .unwrap();
        c.validate(Path::new("r.toml")).unwrap();
        let l = c.recovery["db-01"].over(&c.recovery["default"]);
        assert_eq!(l.instance_type.as_deref(), Some("r6i.xlarge"));
        assert_eq!(l.subnet_id.as_deref(), Some("subnet-1"), "inherited");
        assert_eq!(l.boot_disk.as_deref(), Some("sys"));
        for (text, field) in [
            (
                "[recovery.default]\narchitecture = \"sparc\"",
                "recovery.default.architecture",
            ),
            (
                "[recovery.web]\nboot_mode = \"bios\"",
                "recovery.web.boot_mode",
            ),
            (
                "[recovery.web]\nvolume_type = \"ssd\"",
                "recovery.web.volume_type",
            ),
            (
                "[recovery.web]\ninstance_type = \"big\"",
                "recovery.web.instance_type",
            ),
            ("[recovery.\"a b\"]\nkey_name = \"k\"", "recovery.a b"),
        ] {
            let c: ReceiverConfig = toml::from_str(text).unwrap();
            let e = c.validate(Path::new("r.toml")).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
