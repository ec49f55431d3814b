//! TLS on both sides: what pgwarden presents to clients (`[tls]`) and how it
//! talks to the backends (`[server_tls]`).
//!
//! Certificates and keys are read when the configuration is loaded (and again
//! on reload), so a missing or malformed file is a configuration error naming
//! the key, not a failure at the first client. Towards the backends the modes
//! mean what libpq's `sslmode` means: `prefer` and `require` encrypt without
//! checking the certificate, `verify-ca` checks it chains to `ca_file`, and
//! `verify-full` also checks it names the backend's host.

mod stream;

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use stream::{Endpoint, ReadHalf, Stream, WriteHalf};

use crate::config::{ClientTlsMode, Config, ConfigError, ServerTlsMode};
use crate::error::ServerError;

/// The SSLRequest packet: length 8, then the request code.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// TLS material for both sides, loaded from the configuration.
#[derive(Clone)]
pub struct Tls {
    /// what clients may or must do
    pub client_mode: ClientTlsMode,
    acceptor: Option<TlsAcceptor>,
    /// what pgwarden does towards the backends
    pub server_mode: ServerTlsMode,
    connector: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_mode", &self.client_mode)
            .field("server_mode", &self.server_mode)
            .finish_non_exhaustive()
    }
}

/// The CA certificates in the PEM file `path` that `key` names.
fn ca_roots(config: &Config, key: &str, path: &Path) -> Result<Arc<RootCertStore>, ConfigError> {
    let path = config.resolve(path);
    let err = |reason: String| ConfigError::new(&config.source, key, reason);
    let cas = CertificateDer::pem_file_iter(&path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(err(format!(
            "{}: no usable CA certificate in it",
            path.display()
        )));
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the certificates and keys `config` names.
    pub fn load(config: &Config) -> Result<Tls, ConfigError> {
        let err = |key: &str, reason: String| ConfigError::new(&config.source, key, reason);
        let acceptor = match config.tls.mode {
            ClientTlsMode::Disable => None,
            ClientTlsMode::Allow | ClientTlsMode::Require => {
                let cert_path = config.resolve(&config.tls.cert_file);
                let key_path = config.resolve(&config.tls.key_file);
                let certs = CertificateDer::pem_file_iter(&cert_path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| err("tls.cert_file", format!("{}: {e}", cert_path.display())))?;
                if certs.is_empty() {
                    return Err(err(
                        "tls.cert_file",
                        format!("{}: no PEM certificate in it", cert_path.display()),
                    ));
                }
                let key = PrivateKeyDer::from_pem_file(&key_path)
                    .map_err(|e| err("tls.key_file", format!("{}: {e}", key_path.display())))?;
                let builder = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| err("tls.mode", e.to_string()))?;
                let builder = if config.tls.ca_file.as_os_str().is_empty() {
                    builder.with_no_client_auth()
                } else {
                    // Asked for, checked when given, never required by the handshake:
                    // which logins need one is for authentication to say.
                    let roots = ca_roots(config, "tls.ca_file", &config.tls.ca_file)?;
                    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| err("tls.ca_file", e.to_string()))?;
                    builder.with_client_cert_verifier(verifier)
                };
                let server = builder.with_single_cert(certs, key).map_err(|e| {
                    err("tls.key_file", format!("does not fit the certificate: {e}"))
                })?;
                Some(TlsAcceptor::from(Arc::new(server)))
            }
        };
        let connector = match config.server_tls.mode {
            ServerTlsMode::Disable => None,
            mode => {
                let verifier: Arc<dyn ServerCertVerifier> = match mode {
                    ServerTlsMode::Prefer | ServerTlsMode::Require => Arc::new(Unverified {
                        algorithms: provider().signature_verification_algorithms,
                    }),
                    _ => {
                        let roots =
                            ca_roots(config, "server_tls.ca_file", &config.server_tls.ca_file)?;
                        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
                            .build()
                            .map_err(|e| err("server_tls.ca_file", e.to_string()))?;
                        Arc::new(Verified {
                            webpki,
                            check_name: mode == ServerTlsMode::VerifyFull,
                        })
                    }
                };
                let client = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| err("server_tls.mode", e.to_string()))?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth();
                Some(Arc::new(client))
            }
        };
        Ok(Tls {
            client_mode: config.tls.mode,
            acceptor,
            server_mode: config.server_tls.mode,
            connector,
        })
    }

    /// Answers a client's SSLRequest: with TLS (`S`, then the handshake) when it is
    /// configured, else `N` and the plain socket back.
    pub async fn accept(&self, mut tcp: TcpStream) -> io::Result<Stream> {
        match &self.acceptor {
            Some(acceptor) => {
                tcp.write_all(b"S").await?;
                let tls = acceptor.accept(tcp).await?;
                Ok(Stream::Tls(Box::new(tls.into())))
            }
            None => {
                tcp.write_all(b"N").await?;
                Ok(Stream::Plain(tcp))
            }
        }
    }

    /// Opens TLS on a fresh connection to a backend as `server_tls.mode` says.
    pub async fn connect(&self, mut tcp: TcpStream, host: &str) -> Result<Stream, ServerError> {
        let Some(config) = &self.connector else {
            return Ok(Stream::Plain(tcp));
        };
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| ServerError::Tls(format!("`{host}` is not a host name: {e}")))?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
                Ok(Stream::Tls(Box::new(tls.into())))
            }
            b'N' if self.server_mode == ServerTlsMode::Prefer => Ok(Stream::Plain(tcp)),
            b'N' => Err(ServerError::Tls(format!(
                "the server does not accept TLS connections, and server_tls.mode is {}",
                mode_name(self.server_mode)
            ))),
            other => Err(ServerError::Protocol(format!(
                "unexpected answer '{}' to SSLRequest",
                char::from(other)
            ))),
        }
    }

    /// How tokio-postgres reaches a backend the same way (monitor, failover):
    /// `None` for plain TCP.
    pub fn postgres(
        &self,
    ) -> Option<(
        tokio_postgres::config::SslMode,
        tokio_postgres_rustls::MakeRustlsConnect,
    )> {
        use tokio_postgres::config::SslMode;
        let config = self.connector.as_ref()?;
        let mode = match self.server_mode {
            ServerTlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        };
        Some((
            mode,
            tokio_postgres_rustls::MakeRustlsConnect::new((**config).clone()),
        ))
    }
}

/// The configured name of a server TLS mode.
fn mode_name(mode: ServerTlsMode) -> &'static str {
    match mode {
        ServerTlsMode::Disable => "disable",
        ServerTlsMode::Prefer => "prefer",
        ServerTlsMode::Require => "require",
        ServerTlsMode::VerifyCa => "verify-ca",
        ServerTlsMode::VerifyFull => "verify-full",
    }
}

/// `prefer` and `require`: encryption without authentication of the server, as libpq does.
#[derive(Debug)]
struct Unverified {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unverified {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca` and `verify-full`: the chain must lead to `ca_file`; the host name
/// must match only for verify-full.
#[derive(Debug)]
struct Verified {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
