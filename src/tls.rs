//! libpq's `sslmode` semantics on top of the compiled-in TLS library (OpenSSL through
//! native-tls by default, rustls with the `rustls` feature), the certificate files,
//! and refusals that say why.
//!
//! | sslmode     | TLS                     | chain checked | host name checked   |
//! |-------------|-------------------------|---------------|---------------------|
//! | disable     | never                   | –             | –                   |
//! | prefer      | if the server offers it | no            | no                  |
//! | require     | always                  | no            | no                  |
//! | verify-ca   | always                  | yes           | no                  |
//! | verify-full | always                  | yes           | yes (DNS or IP SAN) |
//!
//! tokio-postgres itself only knows disable, prefer and require (whether to ask for
//! TLS); the checks are the connector's. Unlike libpq, `require` does not turn into
//! `verify-ca` when a root certificate file is configured: the spec defines it as
//! "encrypted, no verification", and an operator who wants the chain checked says
//! `verify-ca`.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::config::{ConfigError, DbConfig, SslMode};
use crate::config::{ENV_CLIENT_SSLCERT, ENV_CLIENT_SSLKEY, ENV_CLIENT_SSLROOTCERT};
use crate::error::{Error, Kind, Result};

#[cfg(feature = "rustls")]
#[path = "tls/rustls.rs"]
mod backend;

#[cfg(all(feature = "native-tls", not(feature = "rustls")))]
#[path = "tls/openssl.rs"]
mod backend;

#[cfg(not(any(feature = "native-tls", feature = "rustls")))]
compile_error!("enable one TLS backend: the `native-tls` (default) or the `rustls` feature");

/// Which TLS library this binary was built with (for `--version` and logs).
pub const BACKEND: &str = backend::NAME;

/// Every problem with the certificate and key files `db` names, each naming its
/// variable: the configuration's one validation pass calls this, so a malformed
/// file is a configuration error (exit 78) from every command, reported together
/// with every other bad variable, not a connection failure at the first cycle. The
/// roots and the client identity are checked apart so that both can be reported.
pub fn check_files(db: &DbConfig) -> Vec<ConfigError> {
    let roots_only = DbConfig {
        sslcert: None,
        sslkey: None,
        ..db.clone()
    };
    let identity_only = DbConfig {
        sslrootcert: None,
        ..db.clone()
    };
    let mut problems = Vec::new();
    for (set, part) in [
        (true, roots_only),
        (db.sslcert.is_some() && db.sslkey.is_some(), identity_only),
    ] {
        if !set {
            continue;
        }
        if let Err(e) = connector(&part) {
            let (var, problem) = e
                .config_problem()
                .map(|(v, p)| (v, p.to_string()))
                .unwrap_or((ENV_CLIENT_SSLROOTCERT, e.to_string()));
            problems.push(ConfigError { var, problem });
        }
    }
    problems
}

/// Builds the connector for one database from its sslmode and files. The files are
/// read on every call, so a renewed certificate is picked up at the next connection.
pub fn connector(db: &DbConfig) -> Result<MakeConnector> {
    let roots = match &db.sslrootcert {
        Some(p) => Some(PemFile::read(p, ENV_CLIENT_SSLROOTCERT)?),
        None => None,
    };
    let identity = match (&db.sslcert, &db.sslkey) {
        (Some(c), Some(k)) => {
            let key = PemFile::read(k, ENV_CLIENT_SSLKEY)?;
            if key.is_encrypted_key() {
                return Err(key.invalid(
                    "is an encrypted private key; meter-sync needs it unencrypted (openssl pkey -in KEY -out KEY.plain)",
                ));
            }
            Some((PemFile::read(c, ENV_CLIENT_SSLCERT)?, key))
        }
        _ => None,
    };
    let files = Files { roots, identity };
    let inner = backend::Connector::build(db.sslmode, &files).map_err(|e| {
        // A configuration error already names its variable.
        if e.kind() == Kind::Config {
            e
        } else {
            e.with_side(db.side)
        }
    })?;
    Ok(MakeConnector {
        inner: Arc::new(inner),
        trusted: match &db.sslrootcert {
            Some(p) => format!("{ENV_CLIENT_SSLROOTCERT} ({})", p.display()),
            None => "the system's trusted roots".into(),
        }
        .into(),
    })
}

/// Whether a failed connection attempt was this module refusing the server's
/// certificate (as opposed to a handshake that failed for a reason that may pass).
pub fn is_refusal(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<Refusal>())
        .is_some_and(|r| r.cause != Cause::Other)
}

/// What tokio-postgres should do about TLS for this sslmode.
pub fn pg_ssl_mode(mode: SslMode) -> tokio_postgres::config::SslMode {
    use tokio_postgres::config::SslMode as M;
    match mode {
        SslMode::Disable => M::Disable,
        SslMode::Prefer => M::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => M::Require,
    }
}

/// A file named by a variable, read whole.
struct PemFile {
    var: &'static str,
    path: PathBuf,
    bytes: Vec<u8>,
}

impl PemFile {
    fn read(path: &Path, var: &'static str) -> Result<PemFile> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::config(var, format!("cannot read {}: {e}", path.display())))?;
        Ok(PemFile {
            var,
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// A configuration error about this file. Never quotes the file's content (it
    /// may be a private key), only its variable and path.
    fn invalid(&self, what: impl fmt::Display) -> Error {
        Error::config(self.var, format!("{} {what}", self.path.display()))
    }

    /// Encrypted keys would need a passphrase, which nothing supplies (and OpenSSL
    /// might try to prompt for one on a terminal).
    fn is_encrypted_key(&self) -> bool {
        let text = String::from_utf8_lossy(&self.bytes);
        text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED")
    }
}

/// The parsed-later contents of the certificate files.
struct Files {
    roots: Option<PemFile>,
    /// Client certificate and its key (known not to be encrypted).
    identity: Option<(PemFile, PemFile)>,
}

/// Why a TLS handshake with the server failed, as far as the gateway can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The server's certificate does not chain to a trusted CA (includes self-signed).
    UnknownCa,
    /// The certificate is valid but for another host name or address.
    HostMismatch,
    Expired,
    NotYetValid,
    /// rustls only: the server presented a CA certificate (as `openssl req -x509`
    /// makes by default for a self-signed one), which webpki never accepts as a
    /// server's, not even when it is itself the trusted root.
    #[cfg_attr(not(feature = "rustls"), allow(dead_code))]
    CaAsServerCertificate,
    /// Anything else the TLS library reported (protocol, alert, I/O).
    Other,
}

/// A failed TLS handshake: one line naming the cause, then the TLS library's own
/// words. Holds no key material (the libraries' errors never carry any).
#[derive(Debug)]
pub struct Refusal {
    pub cause: Cause,
    host: String,
    trusted: Arc<str>,
    detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = &self.host;
        match self.cause {
            Cause::UnknownCa => write!(
                f,
                "server certificate refused: not signed by a CA in {}",
                self.trusted
            )?,
            Cause::HostMismatch => write!(
                f,
                "server certificate refused: it is not issued for {} {host}",
                if host.parse::<std::net::IpAddr>().is_ok() {
                    "the address"
                } else {
                    "the host name"
                }
            )?,
            Cause::Expired => f.write_str("server certificate refused: it has expired")?,
            Cause::NotYetValid => f.write_str(
                "server certificate refused: it is not valid yet (is the gateway's clock right?)",
            )?,
            Cause::CaAsServerCertificate => f.write_str(
                "server certificate refused: it is a CA certificate (basicConstraints CA:TRUE), \
                 which this rustls build accepts only with sslmode=require; give the server a \
                 certificate issued by a CA",
            )?,
            Cause::Other => return write!(f, "TLS handshake with {host} failed: {}", self.detail),
        }
        write!(f, " ({})", self.detail)
    }
}

impl std::error::Error for Refusal {}

/// tokio-postgres' `MakeTlsConnect` for one database.
#[derive(Clone)]
pub struct MakeConnector {
    inner: Arc<backend::Connector>,
    /// Where trust comes from, for messages.
    trusted: Arc<str>,
}

impl MakeTlsConnect<Socket> for MakeConnector {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = Refusal;

    fn make_tls_connect(&mut self, host: &str) -> std::result::Result<Connect, Refusal> {
        Ok(Connect {
            inner: self.inner.clone(),
            host: host.to_string(),
            trusted: self.trusted.clone(),
        })
    }
}

/// One handshake with the server at `host`.
pub struct Connect {
    inner: Arc<backend::Connector>,
    host: String,
    trusted: Arc<str>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = Refusal;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<TlsStream, Refusal>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            match self.inner.handshake(&self.host, socket).await {
                Ok(s) => Ok(TlsStream(s)),
                Err((cause, detail)) => Err(Refusal {
                    cause,
                    host: self.host,
                    trusted: self.trusted,
                    detail,
                }),
            }
        })
    }
}

/// An established TLS connection to the server.
pub struct TlsStream(backend::Stream);

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        backend::channel_binding(&self.0)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_alert(e))),
            other => other,
        }
    }
}

/// With TLS 1.3 the server judges the gateway's certificate after the handshake
/// has completed on our side, so its refusal arrives as an alert on the first read.
/// Says so instead of the TLS library's "alert number 48".
fn explain_alert(e: io::Error) -> io::Error {
    let what = match backend::received_alert(&e) {
        Some(42) => "bad certificate",
        Some(43) => "unsupported certificate",
        Some(44) => "certificate revoked",
        Some(45) => "certificate expired",
        Some(46) => "certificate unknown",
        Some(48) => "unknown CA",
        Some(116) => {
            return io::Error::new(
                e.kind(),
                format!(
                    "the server requires a client certificate: set {ENV_CLIENT_SSLCERT} and {ENV_CLIENT_SSLKEY}"
                ),
            )
        }
        _ => return e,
    };
    io::Error::new(
        e.kind(),
        format!("the server refused the gateway's client certificate in {ENV_CLIENT_SSLCERT} (TLS alert: {what})"),
    )
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(cause: Cause, host: &str) -> String {
        Refusal {
            cause,
            host: host.into(),
            trusted: "POSTGRES_CLIENT_SSLROOTCERT (/etc/ca.pem)".into(),
            detail: "library words".into(),
        }
        .to_string()
    }

    #[test]
    fn refusals_name_the_cause_in_one_line() {
        for (cause, host, words) in [
            (
                Cause::UnknownCa,
                "c.example",
                "not signed by a CA in POSTGRES_CLIENT_SSLROOTCERT (/etc/ca.pem)",
            ),
            (
                Cause::HostMismatch,
                "c.example",
                "not issued for the host name c.example",
            ),
            (
                Cause::HostMismatch,
                "10.0.0.5",
                "not issued for the address 10.0.0.5",
            ),
            (
                Cause::HostMismatch,
                "fd00::5",
                "not issued for the address fd00::5",
            ),
            (Cause::Expired, "c.example", "it has expired"),
            (Cause::NotYetValid, "c.example", "not valid yet"),
            (
                Cause::CaAsServerCertificate,
                "c.example",
                "a CA certificate",
            ),
            (
                Cause::Other,
                "c.example",
                "TLS handshake with c.example failed",
            ),
        ] {
            let text = refusal(cause, host);
            assert!(text.contains(words), "{cause:?}: {text}");
            assert!(text.contains("library words"), "{cause:?}: {text}");
            assert!(!text.contains('\n'), "{cause:?}: {text}");
        }
    }

    #[test]
    fn only_disable_and_prefer_let_tokio_postgres_go_without_tls() {
        use tokio_postgres::config::SslMode as M;
        assert_eq!(pg_ssl_mode(SslMode::Disable), M::Disable);
        assert_eq!(pg_ssl_mode(SslMode::Prefer), M::Prefer);
        for m in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            assert_eq!(pg_ssl_mode(m), M::Require, "{m:?}");
        }
    }
}
