//! TLS for the tests: a throwaway CA issuing certificates (rcgen), clients that
//! trust it (aws-sdk-s3, a raw rustls client, an HTTP/2 client), and a TLS
//! front that turns the plain S3 backend into an HTTPS-only one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A certificate authority that exists for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub dir: tempfile::TempDir,
}

/// A certificate and key written to files.
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a server certificate for `names` (DNS names or IP literals)
    /// and writes it as `<stem>.crt` / `<stem>.key` in the CA's directory.
    pub fn issue(&self, stem: &str, names: &[&str]) -> IssuedFiles {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = IssuedFiles {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
            der: cert.der().clone(),
        };
        write_pair(&files.cert, &cert.pem(), &files.key, &key.serialize_pem());
        files
    }

    /// A rustls client config trusting this CA, with the given ALPN protocols.
    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&self.pem) {
            roots.add(cert).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// Connects over TLS and returns the certificate the server presented.
    pub async fn presented_certificate(
        &self,
        address: SocketAddr,
    ) -> anyhow::Result<CertificateDer<'static>> {
        let connector = TlsConnector::from(Arc::new(self.client_config(&[b"http/1.1"])));
        let tcp = TcpStream::connect(address).await?;
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let (_, session) = tls.get_ref();
        Ok(session.peer_certificates().unwrap()[0].clone())
    }
}

/// Writes a pair the way a careful writer does: complete files, then rename.
pub fn write_pair(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) {
    for (path, pem) in [(cert, cert_pem), (key, key_pem)] {
        let staging = path.with_extension("tmp");
        std::fs::write(&staging, pem).unwrap();
        std::fs::rename(&staging, path).unwrap();
    }
}

fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

/// An aws-sdk-s3 client over HTTPS that trusts `ca`, retries off.
pub fn s3_client_tls(endpoint: &str, ca: &TestCa) -> aws_sdk_s3::Client {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(
            TlsContext::builder()
                .with_trust_store(
                    TrustStore::empty().with_pem_certificate(ca.pem.as_bytes().to_vec()),
                )
                .build()
                .unwrap(),
        )
        .build_https();
    let base = super::s3_client(endpoint).config().to_builder();
    aws_sdk_s3::Client::from_conf(base.http_client(http_client).build())
}

/// A TLS terminator in front of a plain backend: an HTTPS-only "s3gw".
pub struct TlsFront {
    pub address: SocketAddr,
    upstream: SocketAddr,
    acceptor: TlsAcceptor,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TlsFront {
    pub async fn start(upstream: SocketAddr, files: &IssuedFiles) -> TlsFront {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let chain = vec![files.der.clone()];
        let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut front = TlsFront {
            address: listener.local_addr().unwrap(),
            upstream,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            task: None,
        };
        front.serve(listener);
        front
    }

    fn serve(&mut self, listener: TcpListener) {
        let (acceptor, upstream) = (self.acceptor.clone(), self.upstream);
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        }));
    }

    /// Stops listening and cuts every connection, like a crashed process.
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(error) if std::time::Instant::now() > deadline => {
                    panic!("rebinding {}: {error}", self.address)
                }
                Err(_) => tokio::task::yield_now().await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TLS connection to `address` that speaks HTTP/1.1 (ALPN http/1.1).
pub async fn http1_connect(
    address: SocketAddr,
    ca: &TestCa,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(ca.client_config(&[b"http/1.1"])));
    let tcp = TcpStream::connect(address).await?;
    let name = ServerName::try_from("localhost").unwrap();
    Ok(connector.connect(name, tcp).await?)
}

/// An HTTP/2 connection over TLS (ALPN h2) to `address`.
pub async fn h2_connect<B>(
    address: SocketAddr,
    ca: &TestCa,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connector = TlsConnector::from(Arc::new(ca.client_config(&[b"h2"])));
    let tcp = TcpStream::connect(address).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN chose h2"
    );
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A proxy in front of `backend` with an HTTPS listener whose certificate
/// `ca` issued for localhost, plus `extra` config.
pub async fn https_proxy(backend: SocketAddr, ca: &TestCa, extra: &str) -> super::ProxyUnderTest {
    let files = ca.issue("edge", &["localhost", "127.0.0.1"]);
    let config = format!(
        "[listener.tls]\naddress = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n{extra}",
        files.cert.display(),
        files.key.display()
    );
    super::ProxyUnderTest::start(backend, &config)
        .await
        .unwrap()
}
