//! A test CA and host certificates for the tunnel, made with rcgen: **for tests and labs
//! only** (keys are written unencrypted, the CA is self-signed, nothing is revocable).
//! Production hosts should get their certificates from a real CA.
//!
//! `make_test_pki(dir, ["a", "b"])` writes `ca.pem`, `ca.key`, and per host `<host>.pem`
//! (certificate with the host name as its DNS SAN, usable as TLS server and client) and
//! `<host>.key`.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the certificates were not made.
#[derive(Debug, Error)]
pub enum CertError {
    /// rcgen failed.
    #[error("generating a certificate")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a usable host name.
    #[error("{0:?} is not a host name (1..=255 of a-z 0-9 . -)")]
    BadHost(String),
}

fn write(path: PathBuf, data: &str) -> Result<(), CertError> {
    std::fs::write(&path, data).map_err(|source| CertError::Write { path, source })
}

/// Writes a new CA and one certificate and key per host into `out` (created if missing).
pub fn make_test_pki<'a>(
    out: &Path,
    hosts: impl IntoIterator<Item = &'a str>,
) -> Result<(), CertError> {
    let hosts: Vec<&str> = hosts.into_iter().collect();
    if let Some(bad) = hosts
        .iter()
        .find(|h| !domsock_migration::tunnel::wire::valid_host_name(h))
    {
        return Err(CertError::BadHost((*bad).to_owned()));
    }
    std::fs::create_dir_all(out).map_err(|source| CertError::Write {
        path: out.to_owned(),
        source,
    })?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "domsock tunnel test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write(out.join("ca.pem"), &ca_cert.pem())?;
    write(out.join("ca.key"), &ca_key.serialize_pem())?;
    for host in hosts {
        let mut p = CertificateParams::new(vec![host.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, host);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        write(out.join(format!("{host}.pem")), &cert.pem())?;
        write(out.join(format!("{host}.key")), &key.serialize_pem())?;
    }
    Ok(())
}
