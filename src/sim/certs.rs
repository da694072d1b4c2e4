//! A throw-away certificate authority for the demo and the tests: a CA, server certificates
//! for `localhost` and `127.0.0.1`, and client certificates for mutual TLS, written as PEM
//! files the gateway reads like any operator's.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A CA that issues certificates into a directory.
pub struct TestCa {
    dir: PathBuf,
    cert: Certificate,
    key: KeyPair,
}

/// The PEM files of one issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// Creates the CA and writes its certificate to `dir/ca.pem`.
    pub fn create(dir: &Path, name: &str) -> anyhow::Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        std::fs::write(dir.join("ca.pem"), cert.pem())?;
        Ok(TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        })
    }

    /// The CA certificate's PEM file (what clients trust).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for `localhost` and `127.0.0.1`, as `dir/{name}.pem` and
    /// `dir/{name}-key.pem`.
    pub fn server(&self, name: &str) -> anyhow::Result<Issued> {
        self.issue(
            name,
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate for mutual TLS.
    pub fn client(&self, name: &str) -> anyhow::Result<Issued> {
        self.issue(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        name: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let issued = Issued {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        std::fs::write(&issued.key, key.serialize_pem())?;
        Ok(issued)
    }

    /// A rustls server configuration with `server`'s certificate that, with
    /// `require_clients`, accepts only clients holding a certificate from this CA.
    pub fn server_config(
        &self,
        server: &Issued,
        require_clients: bool,
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if require_clients {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::pem::read_certificates(&self.ca_path())? {
                roots.add(c)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(
            crate::pem::read_certificates(&server.cert)?,
            crate::pem::read_private_key(&server.key)?,
        )?;
        Ok(Arc::new(config))
    }
}
