//! TLS material: a private CA made at `init`, a server certificate it signs, and the rustls
//! server configuration (TLS 1.3 only).
//!
//! Agents pin the CA by the SHA-256 of its DER ("sha256:<hex>"), so they need no file: the
//! server sends `[leaf, CA]` and the agent checks that the CA it was sent has the pinned
//! fingerprint, then verifies the leaf against it.

use anyhow::{bail, Context};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

pub const CA_CERT: &str = "tls/ca.pem";
pub const CA_KEY: &str = "tls/ca.key";
pub const SERVER_CERT: &str = "tls/server.pem";
pub const SERVER_KEY: &str = "tls/server.key";

/// "sha256:<hex>" of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// The CA's parameters. A certificate the CA signs takes its issuer name and key identifier
/// from these and the CA key, so [`issue_client_certificate`] rebuilds the issuer from them
/// (no X.509 parsing needed).
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Lifeboat receiver CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca)
}

/// An agent's public key as it arrives in `Enrol`: an uncompressed P-256 point.
struct AgentKey<'a>(&'a [u8]);

impl rcgen::PublicKeyData for AgentKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A client certificate the CA issued.
pub struct Issued {
    pub der: Vec<u8>,
    /// "sha256:<hex>" of `der`.
    pub sha256: String,
    pub issued_unix_ms: u64,
    pub not_after_unix_ms: u64,
}

/// Signs a client certificate for `server` over `public_key` (an uncompressed P-256 point,
/// 65 bytes), valid from an hour before `now_ms` (agents' clocks run slow too) for `valid`.
pub fn issue_client_certificate(
    state_dir: &Path,
    server: &str,
    public_key: &[u8],
    valid: std::time::Duration,
    now_ms: u64,
) -> anyhow::Result<Issued> {
    if public_key.len() != 65 || public_key[0] != 4 {
        bail!(
            "the agent's public key is {} bytes; expected an uncompressed P-256 point (65 bytes, \
             starting 0x04)",
            public_key.len()
        );
    }
    let key_path = state_dir.join(CA_KEY);
    let pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let ca_key =
        KeyPair::from_pem(&pem).with_context(|| format!("parsing {}", key_path.display()))?;
    let issuer = ca_params()?.self_signed(&ca_key)?;

    let at = |ms: u64| {
        time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
            .with_context(|| format!("time {ms} ms is out of range"))
    };
    let not_after_unix_ms = now_ms.saturating_add(valid.as_millis() as u64) / 1000 * 1000;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, server);
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, "Lifeboat agent");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = at(now_ms.saturating_sub(3_600_000))?;
    p.not_after = at(not_after_unix_ms)?;
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = p.signed_by(&AgentKey(public_key), &issuer, &ca_key)?;
    Ok(Issued {
        sha256: fingerprint(cert.der()),
        der: cert.der().to_vec(),
        issued_unix_ms: now_ms,
        not_after_unix_ms,
    })
}

/// Creates the CA and a server certificate for `names` (DNS names or IP addresses) under
/// `<state_dir>/tls/`. Returns the CA fingerprint.
pub fn create(state_dir: &Path, names: &[String]) -> anyhow::Result<String> {
    let dir = state_dir.join("tls");
    lifeboat_common::durable::create_dir_all_durable(&dir)?;

    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;

    let mut sp = CertificateParams::new(Vec::<String>::new())?;
    sp.distinguished_name
        .push(DnType::CommonName, "lifeboat-receiver");
    for n in names {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => sp.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => sp
                .subject_alt_names
                .push(SanType::DnsName(n.clone().try_into()?)),
        }
    }
    let key = KeyPair::generate()?;
    let cert = sp.signed_by(&key, &ca_cert, &ca_key)?;

    write_private(&state_dir.join(CA_KEY), ca_key.serialize_pem().as_bytes())?;
    write_private(&state_dir.join(SERVER_KEY), key.serialize_pem().as_bytes())?;
    write_private(&state_dir.join(CA_CERT), ca_cert.pem().as_bytes())?;
    write_private(&state_dir.join(SERVER_CERT), cert.pem().as_bytes())?;
    lifeboat_common::durable::sync_dir(&dir)?;
    Ok(fingerprint(ca_cert.der()))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The CA fingerprint of an initialised state dir.
pub fn ca_fingerprint(state_dir: &Path) -> anyhow::Result<String> {
    let certs = read_certs(&state_dir.join(CA_CERT))?;
    Ok(fingerprint(&certs[0]))
}

/// The rustls server configuration: TLS 1.3 only, chain `[server, CA]`. A client may present
/// a certificate; if it does, it must chain to our CA (who it names is decided at `Hello`, by
/// its fingerprint: see `identities.rs`). One that presents none goes on to the token check.
pub fn server_config(state_dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut chain = read_certs(&state_dir.join(SERVER_CERT))?;
    let ca = read_certs(&state_dir.join(CA_CERT))?;
    chain.extend(ca.iter().cloned());
    let key_path = state_dir.join(SERVER_KEY);
    let pem =
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing {}", key_path.display()))?
        .with_context(|| format!("{} holds no private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca[0].clone())?;
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}
