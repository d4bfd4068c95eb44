//! The default TLS backend: OpenSSL (vendored, compiled in) through native-tls,
//! with tokio-postgres' own glue for it, postgres-native-tls (which also supplies
//! the `tls-server-end-point` channel binding). What this file adds is libpq's
//! verification per sslmode, the certificate files, and the refusal causes read
//! from the native-tls error that postgres-native-tls passes through.

use openssl::pkey::PKey;
use openssl::x509::X509;
use tokio_postgres::tls::{ChannelBinding, TlsConnect};
use tokio_postgres::Socket;

use super::{Cause, Counted, Files, Verify};
use crate::error::{Error, Kind, Result};

pub const NAME: &str = "OpenSSL via native-tls";

pub type Stream = postgres_native_tls::TlsStream<Counted<Socket>>;

pub struct Connector(native_tls::TlsConnector);

impl Connector {
    pub fn build(verify: Verify, files: &Files) -> Result<Connector> {
        let mut b = native_tls::TlsConnector::builder();
        b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
        match verify {
            Verify::Nothing => {
                b.danger_accept_invalid_certs(true);
                b.danger_accept_invalid_hostnames(true);
            }
            Verify::Chain => {
                b.danger_accept_invalid_hostnames(true);
            }
            // OpenSSL checks the DNS names, or the IP addresses when the host is
            // one, of the certificate's subjectAltName (the CN only without DNS SANs,
            // as libpq does).
            Verify::ChainAndName => {}
        }
        if let Some(roots) = &files.roots {
            let certs = X509::stack_from_pem(&roots.bytes)
                .map_err(|_| roots.invalid("is not a PEM certificate bundle"))?;
            if certs.is_empty() {
                return Err(roots.invalid("holds no PEM certificate"));
            }
            // libpq's sslrootcert replaces the trust store rather than adding to it.
            b.disable_built_in_roots(true);
            for c in certs {
                let der = c
                    .to_der()
                    .map_err(|_| roots.invalid("holds an unusable certificate"))?;
                let c = native_tls::Certificate::from_der(&der)
                    .map_err(|_| roots.invalid("holds an unusable certificate"))?;
                b.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &files.identity {
            let chain = X509::stack_from_pem(&cert.bytes)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| cert.invalid("is not a PEM certificate"))?;
            // An empty passphrase: an encrypted key fails instead of prompting.
            // Accepts PKCS#8 and the traditional "BEGIN RSA/EC PRIVATE KEY" forms.
            let pkey = PKey::private_key_from_pem_passphrase(&key.bytes, b"").map_err(|_| {
                key.invalid("is not a PEM private key (PKCS#8, or traditional RSA or EC)")
            })?;
            let matches = chain[0]
                .public_key()
                .map(|public| public.public_eq(&pkey))
                .unwrap_or(false);
            if !matches {
                return Err(key.invalid(format_args!(
                    "is not the private key of the certificate in {} ({})",
                    cert.var,
                    cert.path.display()
                )));
            }
            // native-tls takes PKCS#8 only: re-encode whatever form was given.
            let pkcs8 = pkey
                .private_key_to_pem_pkcs8()
                .map_err(|_| key.invalid("cannot be converted to PKCS#8"))?;
            let id = native_tls::Identity::from_pkcs8(&cert.bytes, &pkcs8)
                .map_err(|_| cert.invalid("and its key are not a usable client identity"))?;
            b.identity(id);
        }
        let c = b
            .build()
            .map_err(|e| Error::new(Kind::Tls, format!("set up TLS: {e}")))?;
        Ok(Connector(c))
    }

    pub async fn handshake(
        &self,
        host: &str,
        socket: Counted<Socket>,
    ) -> std::result::Result<Stream, (Cause, String)> {
        postgres_native_tls::TlsConnector::new(self.0.clone(), host)
            .connect(socket)
            .await
            .map_err(|e| classify(&e))
    }
}

/// The first certificate of a PEM file, as DER.
pub fn first_cert_der(pem: &[u8]) -> Option<Vec<u8>> {
    X509::stack_from_pem(pem).ok()?.first()?.to_der().ok()
}

/// postgres-native-tls asks OpenSSL for the `tls-server-end-point` hash (the
/// hash of the certificate's signature, SHA-256 for MD5 and SHA-1, as RFC 5929
/// says), which lets tokio-postgres authenticate with SCRAM-SHA-256-PLUS.
pub fn channel_binding(s: &Stream) -> ChannelBinding {
    tokio_postgres::tls::TlsStream::channel_binding(s)
}

/// native-tls keeps OpenSSL's certificate verification result private and only
/// shows it in its message, as "... (<X509_verify_cert_error_string>)". The strings
/// are those of the vendored OpenSSL 3 (both spellings of "self-signed" cover a
/// system OpenSSL 1.1); tests/tls.rs checks each cause against a real server, so a
/// new wording shows up there as "TLS handshake failed" instead of a named cause.
fn classify(e: &native_tls::Error) -> (Cause, String) {
    let text = e.to_string();
    let table = [
        ("certificate is not yet valid", Cause::NotYetValid),
        // OpenSSL 3.6, the vendored one (a gateway whose clock is behind).
        (
            "certificate is not yet valid or the system clock is incorrect",
            Cause::NotYetValid,
        ),
        ("certificate has expired", Cause::Expired),
        ("self-signed certificate", Cause::UnknownCa),
        ("self signed certificate", Cause::UnknownCa),
        (
            "self-signed certificate in certificate chain",
            Cause::UnknownCa,
        ),
        (
            "self signed certificate in certificate chain",
            Cause::UnknownCa,
        ),
        ("unable to get local issuer certificate", Cause::UnknownCa),
        ("unable to get issuer certificate", Cause::UnknownCa),
        ("unable to verify the first certificate", Cause::UnknownCa),
        ("hostname mismatch", Cause::HostMismatch),
        ("IP address mismatch", Cause::HostMismatch),
    ];
    for (reason, cause) in table {
        if text.ends_with(&format!("({reason})")) {
            return (cause, reason.to_string());
        }
    }
    (Cause::Other, text)
}

/// The TLS alert the server sent, if `e` is one: OpenSSL reports a received alert
/// as an SSL-library error (ERR_LIB_SSL = 20) with reason 1000 + its number
/// (SSL_AD_REASON_OFFSET).
pub fn received_alert(e: &std::io::Error) -> Option<u8> {
    let ssl = e.get_ref()?.downcast_ref::<openssl::ssl::Error>()?;
    ssl.ssl_error()?
        .errors()
        .iter()
        .filter(|err| err.library_code() == 20)
        .find_map(|err| u8::try_from(err.reason_code() - 1000).ok())
}
