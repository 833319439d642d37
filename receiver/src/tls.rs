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

/// Creates the CA and a server certificate for `names` (DNS names or IP addresses) under
/// `<state_dir>/tls/`. Returns the CA fingerprint.
pub fn create(state_dir: &Path, names: &[String]) -> anyhow::Result<String> {
    let dir = state_dir.join("tls");
    lifeboat_common::durable::create_dir_all_durable(&dir)?;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Lifeboat receiver CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

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

/// The rustls server configuration: TLS 1.3 only, chain `[server, CA]`.
pub fn server_config(state_dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut chain = read_certs(&state_dir.join(SERVER_CERT))?;
    chain.extend(read_certs(&state_dir.join(CA_CERT))?);
    let key_path = state_dir.join(SERVER_KEY);
    let pem =
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing {}", key_path.display()))?
        .with_context(|| format!("{} holds no private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}
