//! TLS for TURN over TLS (RFC 8656 §3.1) with rustls: TLS 1.2 and 1.3, ALPN `stun.turn`
//! (RFC 7443), the certificate chain and key from PEM files, replaceable while the relay runs
//! (SIGHUP) without touching established connections: each handshake asks [`TlsServer`]'s
//! resolver for the certificate current at that moment.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// The ALPN protocol id of TURN (RFC 7443 §3).
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";

/// Why a certificate or key could not be used.
#[derive(Debug)]
pub struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The certificate every new handshake presents; replaced whole on reload.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Read once per handshake, never on the relaying path.
        self.0.read().ok().map(|c| c.clone())
    }
}

/// The TLS server side shared by every worker: one rustls configuration whose certificate can
/// be replaced ([`reload`](Self::reload)).
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    current: Arc<CurrentCertificate>,
}

impl TlsServer {
    /// Loads the PEM certificate chain at `cert` (leaf first) and the PEM private key at `key`
    /// (PKCS#8, PKCS#1 or SEC1). Errors name the file and what was wrong with it.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsServer, TlsError> {
        let current = Arc::new(CurrentCertificate(RwLock::new(Arc::new(load(cert, key)?))));
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError(format!("TLS versions: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![ALPN_STUN_TURN.to_vec()];
        // Our own per-connection queue bounds what waits to be written (see `Connection`).
        config.send_tls13_tickets = 0;
        Ok(TlsServer { config: Arc::new(config), current })
    }

    /// Replaces the certificate and key for handshakes from now on; connections already
    /// established keep theirs. On error the current certificate stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let fresh = Arc::new(load(cert, key)?);
        match self.current.0.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// A server connection for a freshly accepted TCP connection.
    pub(crate) fn accept(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(self.config.clone())
    }
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(TlsError(format!("{}: no CERTIFICATE in the file", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError(format!("{}: {e}", key.display())))?;
    let signing = provider::sign::any_supported_type(&key_der)
        .map_err(|e| TlsError(format!("{}: unusable private key: {e}", key.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(certified)
}
