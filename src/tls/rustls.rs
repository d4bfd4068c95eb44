//! The `rustls` feature's TLS backend: rustls with the ring provider, no C TLS
//! library, for gateways with little flash.
//!
//! rustls only knows "verify everything"; verify-ca and require get their own
//! verifiers below, which still check the server's handshake signature (it proves
//! the server holds the key of the certificate it showed).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::tls::ChannelBinding;
use tokio_postgres::Socket;

use super::{Cause, Counted, Files, Verify};
use crate::error::{Error, Kind, Result};

pub const NAME: &str = "rustls with ring";

pub type Stream = tokio_rustls::client::TlsStream<Counted<Socket>>;

pub struct Connector(tokio_rustls::TlsConnector);

impl Connector {
    pub fn build(verify: Verify, files: &Files) -> Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &files.roots {
            Some(f) => {
                let certs = CertificateDer::pem_slice_iter(&f.bytes)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| f.invalid("is not a PEM certificate bundle"))?;
                if certs.is_empty() {
                    return Err(f.invalid("holds no PEM certificate"));
                }
                let mut store = RootCertStore::empty();
                for c in certs {
                    store
                        .add(c)
                        .map_err(|_| f.invalid("holds an unusable CA certificate"))?;
                }
                Some(store)
            }
            None => None,
        };
        // The system roots are only needed (and only read) when verifying without
        // a configured bundle.
        let trust = |roots: Option<RootCertStore>| -> Result<Arc<RootCertStore>> {
            if let Some(r) = roots {
                return Ok(Arc::new(r));
            }
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(Error::config(
                    crate::config::ENV_CLIENT_SSLROOTCERT,
                    "not set, and no system CA certificates were found to verify the server with",
                ));
            }
            Ok(Arc::new(store))
        };
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::ChainAndName => {
                WebPkiServerVerifier::builder_with_provider(trust(roots)?, provider.clone())
                    .build()
                    .map_err(|e| Error::new(Kind::Tls, format!("set up TLS: {e}")))?
            }
            Verify::Chain => Arc::new(NameBlind {
                roots: Some(trust(roots)?),
                provider: provider.clone(),
            }),
            Verify::Nothing => Arc::new(NameBlind {
                roots: None,
                provider: provider.clone(),
            }),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::new(Kind::Tls, format!("set up TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &files.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(&cert.bytes)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| cert.invalid("is not a PEM certificate"))?;
                // PKCS#8, or the traditional "BEGIN RSA/EC PRIVATE KEY" forms.
                let pk = PrivateKeyDer::from_pem_slice(&key.bytes).map_err(|_| {
                    key.invalid("is not a PEM private key (PKCS#8, or traditional RSA or EC)")
                })?;
                builder.with_client_auth_cert(chain, pk).map_err(|_| {
                    key.invalid(format_args!(
                        "is not the private key of the certificate in {} ({})",
                        cert.var,
                        cert.path.display()
                    ))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Connector(Arc::new(config).into()))
    }

    pub async fn handshake(
        &self,
        host: &str,
        socket: Counted<Socket>,
    ) -> std::result::Result<Stream, (Cause, String)> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            (
                Cause::Other,
                format!("{host} is not a valid host name for TLS: {e}"),
            )
        })?;
        self.0.connect(name, socket).await.map_err(|e| classify(&e))
    }
}

/// The first certificate of a PEM file, as DER.
pub fn first_cert_der(pem: &[u8]) -> Option<Vec<u8>> {
    let first = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    Some(first.as_ref().to_vec())
}

/// `tls-server-end-point` (RFC 5929): the hash of the server's certificate with
/// the hash of its signature algorithm (SHA-256 for MD5 and SHA-1), which lets
/// tokio-postgres authenticate with SCRAM-SHA-256-PLUS. rustls does not compute
/// it; sha2 is already in the binary for SCRAM itself (postgres-protocol).
pub fn channel_binding(s: &Stream) -> ChannelBinding {
    use sha2::Digest;
    let Some(cert) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return ChannelBinding::none();
    };
    let der = cert.as_ref();
    let hash = match super::der::end_point_hash(der) {
        Some(super::der::EndPointHash::Sha224) => sha2::Sha224::digest(der).to_vec(),
        Some(super::der::EndPointHash::Sha256) => sha2::Sha256::digest(der).to_vec(),
        Some(super::der::EndPointHash::Sha384) => sha2::Sha384::digest(der).to_vec(),
        Some(super::der::EndPointHash::Sha512) => sha2::Sha512::digest(der).to_vec(),
        None => return ChannelBinding::none(),
    };
    ChannelBinding::tls_server_end_point(hash)
}

/// The TLS alert the server sent, if `e` is one.
pub fn received_alert(e: &std::io::Error) -> Option<u8> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(u8::from(*a)),
        _ => None,
    }
}

fn classify(e: &std::io::Error) -> (Cause, String) {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return (Cause::Other, e.to_string());
    };
    let cause = match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => Cause::UnknownCa,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Cause::HostMismatch
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Cause::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Cause::NotYetValid
            }
            CertificateError::Other(o)
                if o.0.downcast_ref::<webpki::Error>()
                    == Some(&webpki::Error::CaUsedAsEndEntity) =>
            {
                Cause::CaAsServerCertificate
            }
            _ => Cause::Other,
        },
        _ => Cause::Other,
    };
    (cause, tls.to_string())
}

type Cert<'a> = CertificateDer<'a>;
type Dss = DigitallySignedStruct;
type Signature = std::result::Result<HandshakeSignatureValid, rustls::Error>;

/// The verifiers that never look at the name. With `roots` (verify-ca) the chain
/// must lead to a trusted CA and be valid now; without (prefer, require) any
/// certificate is accepted: encryption without authentication. The handshake
/// signatures are checked either way.
#[derive(Debug)]
struct NameBlind {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl NameBlind {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for NameBlind {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms().all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, msg: &[u8], cert: &Cert<'_>, dss: &Dss) -> Signature {
        verify_tls12_signature(msg, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(&self, msg: &[u8], cert: &Cert<'_>, dss: &Dss) -> Signature {
        verify_tls13_signature(msg, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
