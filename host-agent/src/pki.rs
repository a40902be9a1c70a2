//! The node's TLS identity: a node CA made at `kiln-agent init` (in a
//! cluster the cluster CA will take its place) and the node's key and
//! certificate signed by it. Clients trust `ca.crt`. Keys are 0600.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";

/// Writes a new file that must not exist yet, with `mode`.
pub fn write_new(path: &Path, mode: u32, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Makes the node CA and a node certificate for `names` (DNS names or IP
/// addresses; `localhost`, 127.0.0.1 and ::1 are always included). Returns
/// the files written, so a failed `init` can remove them.
pub fn create(dir: &Path, node_name: &str, names: &[String]) -> Result<Vec<std::path::PathBuf>> {
    for f in [CA_CERT, CA_KEY, NODE_CERT, NODE_KEY] {
        if dir.join(f).exists() {
            bail!(
                "{} exists: refusing to replace the node's identity",
                dir.join(f).display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, format!("Kiln node CA {node_name}"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let node_key = KeyPair::generate()?;
    let mut node = CertificateParams::default();
    node.distinguished_name
        .push(DnType::CommonName, node_name.to_string());
    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    all.push(node_name.to_string());
    all.extend(names.iter().cloned());
    all.dedup();
    for n in all {
        let san = match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .with_context(|| format!("bad name {n:?}"))?,
            ),
        };
        if !node.subject_alt_names.contains(&san) {
            node.subject_alt_names.push(san);
        }
    }
    node.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let issuer = Issuer::from_params(&ca, &ca_key);
    let node_cert = node.signed_by(&node_key, &issuer)?;

    let files = [
        (CA_CERT, 0o644, ca_cert.pem()),
        (CA_KEY, 0o600, ca_key.serialize_pem()),
        (NODE_CERT, 0o644, node_cert.pem()),
        (NODE_KEY, 0o600, node_key.serialize_pem()),
    ];
    let mut written = Vec::new();
    for (name, mode, pem) in files {
        let path = dir.join(name);
        if let Err(e) = write_new(&path, mode, pem.as_bytes()) {
            for w in &written {
                let _ = std::fs::remove_file(w);
            }
            return Err(e);
        }
        written.push(path);
    }
    Ok(written)
}

fn load_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad certificate in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS configuration of the agent's TCP listener.
pub fn server_config(dir: &Path) -> Result<rustls::ServerConfig> {
    let certs = load_certs(&dir.join(NODE_CERT))?;
    let key_path = dir.join(NODE_KEY);
    let pem =
        std::fs::read(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())?
        .with_context(|| format!("no private key in {}", key_path.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("node certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A TLS client configuration that trusts the CA certificates in `ca`.
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("bad CA certificate in {}", ca.display()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Hex SHA-256 of the node certificate (DER).
pub fn cert_sha256(dir: &Path) -> Result<String> {
    let certs = load_certs(&dir.join(NODE_CERT))?;
    Ok(hex::encode(Sha256::digest(certs[0].as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_ca_and_a_node_certificate_that_load_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = create(dir.path(), "node1", &["10.1.2.3".into()]).unwrap();
        assert_eq!(files.len(), 4);
        for k in [CA_KEY, NODE_KEY] {
            let mode = std::fs::metadata(dir.path().join(k))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{k}");
        }
        server_config(dir.path()).unwrap();
        client_config(&dir.path().join(CA_CERT)).unwrap();
        assert_eq!(cert_sha256(dir.path()).unwrap().len(), 64);
        let before = std::fs::read(dir.path().join(NODE_KEY)).unwrap();
        assert!(create(dir.path(), "node1", &[]).is_err());
        assert_eq!(std::fs::read(dir.path().join(NODE_KEY)).unwrap(), before);
    }
}
