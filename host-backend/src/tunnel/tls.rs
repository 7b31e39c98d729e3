//! TLS for the tunnel: rustls configurations from the configured PEM files, both sides
//! authenticated by the same CA, and the check that a peer's certificate names the host
//! it claims to be.
//!
//! The server requires a client certificate that chains to the CA; the client verifies the
//! server's certificate against the CA *and* the configured peer name (SAN). The server
//! then maps the verified client certificate to a configured peer by its SAN
//! ([`peer_of`]): a certificate valid for none of them is refused.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why the TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    /// A PEM file is missing or unreadable.
    #[error("reading {path}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    /// rustls refused the material.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (no usable CA).
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Both rustls configurations of one host.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// For connections this host accepts.
    pub server: Arc<ServerConfig>,
    /// For connections this host dials.
    pub client: Arc<ClientConfig>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Loads the host certificate chain, its key and the CA certificate (PEM files).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsSetupError> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsSetupError::Pem {
            path: key.to_owned(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs(ca)? {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        // TLS 1.3 only, no session tickets, and the traffic secrets may be taken out once
        // the handshake is done: the tunnel's record layer ([`super::record`]) speaks
        // TLS 1.3 records and nothing after the handshake.
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.enable_secret_extraction = true;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Which of `peers` the (already CA-verified) end-entity certificate `cert` is valid for,
/// by its subject alternative names.
pub fn peer_of<'a>(
    cert: &CertificateDer<'_>,
    peers: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    peers.into_iter().find(|name| {
        ServerName::try_from(*name).is_ok_and(|sn| ee.verify_is_valid_for_subject_name(&sn).is_ok())
    })
}
