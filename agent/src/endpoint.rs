//! The gRPC endpoint of the operator: plain `http://` (`infermesh local`, on loopback) or
//! `https://` verified against the CA of the operator's TLS Secret (`--ca-cert`, the Secret's
//! `ca.crt` mounted into the agent pod).
//!
//! There is deliberately no fallback to system roots: the operator's certificate comes from a
//! CA it provisions itself, so trusting the system store would only turn a missing mount into
//! a handshake failure on every reconnect. A publicly signed certificate works by pointing
//! `--ca-cert` at the system bundle (`/etc/ssl/certs/ca-certificates.crt`).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// How long connecting (TCP) and the TLS handshake may each take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs on the stream, and how long one may go unanswered: a partition (or an
/// operator host that vanished) breaks the stream within about 5 s instead of the minutes TCP
/// takes, so the agent drops the void attempts and reconnects, and an `Assign` sent into the
/// partition is never delivered late, long after its lease ran out.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// How the operator's certificate is verified on `https://`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of the CA(s) that signed the operator's certificate.
    pub ca_cert: Option<PathBuf>,
    /// The name the certificate must carry; default: the host of the operator URL.
    pub server_name: Option<String>,
}

/// Why the operator endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL does not parse.
    #[error("bad operator URL {url}: {source}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// Neither `http://` nor `https://`.
    #[error("operator URL {0} must start with http:// or https://")]
    UnsupportedScheme(String),
    /// `https://` without a CA to verify the operator with.
    #[error(
        "--ca-cert is required for https (operator URL {0}): point it (or INFERMESH_CA_CERT) at \
         the ca.crt of the operator's TLS Secret"
    )]
    CaCertRequired(String),
    /// TLS options with a plaintext URL: the token would travel in the clear.
    #[error(
        "--ca-cert and --tls-server-name apply to https:// only, but the operator URL is {0}; \
         use https:// (or drop the TLS options for a loopback operator)"
    )]
    TlsOptionsWithoutHttps(String),
    /// The CA file cannot be read.
    #[error("cannot read CA certificate {path}: {source}")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate.
    #[error("CA certificate file {0} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NotPem(PathBuf),
    /// tonic refused the TLS configuration (a certificate that does not parse).
    #[error("TLS configuration for {url}: {source}")]
    Tls {
        /// The URL.
        url: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
}

/// The TLS client configuration for `https://`: the CA read from `tls.ca_cert` and the server
/// name to verify. The file is read on each call, so a renewed CA is picked up on reconnect.
pub fn client_tls_config(url: &str, tls: &TlsOptions) -> Result<ClientTlsConfig, EndpointError> {
    let path = tls
        .ca_cert
        .as_ref()
        .ok_or_else(|| EndpointError::CaCertRequired(url.to_string()))?;
    let pem = std::fs::read(path).map_err(|source| EndpointError::ReadCa {
        path: path.clone(),
        source,
    })?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(EndpointError::NotPem(path.clone()));
    }
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// The endpoint for the operator at `url`: plaintext for `http://`, TLS verified with
/// [`client_tls_config`] for `https://`.
pub fn operator_endpoint(url: &str, tls: &TlsOptions) -> Result<Endpoint, EndpointError> {
    // Checked on the text: tonic would take `unix://` as a socket path, not refuse it.
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| EndpointError::BadUrl {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    match scheme.as_deref() {
        Some("http") => {
            if tls.ca_cert.is_some() || tls.server_name.is_some() {
                return Err(EndpointError::TlsOptionsWithoutHttps(url.to_string()));
            }
            Ok(endpoint)
        }
        Some("https") => endpoint
            .tls_config(client_tls_config(url, tls)?)
            .map_err(|source| EndpointError::Tls {
                url: url.to_string(),
                source,
            }),
        _ => Err(EndpointError::UnsupportedScheme(url.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://infermesh-grpc.infermesh-system.svc:50051";

    fn ca_file(dir: &tempfile::TempDir) -> PathBuf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("self-signed CA");
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, ca.pem()).expect("write CA");
        path
    }

    #[test]
    fn https_with_a_ca_file_builds_a_tls_endpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = TlsOptions {
            ca_cert: Some(ca_file(&dir)),
            server_name: Some("operator.example".into()),
        };
        client_tls_config(URL, &tls).expect("TLS config from the CA file");
        let endpoint = operator_endpoint(URL, &tls).expect("TLS endpoint");
        assert_eq!(endpoint.uri().scheme_str(), Some("https"));
    }

    #[test]
    fn https_without_ca_cert_is_refused_with_a_clear_error() {
        let err = operator_endpoint(URL, &TlsOptions::default()).expect_err("no CA");
        assert!(matches!(err, EndpointError::CaCertRequired(_)), "{err}");
        assert!(
            err.to_string().contains("--ca-cert is required for https"),
            "{err}"
        );
    }

    #[test]
    fn http_stays_plaintext_and_refuses_tls_options() {
        let endpoint =
            operator_endpoint("http://127.0.0.1:50051", &TlsOptions::default()).expect("http");
        assert_eq!(endpoint.uri().scheme_str(), Some("http"));
        let tls = TlsOptions {
            ca_cert: Some("/var/run/infermesh/ca.crt".into()),
            server_name: None,
        };
        let err = operator_endpoint("http://127.0.0.1:50051", &tls).expect_err("TLS on http");
        assert!(
            matches!(err, EndpointError::TlsOptionsWithoutHttps(_)),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.crt");
        let tls = TlsOptions {
            ca_cert: Some(missing.clone()),
            server_name: None,
        };
        let err = operator_endpoint(URL, &tls).expect_err("missing");
        assert!(matches!(err, EndpointError::ReadCa { .. }), "{err}");
        assert!(err.to_string().contains("nope.crt"), "{err}");
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "not a certificate").expect("write");
        let tls = TlsOptions {
            ca_cert: Some(junk),
            server_name: None,
        };
        let err = operator_endpoint(URL, &tls).expect_err("junk");
        assert!(matches!(err, EndpointError::NotPem(_)), "{err}");
    }

    #[test]
    fn other_schemes_are_refused() {
        let err =
            operator_endpoint("unix:///run/op.sock", &TlsOptions::default()).expect_err("unix");
        assert!(matches!(err, EndpointError::UnsupportedScheme(_)), "{err}");
        let err = operator_endpoint("127.0.0.1:50051", &TlsOptions::default()).expect_err("bare");
        assert!(matches!(err, EndpointError::UnsupportedScheme(_)), "{err}");
    }
}
