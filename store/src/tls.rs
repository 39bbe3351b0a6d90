//! TLS with rustls, configured from etcd's flags: the server side of the client and
//! peer listeners (certificates re-read when they change on disk), the client side of
//! calls to peers (built on `etcd_api::tls`), and self-signed certificates for
//! `--auto-tls`/`--peer-auto-tls`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName};
use rustls::{ServerConfig, SignatureScheme};

pub use etcd_api::tls::{connector, TlsOptions};
use etcd_api::tls::{load_certs, load_key, load_roots, read, ClientFiles};

/// How often the certificate files of a listener are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// One side's certificate material, as etcd's `--cert-file`/`--peer-cert-file` flag
/// families give it.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA bundle that client (or peer) certificates must chain to.
    pub trusted_ca_file: Option<PathBuf>,
    /// Certificate revocation lists (PEM or DER): client certificates they revoke
    /// are refused.
    pub crl_file: Option<PathBuf>,
    /// Require and verify a certificate from every connecting client.
    pub client_cert_auth: bool,
    /// What a verified client certificate must also carry.
    pub allowed: Option<AllowedClient>,
    /// The certificate is self-signed (`--auto-tls`): as etcd, a client of this side
    /// does not verify the other side's certificate.
    pub self_signed: bool,
}

/// `--peer-cert-allowed-cn`, or `--client-cert-allowed-hostname` and
/// `--peer-cert-allowed-hostname`.
#[derive(Debug, Clone)]
pub enum AllowedClient {
    /// The certificate's subject CommonName is exactly this.
    CommonName(String),
    /// The certificate's DNS or IP subject alternative names cover this host, as
    /// Go's `VerifyHostname` (which etcd uses) decides.
    Hostname(ServerName<'static>),
}

impl AllowedClient {
    /// A hostname or IP address; an error says what is wrong with it.
    pub fn hostname(text: &str) -> Result<AllowedClient, String> {
        ServerName::try_from(text.to_string())
            .map(AllowedClient::Hostname)
            .map_err(|_| format!("{text:?} is neither a DNS name nor an IP address"))
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match self {
            AllowedClient::CommonName(wanted) => match common_name(end_entity) {
                Some(name) if &name == wanted => Ok(()),
                name => Err(rustls::Error::General(format!(
                    "CommonName authentication failed: {name:?} is not {wanted:?}"
                ))),
            },
            AllowedClient::Hostname(wanted) => {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, wanted).map_err(|_| {
                    rustls::Error::General(format!(
                        "hostname authentication failed: the certificate is not valid for {}",
                        wanted.to_str()
                    ))
                })
            }
        }
    }
}

/// The revocation lists of a file: PEM blocks, or one DER list.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = read(path)?;
    let crls = rustls_pemfile::crls(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if !crls.is_empty() {
        return Ok(crls);
    }
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    Err(format!(
        "{}: no certificate revocation list found",
        path.display()
    ))
}

/// Builds a server configuration from the files as they are now.
fn server_config(files: &TlsFiles, options: &TlsOptions) -> Result<ServerConfig, String> {
    let provider = options.provider()?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&options.versions()?)
        .map_err(|e| format!("TLS: {e}"))?;
    // As etcd's: a trusted CA file alone also makes client certificates required.
    let builder = if files.client_cert_auth || files.trusted_ca_file.is_some() {
        let ca = files.trusted_ca_file.as_deref().ok_or_else(|| {
            "client certificate authentication needs a trusted CA file (--trusted-ca-file or --peer-trusted-ca-file)".to_string()
        })?;
        let mut verifier = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider);
        if let Some(crl) = &files.crl_file {
            // As etcd: certificates that no list speaks of are not refused.
            verifier = verifier
                .with_crls(load_crls(crl)?)
                .allow_unknown_revocation_status();
        }
        let verifier = verifier.build().map_err(|e| {
            let file = files.crl_file.as_deref().unwrap_or(ca);
            format!("{} or {}: {e}", ca.display(), file.display())
        })?;
        match &files.allowed {
            Some(allowed) => builder.with_client_cert_verifier(Arc::new(AllowedClientVerifier {
                inner: verifier,
                allowed: allowed.clone(),
            })),
            None => builder.with_client_cert_verifier(verifier),
        }
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(load_certs(&files.cert_file)?, load_key(&files.key_file)?)
        .map_err(|e| format!("{}: {e}", files.key_file.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The modification stamps of a listener's files, to notice rotation.
fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(files.cert_file.as_path()),
        Some(files.key_file.as_path()),
        files.trusted_ca_file.as_deref(),
        files.crl_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|meta| Some((meta.modified().ok()?, meta.len())))
    })
    .collect()
}

struct Loaded {
    stamps: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
    config: Arc<ServerConfig>,
}

/// A listener's TLS configuration, rebuilt when its certificate, key, CA or CRL file
/// changes on disk (checked at most once a second, on new connections). A file that
/// fails to load keeps the previous configuration in use.
pub struct ServerTls {
    files: TlsFiles,
    options: TlsOptions,
    loaded: Mutex<Loaded>,
}

impl ServerTls {
    /// Loads the files once; an error names the file and what is wrong with it.
    pub fn new(files: TlsFiles, options: TlsOptions) -> Result<Arc<ServerTls>, String> {
        let stamps = stamps(&files);
        let config = Arc::new(server_config(&files, &options)?);
        Ok(Arc::new(ServerTls {
            files,
            options,
            loaded: Mutex::new(Loaded {
                stamps,
                checked: Instant::now(),
                config,
            }),
        }))
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut loaded = self.loaded.lock();
        if loaded.checked.elapsed() >= RELOAD_CHECK {
            loaded.checked = Instant::now();
            let now = stamps(&self.files);
            if now != loaded.stamps {
                match server_config(&self.files, &self.options) {
                    Ok(config) => {
                        tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate files changed; reloaded");
                        loaded.config = Arc::new(config);
                        loaded.stamps = now;
                    }
                    // Half-written files are common during rotation: try again later.
                    Err(error) => {
                        tracing::warn!(%error, "TLS certificate files changed but cannot be loaded; keeping the previous ones")
                    }
                }
            }
        }
        loaded.config.clone()
    }
}

/// The client side for calls to peers: verifies the peer against the trusted CA (or
/// not at all with self-signed certificates, as etcd's auto TLS) and presents this
/// member's certificate.
pub fn client_config(files: &TlsFiles, options: &TlsOptions) -> Result<ClientConfig, String> {
    let client = ClientFiles {
        cert_file: files.cert_file.clone(),
        key_file: files.key_file.clone(),
        trusted_ca_file: files.trusted_ca_file.clone(),
        skip_verify: files.self_signed,
    };
    etcd_api::tls::client_config(&client, options)
}

/// A verified client certificate must also carry what [`AllowedClient`] names.
#[derive(Debug)]
struct AllowedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: AllowedClient,
}

impl ClientCertVerifier for AllowedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.allowed.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Writes (once; later starts reuse them) a self-signed certificate and key for
/// `hosts` into `dir`, valid for `validity_years`, as etcd's `--auto-tls` does under
/// `<data-dir>/fixtures`.
pub fn self_signed(
    dir: &Path,
    hosts: &[String],
    validity_years: u32,
) -> Result<(PathBuf, PathBuf), String> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let failed =
        |e: &dyn std::fmt::Display| format!("cannot generate a self-signed certificate: {e}");
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(|e| failed(&e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "kvstore");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365 * i64::from(validity_years.max(1)));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
    let cert = params.self_signed(&key).map_err(|e| failed(&e))?;
    crate::storage::create_private_dir(dir).map_err(|e| failed(&e))?;
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| failed(&e))?;
    std::fs::write(&cert_path, cert.pem()).map_err(|e| failed(&e))?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed certificate");
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Reads one DER element: (tag, contents, rest).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |acc, byte| (acc << 8) | usize::from(*byte));
        rest = &rest[count..];
        length
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

const SEQUENCE: u8 = 0x30;

/// The fields of a DER certificate's TBSCertificate from its subject on.
fn fields_from_subject(der: &[u8]) -> Option<&[u8]> {
    let (tag, certificate, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    // Optional [0] version, then serial, signature algorithm, issuer, validity.
    let (tag, _, rest) = element(tbs)?;
    let mut fields = if tag == 0xa0 { element(rest)?.2 } else { rest };
    for _ in 0..3 {
        fields = element(fields)?.2;
    }
    Some(fields)
}

/// The DNS names and IP addresses among a DER certificate's subject alternative
/// names (both empty when it has none).
pub fn subject_alt_names(der: &[u8]) -> Option<(Vec<String>, Vec<std::net::IpAddr>)> {
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    // Subject, subject public key info, then optional unique IDs and [3] extensions.
    let (_, _, rest) = element(fields_from_subject(der)?)?;
    let (_, _, mut rest) = element(rest)?;
    let mut names = (Vec::new(), Vec::new());
    while !rest.is_empty() {
        let (tag, contents, after) = element(rest)?;
        rest = after;
        if tag != 0xa3 {
            continue;
        }
        let (_, mut extensions, _) = element(contents)?;
        while !extensions.is_empty() {
            let (_, extension, after) = element(extensions)?;
            extensions = after;
            let (_, oid, value) = element(extension)?;
            if oid != SUBJECT_ALT_NAME {
                continue;
            }
            // An optional critical flag, then the names in an OCTET STRING.
            let (mut tag, mut octets, after) = element(value)?;
            if tag == 0x01 {
                (tag, octets, _) = element(after)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (_, mut general_names, _) = element(octets)?;
            while !general_names.is_empty() {
                let (tag, name, after) = element(general_names)?;
                general_names = after;
                match (tag, name.len()) {
                    (0x82, _) => names.0.push(String::from_utf8(name.to_vec()).ok()?),
                    (0x87, 4) => names
                        .1
                        .push(std::net::IpAddr::from(<[u8; 4]>::try_from(name).ok()?)),
                    (0x87, 16) => names
                        .1
                        .push(std::net::IpAddr::from(<[u8; 16]>::try_from(name).ok()?)),
                    _ => {}
                }
            }
        }
    }
    Some(names)
}

/// etcd's check of a peer's client certificate against the address `remote` it
/// connects from: with IP addresses among its subject alternative names, one must be
/// `remote`; else with DNS names, one must resolve to `remote`; a certificate with
/// neither passes.
pub async fn check_client_san(der: &[u8], remote: std::net::IpAddr) -> Result<(), String> {
    let remote = match remote {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(remote, std::net::IpAddr::V4),
        v4 => v4,
    };
    let (dns_names, ips) =
        subject_alt_names(der).ok_or_else(|| "its certificate cannot be parsed".to_string())?;
    if ips.is_empty() && dns_names.is_empty() || ips.contains(&remote) {
        return Ok(());
    }
    if dns_names.is_empty() {
        return Err(format!(
            "{remote} is not among the certificate's IP addresses {ips:?}"
        ));
    }
    for name in &dns_names {
        if let Ok(addresses) = tokio::net::lookup_host((name.as_str(), 0)).await {
            if addresses.map(|address| address.ip()).any(|ip| ip == remote) {
                return Ok(());
            }
        }
    }
    Err(format!(
        "{remote} does not match any of DNSNames {dns_names:?}"
    ))
}

/// The subject CommonName of a DER certificate, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, mut subject, _) = element(fields_from_subject(der)?)?;
    if tag != SEQUENCE {
        return None;
    }
    while !subject.is_empty() {
        let (tag, mut set, rest) = element(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (_, attribute, rest) = element(set)?;
            set = rest;
            let (tag, oid, value) = element(attribute)?;
            if tag == 0x06 && oid == COMMON_NAME {
                let (kind, text, _) = element(value)?;
                // UTF8String, PrintableString, T61String, IA5String.
                if matches!(kind, 0x0c | 0x13 | 0x14 | 0x16) {
                    return String::from_utf8(text.to_vec()).ok();
                }
                return None;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "org");
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn certificate_for(names: &[&str]) -> Vec<u8> {
        let names = names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn subject_alt_names_are_read() {
        let der = certificate_for(&["localhost", "127.0.0.1", "::1", "db.example"]);
        let (dns, ips) = subject_alt_names(&der).unwrap();
        assert_eq!(dns, ["localhost", "db.example"]);
        let expected: Vec<std::net::IpAddr> =
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        assert_eq!(ips, expected);
        assert_eq!(
            subject_alt_names(&certificate_for(&[])),
            Some((vec![], vec![]))
        );
        for cut in 0..der.len() {
            // Truncated input never panics.
            let _ = subject_alt_names(&der[..cut]);
        }
    }

    #[tokio::test]
    async fn a_peer_certificate_must_name_the_address_it_connects_from() {
        let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let elsewhere: std::net::IpAddr = "10.9.8.7".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let by_ip = certificate_for(&["127.0.0.1"]);
        assert_eq!(check_client_san(&by_ip, loopback).await, Ok(()));
        assert_eq!(check_client_san(&by_ip, mapped).await, Ok(()));
        assert!(check_client_san(&by_ip, elsewhere).await.is_err());
        // A DNS name must resolve to the address.
        let by_name = certificate_for(&["localhost"]);
        assert_eq!(check_client_san(&by_name, loopback).await, Ok(()));
        let refused = check_client_san(&by_name, elsewhere).await.unwrap_err();
        assert!(
            refused.contains("does not match any of DNSNames"),
            "{refused}"
        );
        // An IP address that does not match, then a DNS name that does.
        let both = certificate_for(&["10.1.1.1", "localhost"]);
        assert_eq!(check_client_san(&both, loopback).await, Ok(()));
        // No names at all: nothing to check, as in etcd.
        assert_eq!(
            check_client_san(&certificate_for(&[]), elsewhere).await,
            Ok(())
        );
    }

    #[test]
    fn common_name_is_read_from_the_subject() {
        assert_eq!(
            common_name(&certificate(Some("alice"))).as_deref(),
            Some("alice")
        );
        assert_eq!(common_name(&certificate(None)), None);
        assert_eq!(common_name(b""), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        let der = certificate(Some("bob"));
        for cut in 0..der.len() {
            // Truncated input never panics.
            let _ = common_name(&der[..cut]);
        }
    }

    #[test]
    fn options_name_bad_values() {
        let options = TlsOptions {
            cipher_suites: vec!["TLS_RSA_WITH_RC4_128_SHA".into()],
            ..TlsOptions::default()
        };
        assert!(options
            .provider()
            .unwrap_err()
            .contains("TLS_RSA_WITH_RC4_128_SHA"));
        let options = TlsOptions {
            cipher_suites: vec![
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305".into(),
            ],
            ..TlsOptions::default()
        };
        assert_eq!(options.provider().unwrap().cipher_suites.len(), 2 + 3);
        let options = TlsOptions {
            min_version: "TLS1.3".into(),
            max_version: "TLS1.2".into(),
            ..TlsOptions::default()
        };
        assert!(options.versions().is_err());
        let options = TlsOptions {
            min_version: "TLS1.0".into(),
            ..TlsOptions::default()
        };
        assert!(options
            .versions()
            .unwrap_err()
            .contains("--tls-min-version"));
    }
}
