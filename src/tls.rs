//! libpq's `sslmode` semantics on top of the compiled-in TLS library (OpenSSL through
//! native-tls by default, rustls with the `rustls` feature), the certificate files,
//! refusals that say why, and the byte counts of the TLS connections.
//!
//! | sslmode     | TLS                     | chain checked            | host name checked   |
//! |-------------|-------------------------|--------------------------|---------------------|
//! | disable     | never                   | –                        | –                   |
//! | prefer      | if the server offers it | if a root file is set    | no                  |
//! | require     | always                  | if a root file is set    | no                  |
//! | verify-ca   | always                  | yes                      | no                  |
//! | verify-full | always                  | yes                      | yes (DNS or IP SAN) |
//!
//! tokio-postgres itself only knows disable, prefer and require (whether to ask for
//! TLS); the checks are the connector's. As in libpq ("if a root CA file exists,
//! sslmode=require behaves like verify-ca"), `POSTGRES_CLIENT_SSLROOTCERT` makes
//! `require` and `prefer` check the chain: an operator who names a CA means it.
//! tests/tls.rs compares every cell of five server set-ups and the five modes with
//! `psql`.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::config::ChannelBinding as ChannelBindingMode;
use crate::config::{ConfigError, DbConfig, Side, SslMode};
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

#[path = "tls/der.rs"]
mod der;

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
    let verify = verification(db.sslmode, roots.is_some());
    let files = Files { roots, identity };
    let inner = backend::Connector::build(verify, &files).map_err(|e| {
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
        // Who upgrades a gateway whose `require` connected to a server that its
        // root file does not vouch for is told why it is refused now.
        implied: matches!(db.sslmode, SslMode::Prefer | SslMode::Require)
            && verify != Verify::Nothing,
        presents_certificate: files.identity.is_some(),
        traffic: traffic_of(db.side),
    })
}

/// What the connector checks of the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Encryption against a passive eavesdropper only: any certificate is taken.
    Nothing,
    /// It chains to a trusted CA and is valid now; any host name.
    Chain,
    /// As `Chain`, and it is issued for the host connected to.
    ChainAndName,
}

/// libpq's rule: `verify-ca` and `verify-full` always verify; `prefer` and `require`
/// verify the chain exactly when a root certificate file is configured
/// (fe-secure-openssl.c sets SSL_VERIFY_PEER whenever it loaded one). `disable`
/// never gets to TLS.
pub fn verification(mode: SslMode, has_root_file: bool) -> Verify {
    match mode {
        SslMode::VerifyFull => Verify::ChainAndName,
        SslMode::VerifyCa => Verify::Chain,
        SslMode::Disable | SslMode::Prefer | SslMode::Require if has_root_file => Verify::Chain,
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Verify::Nothing,
    }
}

/// When the client certificate (`POSTGRES_CLIENT_SSLCERT`) expires: its notAfter,
/// read from the first certificate of the file. None without a client certificate.
pub fn client_cert_expiry(db: &DbConfig) -> Result<Option<SystemTime>> {
    let Some(path) = &db.sslcert else {
        return Ok(None);
    };
    let pem = PemFile::read(path, ENV_CLIENT_SSLCERT)?;
    let der = backend::first_cert_der(&pem.bytes)
        .ok_or_else(|| pem.invalid("is not a PEM certificate"))?;
    der::not_after(&der)
        .map(Some)
        .ok_or_else(|| pem.invalid("has no readable expiry date (notAfter)"))
}

/// Bytes through the TLS connections to one database since the process started,
/// counted on the socket (TLS records and handshakes; not the 8-byte SSLRequest
/// before TLS starts, nor connections that stayed plaintext).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Written to the server.
    pub up: u64,
    /// Read from the server.
    pub down: u64,
}

impl Traffic {
    /// What flowed between `earlier` and `self`.
    pub fn since(self, earlier: Traffic) -> Traffic {
        Traffic {
            up: self.up.saturating_sub(earlier.up),
            down: self.down.saturating_sub(earlier.down),
        }
    }
}

struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

static LOCAL_TRAFFIC: Counters = Counters {
    up: AtomicU64::new(0),
    down: AtomicU64::new(0),
};
static CENTRAL_TRAFFIC: Counters = Counters {
    up: AtomicU64::new(0),
    down: AtomicU64::new(0),
};

fn traffic_of(side: Side) -> &'static Counters {
    match side {
        Side::Local => &LOCAL_TRAFFIC,
        Side::Central => &CENTRAL_TRAFFIC,
    }
}

/// The byte counts of `side`'s TLS connections so far (see [`Traffic`]). One
/// process serves one gateway, so process-wide counters are the gateway's.
pub fn traffic(side: Side) -> Traffic {
    let c = traffic_of(side);
    Traffic {
        up: c.up.load(Ordering::Relaxed),
        down: c.down.load(Ordering::Relaxed),
    }
}

/// A socket that adds what passes through it to its database's counters: two
/// relaxed atomic adds per read or write, nothing else.
pub struct Counted<S> {
    inner: S,
    counters: &'static Counters,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.counters.down.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens the connection `pc` describes. Under `prefer`, a TLS handshake that
/// fails (a certificate refused, say) is followed by one attempt without TLS, as
/// libpq does: `prefer` never promised more than "TLS if it works", and a server
/// that takes plaintext logins is then reached just as psql reaches it.
pub async fn connect(
    db: &DbConfig,
    mut pc: tokio_postgres::Config,
    tls: MakeConnector,
) -> std::result::Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<Socket, TlsStream>,
    ),
    tokio_postgres::Error,
> {
    match pc.connect(tls.clone()).await {
        Err(e) if db.sslmode == SslMode::Prefer && is_tls_failure(&e) => {
            log::warn!(
                "{}: TLS with {} failed ({e}); sslmode=prefer tries once more without TLS, as libpq does",
                db.side,
                db.describe()
            );
            pc.ssl_mode(tokio_postgres::config::SslMode::Disable);
            pc.connect(tls).await
        }
        other => other,
    }
}

/// The TLS handshake itself failed (as opposed to the server refusing TLS or the
/// login).
fn is_tls_failure(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<Refusal>().is_some())
}

/// Whether a failed connection attempt was this module refusing the server's
/// certificate (as opposed to a handshake that failed for a reason that may pass).
pub fn is_refusal(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<Refusal>())
        .is_some_and(|r| r.cause != Cause::Other)
}

/// tokio-postgres' own channel_binding, which has libpq's meaning; the backends
/// supply the `tls-server-end-point` hash it needs ([`TlsStream`]'s
/// `channel_binding`).
pub fn pg_channel_binding(cb: ChannelBindingMode) -> tokio_postgres::config::ChannelBinding {
    use tokio_postgres::config::ChannelBinding as B;
    match cb {
        ChannelBindingMode::Disable => B::Disable,
        ChannelBindingMode::Prefer => B::Prefer,
        ChannelBindingMode::Require => B::Require,
    }
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
    /// The chain was checked because a root file is set under prefer/require.
    implied: bool,
    /// The gateway's clock at the handshake: a certificate expired or not valid
    /// yet is most often a gateway clock that is wrong (no battery-backed clock, NTP
    /// not through yet), and an operator reading the error on central
    /// (`gateway_status.last_error`) does not see that clock otherwise.
    at: SystemTime,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = &self.host;
        match self.cause {
            Cause::UnknownCa => {
                write!(
                    f,
                    "server certificate refused: not signed by a CA in {}",
                    self.trusted
                )?;
                if self.implied {
                    f.write_str(
                        " (with a root file set, sslmode=prefer and require verify the chain, as libpq does)",
                    )?;
                }
            }
            Cause::HostMismatch => write!(
                f,
                "server certificate refused: it is not issued for {} {host}",
                if host.parse::<std::net::IpAddr>().is_ok() {
                    "the address"
                } else {
                    "the host name"
                }
            )?,
            Cause::Expired => {
                write!(
                    f,
                    "server certificate refused: it has expired by this gateway's clock ({})",
                    crate::utc::Utc::of(self.at).rfc3339()
                )?;
                if self.implied {
                    f.write_str(
                        " (with a root file set, sslmode=prefer and require verify the chain, as libpq does)",
                    )?;
                }
            }
            Cause::NotYetValid => write!(
                f,
                "server certificate refused: it is not valid yet by this gateway's clock ({}; \
                 is the clock right?)",
                crate::utc::Utc::of(self.at).rfc3339()
            )?,
            Cause::CaAsServerCertificate => f.write_str(
                "server certificate refused: it is a CA certificate (basicConstraints CA:TRUE), \
                 which this rustls build accepts only unverified (sslmode=require or prefer without \
                 POSTGRES_CLIENT_SSLROOTCERT); give the server a \
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
    implied: bool,
    /// Whether the gateway shows a certificate of its own, for messages.
    presents_certificate: bool,
    traffic: &'static Counters,
}

impl MakeTlsConnect<Socket> for MakeConnector {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = Refusal;

    fn make_tls_connect(&mut self, host: &str) -> std::result::Result<Connect, Refusal> {
        Ok(Connect {
            with: self.clone(),
            host: host.to_string(),
        })
    }
}

/// One handshake with the server at `host`.
pub struct Connect {
    with: MakeConnector,
    host: String,
}

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = Refusal;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<TlsStream, Refusal>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        let Connect { with, host } = self;
        let socket = Counted {
            inner: socket,
            counters: with.traffic,
        };
        Box::pin(async move {
            match with.inner.handshake(&host, socket).await {
                Ok(s) => Ok(TlsStream {
                    inner: s,
                    presents_certificate: with.presents_certificate,
                    heard: false,
                }),
                Err((cause, detail)) => Err(Refusal {
                    cause,
                    host,
                    trusted: with.trusted,
                    detail,
                    implied: with.implied,
                    at: SystemTime::now(),
                }),
            }
        })
    }
}

/// An established TLS connection to the server.
pub struct TlsStream {
    inner: backend::Stream,
    presents_certificate: bool,
    /// Whether the server has sent anything since the handshake.
    heard: bool,
}

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        backend::channel_binding(&self.inner)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.explain(e))),
            Poll::Ready(Ok(())) => {
                self.heard |= buf.filled().len() > before;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl TlsStream {
    /// With TLS 1.3 the server judges the gateway's certificate after the handshake
    /// has completed on our side, so its refusal arrives as an alert on the first
    /// read ([`explain_alert`]). When our first write meets the connection the
    /// server has already closed, that alert is never read and only "unexpected
    /// EOF" or "broken pipe" is left (about 1 run in 10 of tests/tls.rs on a loaded
    /// machine): a connection that breaks before the server has said a word after
    /// the handshake is explained by what the server most likely judged.
    fn explain(&self, e: io::Error) -> io::Error {
        if backend::received_alert(&e).is_some() || self.heard {
            return explain_alert(e);
        }
        let why = if self.presents_certificate {
            format!(
                "it most likely refused the gateway's client certificate in {ENV_CLIENT_SSLCERT}"
            )
        } else {
            format!(
                "it most likely requires a client certificate: set {ENV_CLIENT_SSLCERT} and {ENV_CLIENT_SSLKEY}"
            )
        };
        io::Error::new(
            e.kind(),
            format!(
                "the server closed the connection right after the TLS handshake, without a word: {why} ({e})"
            ),
        )
    }
}

/// Says what the server's alert means instead of the TLS library's "alert number 48".
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
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.explain(e))),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.explain(e))),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
            implied: false,
            at: SystemTime::UNIX_EPOCH,
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
            (
                Cause::Expired,
                "c.example",
                "it has expired by this gateway's clock (1970-01-01T00:00:00.000Z)",
            ),
            (
                Cause::NotYetValid,
                "c.example",
                "not valid yet by this gateway's clock (1970-01-01T00:00:00.000Z; is the clock right?)",
            ),
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
    fn a_root_file_makes_prefer_and_require_verify_the_chain_as_in_libpq() {
        use SslMode::*;
        use Verify::*;
        for (mode, without, with) in [
            (Prefer, Nothing, Chain),
            (Require, Nothing, Chain),
            (VerifyCa, Chain, Chain),
            (VerifyFull, ChainAndName, ChainAndName),
        ] {
            assert_eq!(verification(mode, false), without, "{mode:?}");
            assert_eq!(verification(mode, true), with, "{mode:?} with a root file");
        }
    }

    #[test]
    fn counted_sockets_add_to_their_side_only() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted {
            inner: a,
            counters: traffic_of(Side::Local),
        };
        let before = (traffic(Side::Local), traffic(Side::Central));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                counted.write_all(b"hello").await.unwrap();
                let mut five = [0u8; 5];
                b.read_exact(&mut five).await.unwrap();
                b.write_all(b"0123456789").await.unwrap();
                let mut ten = [0u8; 10];
                counted.read_exact(&mut ten).await.unwrap();
            });
        let local = traffic(Side::Local).since(before.0);
        assert!(local.up >= 5 && local.down >= 10, "{local:?}");
        assert_eq!(traffic(Side::Central), before.1);
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
