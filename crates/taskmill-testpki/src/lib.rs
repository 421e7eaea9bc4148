//! A throwaway PKI for TLS tests with real handshakes: a CA and, signed by
//! it, a server certificate for `127.0.0.1`/`localhost` and a client
//! certificate, written as PEM files into a directory of their own (removed
//! on drop), plus the rustls server side for in-process TLS endpoints.
//!
//! ```no_run
//! let pki = taskmill_testpki::Pki::new("amqps").unwrap();
//! let ca = pki.ca_file(); // give it to the client
//! let server = pki.server_config(&[b"http/1.1"], false);
//! # let _ = (ca, server);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

/// What can go wrong making the PKI.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A CA, a server and a client certificate as PEM files.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    server_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

impl Pki {
    /// A fresh PKI in a new directory under the system temp dir, named
    /// after `name` (the CA's common name says it too).
    pub fn new(name: &str) -> Result<Pki, Error> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "taskmill-pki-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Pki::in_dir(dir, name)
    }

    fn in_dir(dir: PathBuf, name: &str) -> Result<Pki, Error> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("taskmill test CA {name}"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |san: Vec<String>,
                    usage: ExtendedKeyUsagePurpose,
                    file: &str|
         -> Result<(CertificateDer<'static>, Vec<u8>), Error> {
            let mut p = CertificateParams::new(san)?;
            p.distinguished_name.push(DnType::CommonName, file);
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &issuer)?;
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem())?;
            Ok((cert.der().clone(), key.serialize_der()))
        };
        let (server_der, server_key_der) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        )?;
        leaf(
            vec!["taskmill-worker".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        )?;
        Ok(Pki {
            dir,
            ca_der: ca_cert.der().clone(),
            server_der,
            server_key_der,
        })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM), for `127.0.0.1` and `localhost`.
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key (PKCS#8 PEM).
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client certificate (PEM), common name `client`.
    pub fn client_cert_file(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client's private key (PKCS#8 PEM).
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// The rustls server side: the server certificate, the `alpn`
    /// protocols, and, when `mutual`, a required client certificate signed
    /// by this CA.
    pub fn server_config(&self, alpn: &[&[u8]], mutual: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let b = if mutual {
            let mut roots = RootCertStore::empty();
            roots
                .add(self.ca_der.clone())
                .expect("the CA certificate parses");
            b.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("a verifier over one root"),
            )
        } else {
            b.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let mut c = b
            .with_single_cert(vec![self.server_der.clone()], key)
            .expect("the server certificate and key match");
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_pem_and_the_server_config_builds() {
        let pki = Pki::new("unit").unwrap();
        for f in [
            pki.ca_file(),
            pki.server_cert_file(),
            pki.client_cert_file(),
        ] {
            let s = std::fs::read_to_string(&f).unwrap();
            assert!(s.starts_with("-----BEGIN CERTIFICATE-----"), "{f:?}");
        }
        for f in [pki.server_key_file(), pki.client_key_file()] {
            let s = std::fs::read_to_string(&f).unwrap();
            assert!(s.starts_with("-----BEGIN PRIVATE KEY-----"), "{f:?}");
        }
        let c = pki.server_config(&[b"h2"], true);
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
        let dir = pki.dir().to_path_buf();
        drop(pki);
        assert!(!dir.exists());
    }
}
