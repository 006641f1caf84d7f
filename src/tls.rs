//! TLS with rustls, both ways: the S3 listener's certificate (reloadable while
//! serving) and the optional TLS client settings for an HTTPS-only backend.
//!
//! [`ServerCertificate`] is the listener's certificate resolver: it holds the
//! current pair behind a lock, so new handshakes use a new pair the moment it is
//! swapped in while established connections keep theirs. [`ServerCertificate::
//! reload_if_changed`] re-reads the files (cert-manager rewrites them by swapping
//! a symlink) and keeps the old pair when the new one does not load.
//! [`client_config`] builds the backend side from a CA bundle and an optional
//! client certificate. Both use the `ring` provider explicitly, so the process
//! never depends on a process-wide default. Every file is read through
//! [`trusted_file`] (no world-writable file, none over 1 MiB).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::trusted_file::{self, FileError, FilePolicy};

/// Why certificates or keys could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("certificate and key do not form a usable pair: {0}")]
    Pair(rustls::Error),
    #[error("invalid TLS settings: {0}")]
    Settings(rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, files: FilePolicy) -> Result<Vec<u8>, TlsError> {
    Ok(trusted_file::read(path, files)?)
}

/// Every certificate in a PEM file.
pub fn load_certificates(
    path: &Path,
    files: FilePolicy,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certificates_from_pem(path, &read(path, files)?)
}

fn certificates_from_pem(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates_from_pem(cert_path, cert_pem)?;
    let key = key_from_pem(key_path, key_pem)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Pair)
}

/// The S3 listener's certificate, swappable while serving.
pub struct ServerCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// How the files are read, on every reload too.
    files: FilePolicy,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files held when last read (the current pair's source, or
    /// what last failed to load), or why they could not be read: each
    /// change is reported once, a missing file included.
    last_seen: Mutex<Files>,
}

/// A read of the pair's files: certificate and key contents, or the error.
type Files = Result<(Vec<u8>, Vec<u8>), String>;

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("cert", &self.cert_path)
            .finish()
    }
}

/// What a reload check found.
#[derive(Debug, PartialEq, Eq)]
pub enum CertificateReload {
    Unchanged,
    Reloaded,
    /// The files changed but do not load; the old pair stays.
    Rejected(String),
}

impl ServerCertificate {
    /// Loads the pair; start-up fails if it does not load.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        files: FilePolicy,
    ) -> Result<ServerCertificate, TlsError> {
        let (cert_pem, key_pem) = (read(cert_path, files)?, read(key_path, files)?);
        let key = certified_key(cert_path, &cert_pem, key_path, &key_pem)?;
        Ok(ServerCertificate {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            files,
            current: RwLock::new(Arc::new(key)),
            last_seen: Mutex::new(Ok((cert_pem, key_pem))),
        })
    }

    /// Re-reads the files; swaps the pair in if they changed and load.
    /// A change that does not load, or files that cannot be read, are
    /// `Rejected` once and `Unchanged` until the files change again.
    pub fn reload_if_changed(&self) -> CertificateReload {
        let read = |path: &Path| trusted_file::read(path, self.files);
        let files = read(&self.cert_path).and_then(|cert| Ok((cert, read(&self.key_path)?)));
        let files: Files = match files {
            // Out of descriptors says nothing about the files: no change.
            Err(error) if error.is_descriptor_shortage() => return CertificateReload::Unchanged,
            files => files.map_err(|error| error.to_string()),
        };
        let mut last_seen = self.last_seen.lock().unwrap();
        if *last_seen == files {
            return CertificateReload::Unchanged;
        }
        // Remember what failed too, so one broken write is reported once.
        *last_seen = files;
        let (cert_pem, key_pem) = match &*last_seen {
            Ok(pair) => pair,
            Err(error) => return CertificateReload::Rejected(error.clone()),
        };
        let loaded = certified_key(&self.cert_path, cert_pem, &self.key_path, key_pem);
        match loaded {
            Ok(key) => {
                *self.current.write().unwrap() = Arc::new(key);
                CertificateReload::Reloaded
            }
            Err(error) => CertificateReload::Rejected(error.to_string()),
        }
    }

    /// The end-entity certificate served to new handshakes.
    pub fn current_certificate(&self) -> CertificateDer<'static> {
        self.current.read().unwrap().cert[0].clone()
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap()))
    }
}

/// The S3 listener's TLS settings: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
pub fn server_config(certificate: Arc<ServerCertificate>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Settings)?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS settings for connections to the backend.
pub fn client_config(
    ca: &Path,
    client_pair: Option<(&Path, &Path)>,
    files: FilePolicy,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(ca, files)? {
        roots.add(certificate).map_err(TlsError::Settings)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Settings)?
        .with_root_certificates(roots);
    let mut config = match client_pair {
        Some((cert, key)) => {
            let chain = load_certificates(cert, files)?;
            let key = key_from_pem(key, &read(key, files)?)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::Pair)?
        }
        None => builder.with_no_client_auth(),
    };
    // The upstream speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        dir: tempfile::TempDir,
    }

    impl Pair {
        fn cert(&self) -> PathBuf {
            self.dir.path().join("tls.crt")
        }
        fn key(&self) -> PathBuf {
            self.dir.path().join("tls.key")
        }
        fn write(&self, name: &str) {
            let issued = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            std::fs::write(self.cert(), issued.cert.pem()).unwrap();
            std::fs::write(self.key(), issued.signing_key.serialize_pem()).unwrap();
        }
    }

    fn pair(name: &str) -> Pair {
        let pair = Pair {
            dir: tempfile::tempdir().unwrap(),
        };
        pair.write(name);
        pair
    }

    #[test]
    fn a_changed_pair_is_swapped_in() {
        let files = pair("one.test");
        let certificate =
            ServerCertificate::load(&files.cert(), &files.key(), FilePolicy::default()).unwrap();
        let before = certificate.current_certificate();
        assert_eq!(
            certificate.reload_if_changed(),
            CertificateReload::Unchanged
        );
        files.write("two.test");
        assert_eq!(certificate.reload_if_changed(), CertificateReload::Reloaded);
        assert_ne!(certificate.current_certificate(), before);
    }

    #[test]
    fn a_broken_pair_is_rejected_once_and_the_old_one_stays() {
        let files = pair("one.test");
        let certificate =
            ServerCertificate::load(&files.cert(), &files.key(), FilePolicy::default()).unwrap();
        let before = certificate.current_certificate();
        std::fs::write(files.cert(), "not a certificate").unwrap();
        assert!(matches!(
            certificate.reload_if_changed(),
            CertificateReload::Rejected(_)
        ));
        assert_eq!(
            certificate.reload_if_changed(),
            CertificateReload::Unchanged
        );
        assert_eq!(certificate.current_certificate(), before);
    }

    #[test]
    fn a_missing_file_is_rejected_once_until_it_changes() {
        let files = pair("one.test");
        let certificate =
            ServerCertificate::load(&files.cert(), &files.key(), FilePolicy::default()).unwrap();
        std::fs::remove_file(files.key()).unwrap();
        assert!(matches!(
            certificate.reload_if_changed(),
            CertificateReload::Rejected(error) if error.contains("tls.key")
        ));
        assert_eq!(
            certificate.reload_if_changed(),
            CertificateReload::Unchanged
        );
        files.write("two.test");
        assert_eq!(certificate.reload_if_changed(), CertificateReload::Reloaded);
    }

    #[test]
    fn a_world_writable_key_is_refused_at_load_and_on_reload() {
        use std::os::unix::fs::PermissionsExt;
        let files = pair("one.test");
        let certificate =
            ServerCertificate::load(&files.cert(), &files.key(), FilePolicy::default()).unwrap();
        let world_writable = std::fs::Permissions::from_mode(0o666);
        std::fs::set_permissions(files.key(), world_writable).unwrap();
        assert!(matches!(
            certificate.reload_if_changed(),
            CertificateReload::Rejected(error) if error.contains("world-writable")
        ));
        let error = ServerCertificate::load(&files.cert(), &files.key(), FilePolicy::default())
            .unwrap_err();
        assert!(error.to_string().contains("tls.key"), "{error}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (first, second) = (pair("one.test"), pair("two.test"));
        let error = ServerCertificate::load(&first.cert(), &second.key(), FilePolicy::default())
            .unwrap_err();
        assert!(matches!(error, TlsError::Pair(_)), "{error}");
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let error = ServerCertificate::load(
            Path::new("/nonexistent/tls.crt"),
            Path::new("/x"),
            FilePolicy::default(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/tls.crt"));
    }
}
