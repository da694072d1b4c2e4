//! The HTTPS listener's certificate, swappable while the listener runs: a SIGHUP, or a change
//! to the files, re-reads them and new handshakes use the new certificate; open connections are
//! untouched.

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Modification time and length of the certificate and key files, as last read; `None` when
/// either could not be looked at.
type Stamps = Option<[(SystemTime, u64); 2]>;

/// The certificate and key files of a listener and what was last read from them.
#[derive(Debug)]
pub struct CertificateStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    read_stamps: Mutex<Stamps>,
}

impl CertificateStore {
    /// Reads both files; errors name the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let read_stamps = Mutex::new(stamps(cert, key));
        Ok(CertificateStore {
            current: ArcSwap::from_pointee(read(cert, key)?),
            read_stamps,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// Reads the files again. On error the previous certificate stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        *self.read_stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.cert, &self.key);
        self.current.store(Arc::new(read(&self.cert, &self.key)?));
        Ok(())
    }

    /// Reads the files again if either changed since the last read, so that a renewal (certbot,
    /// a Kubernetes secret) needs no signal. `Ok(false)`: nothing changed. A failed read is not
    /// retried until the files change again; renewals that write the two files one after the
    /// other fail once, then succeed when the second file lands.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let now = stamps(&self.cert, &self.key);
        if *self.read_stamps.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamps(cert: &Path, key: &Path) -> Stamps {
    let stamp = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([stamp(cert)?, stamp(key)?])
}

fn read(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = crate::pem::read_certificates(cert)?;
    let key_der = crate::pem::read_private_key(key)?;
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
