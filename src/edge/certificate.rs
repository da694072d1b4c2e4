//! The HTTPS listener's certificate, swappable while the listener runs: a SIGHUP re-reads
//! the files and new handshakes use the new certificate; open connections are untouched.

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The certificate and key files of a listener and what was last read from them.
#[derive(Debug)]
pub struct CertificateStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl CertificateStore {
    /// Reads both files; errors name the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Ok(CertificateStore {
            current: ArcSwap::from_pointee(read(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// Reads the files again. On error the previous certificate stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        self.current.store(Arc::new(read(&self.cert, &self.key)?));
        Ok(())
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Certificates of a PEM file (for chains and CA bundles).
pub fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: cannot read certificates: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn read_private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read a private key: {e}", path.display()))
}

fn read(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = read_certificates(cert)?;
    let key_der = read_private_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key_der, &provider).map_err(|e| {
        anyhow::anyhow!(
            "{} and {}: the key does not fit the certificate: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(certified)
}
