//! `kiln-store tls init`: a CA and node certificates for daemons run
//! without the host agent (experiments, benchmarks, tests). Under the
//! agent, the node's identity comes from the agent's PKI instead
//! (`/etc/kiln/pki`), and in a cluster from the cluster CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// The files `init` writes for node `node`: (certificate, key).
pub fn node_files(dir: &Path, node: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{node}.crt")),
        dir.join(format!("{node}.key")),
    )
}

/// The CA certificate `init` writes.
pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}

fn write_new(path: &Path, mode: u32, data: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn rcgen_err(e: rcgen::Error) -> Error {
    Error::Invalid(format!("certificate: {e}"))
}

/// Makes a new CA in `dir` (`ca.crt`, `ca.key`) and, for each node id, a
/// key and a certificate signed by it that names the node (and
/// `localhost`), good for both ends of mutual TLS. Keys are 0600. Refuses
/// to overwrite anything; on failure, removes what it wrote.
pub fn init(dir: &Path, nodes: &[String]) -> Result<Vec<PathBuf>> {
    if nodes.is_empty() {
        return Err(Error::Invalid("name at least one node".into()));
    }
    let mut plan = vec![ca_file(dir), dir.join("ca.key")];
    for n in nodes {
        crate::validate_name(n)?;
        let (c, k) = node_files(dir, n);
        plan.extend([c, k]);
    }
    if let Some(p) = plan.iter().find(|p| p.exists()) {
        return Err(Error::Invalid(format!(
            "{} exists: refusing to replace it",
            p.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", dir.display())))?;

    let ca_key = KeyPair::generate().map_err(rcgen_err)?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "kiln-store CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(rcgen_err)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let mut files = vec![
        (ca_file(dir), 0o644, ca_cert.pem()),
        (dir.join("ca.key"), 0o600, ca_key.serialize_pem()),
    ];
    for n in nodes {
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, n.clone());
        for name in [n.as_str(), "localhost"] {
            let dns = name
                .to_string()
                .try_into()
                .map_err(|_| Error::Invalid(format!("{name:?} cannot be a certificate name")))?;
            p.subject_alt_names.push(SanType::DnsName(dns));
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).map_err(rcgen_err)?;
        let (c, k) = node_files(dir, n);
        files.push((c, 0o644, cert.pem()));
        files.push((k, 0o600, key.serialize_pem()));
    }
    let mut written = Vec::new();
    for (path, mode, pem) in files {
        if let Err(e) = write_new(&path, mode, &pem) {
            for w in &written {
                let _ = std::fs::remove_file(w);
            }
            return Err(e);
        }
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{TcpConnector, TlsFiles};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn makes_files_that_load_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec!["n1".to_string(), "n2".to_string()];
        assert_eq!(init(dir.path(), &nodes).unwrap().len(), 6);
        let (cert, key) = node_files(dir.path(), "n1");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let files = TlsFiles {
            cert,
            key: key.clone(),
            ca: ca_file(dir.path()),
        };
        files.load(TcpConnector::default()).unwrap();
        let before = std::fs::read(&key).unwrap();
        let err = init(dir.path(), &["n3".to_string()]).unwrap_err();
        assert!(err.to_string().contains("refusing to replace"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), before);
        assert!(!node_files(dir.path(), "n3").0.exists());
        // A key others can read is refused.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = files.load(TcpConnector::default()).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
