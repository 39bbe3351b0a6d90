//! The client side of TLS to etcd servers with rustls, and the protocol versions and
//! cipher suites etcd's `--tls-min-version`, `--tls-max-version` and
//! `--cipher-suites` flags choose (the server side shares them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{SignatureScheme, SupportedProtocolVersion};

/// What a client presents and trusts, as etcdctl's `--cacert`, `--cert`, `--key` and
/// `--insecure-skip-tls-verify` give it.
#[derive(Debug, Clone, Default)]
pub struct ClientFiles {
    /// PEM client certificate chain; empty presents none.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA bundle the server's certificate must chain to.
    pub trusted_ca_file: Option<PathBuf>,
    /// Accept any server certificate (signatures are still checked).
    pub skip_verify: bool,
}

/// `--cipher-suites`, `--tls-min-version` and `--tls-max-version`.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Go's names of the TLS 1.2 cipher suites to offer; empty offers rustls' set.
    pub cipher_suites: Vec<String>,
    /// "TLS1.2" or "TLS1.3"; empty means TLS1.2.
    pub min_version: String,
    /// "TLS1.2" or "TLS1.3"; empty means the newest.
    pub max_version: String,
}

impl TlsOptions {
    /// Whether the versions and suites are valid; the error names the flag.
    pub fn check(&self) -> Result<(), String> {
        self.provider()?;
        self.versions()?;
        Ok(())
    }

    /// The crypto provider with the chosen cipher suites.
    pub fn provider(&self) -> Result<Arc<CryptoProvider>, String> {
        let mut provider = rustls::crypto::ring::default_provider();
        if !self.cipher_suites.is_empty() {
            let mut chosen = Vec::new();
            for name in &self.cipher_suites {
                let wanted = name.trim().trim_end_matches("_SHA256").to_string();
                let found = provider.cipher_suites.iter().find(|suite| {
                    suite.version() == &rustls::version::TLS12
                        && format!("{:?}", suite.suite()).trim_end_matches("_SHA256") == wanted
                });
                match found {
                    Some(suite) => chosen.push(*suite),
                    None => {
                        return Err(format!(
                            "--cipher-suites: unexpected TLS cipher suite {name:?}"
                        ))
                    }
                }
            }
            // TLS 1.3's suites are not configurable, as in Go.
            chosen.extend(
                provider
                    .cipher_suites
                    .iter()
                    .filter(|suite| suite.version() == &rustls::version::TLS13),
            );
            provider.cipher_suites = chosen;
        }
        Ok(Arc::new(provider))
    }

    /// The protocol versions between the minimum and the maximum.
    pub fn versions(&self) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
        fn rank(flag: &str, text: &str, default: u8) -> Result<u8, String> {
            match text {
                "" => Ok(default),
                "TLS1.2" => Ok(2),
                "TLS1.3" => Ok(3),
                "TLS1.0" | "TLS1.1" => Err(format!(
                    "--{flag} {text}: only TLS1.2 and TLS1.3 are supported"
                )),
                _ => Err(format!(
                    "--{flag}: unexpected TLS version {text:?} (use TLS1.2 or TLS1.3)"
                )),
            }
        }
        let min = rank("tls-min-version", &self.min_version, 2)?;
        let max = rank("tls-max-version", &self.max_version, 3)?;
        if min > max {
            return Err("--tls-min-version is greater than --tls-max-version".into());
        }
        Ok([(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(rank, _)| (min..=max).contains(rank))
            .map(|(_, version)| version)
            .collect())
    }
}

/// A file's bytes; the error names the file.
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key found", path.display()))
}

/// A root store of the CA certificates of a PEM file.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: invalid CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The client side of a TLS connection to an etcd server: verifies the server against
/// the trusted CA (or not at all, as etcd's auto TLS and etcdctl's
/// `--insecure-skip-tls-verify`) and presents a certificate (none when `cert_file`
/// is empty).
pub fn client_config(files: &ClientFiles, options: &TlsOptions) -> Result<ClientConfig, String> {
    let provider = options.provider()?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&options.versions()?)
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match (&files.trusted_ca_file, files.skip_verify) {
        (Some(ca), false) => builder.with_root_certificates(load_roots(ca)?),
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer { provider })),
    };
    let mut config = if files.cert_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        builder
            .with_client_auth_cert(load_certs(&files.cert_file)?, load_key(&files.key_file)?)
            .map_err(|e| format!("{}: {e}", files.key_file.display()))?
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A connector for tonic's `Endpoint::connect_with_connector`: TCP, then TLS with
/// `tls`, to the host and port of the URI, within `timeout`. The endpoint itself is
/// given as http, so the TLS here works whatever TLS support tonic was built with.
pub fn connector(
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future: Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let connect = async {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(host.clone()).map_err(std::io::Error::other)?;
                tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
            };
            let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// Accepts any server certificate (signatures still checked): etcd's auto TLS peers
/// skip verification, since nobody can vouch for a self-signed certificate.
#[derive(Debug)]
struct AnyServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
