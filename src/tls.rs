//! libpq's `sslmode` semantics on top of native-tls (OpenSSL, compiled in).
//!
//! | sslmode     | TLS                     | chain checked | host name checked |
//! |-------------|-------------------------|---------------|-------------------|
//! | disable     | never                   | –             | –                 |
//! | prefer      | if the server offers it | no            | no                |
//! | require     | always                  | no            | no                |
//! | verify-ca   | always                  | yes           | no                |
//! | verify-full | always                  | yes           | yes (DNS or IP SAN) |

use postgres_native_tls::MakeTlsConnector;

use crate::config::{DbConfig, SslMode};
use crate::error::{Error, Kind, Result};

/// Builds the connector for one database. Files named by the configuration were
/// checked for readability at start; here they are parsed, and a malformed one is a
/// configuration error naming the variable.
pub fn connector(db: &DbConfig) -> Result<MakeTlsConnector> {
    let mut b = native_tls::TlsConnector::builder();
    b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    match db.sslmode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            b.danger_accept_invalid_certs(true);
            b.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyCa => {
            b.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    if let Some(path) = &db.sslrootcert {
        let pem = read(path, crate::config::ENV_CLIENT_SSLROOTCERT)?;
        let certs = native_tls::Certificate::stack_from_pem(&pem).map_err(|e| {
            Error::new(
                Kind::Config,
                format!(
                    "{}: {} is not a PEM certificate bundle: {e}",
                    crate::config::ENV_CLIENT_SSLROOTCERT,
                    path.display()
                ),
            )
        })?;
        if certs.is_empty() {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "{}: {} holds no PEM certificate",
                    crate::config::ENV_CLIENT_SSLROOTCERT,
                    path.display()
                ),
            ));
        }
        // libpq's sslrootcert replaces the trust store rather than adding to it.
        b.disable_built_in_roots(true);
        for c in certs {
            b.add_root_certificate(c);
        }
    }
    if let (Some(cert), Some(key)) = (&db.sslcert, &db.sslkey) {
        let cert_pem = read(cert, crate::config::ENV_CLIENT_SSLCERT)?;
        let key_pem = read(key, crate::config::ENV_CLIENT_SSLKEY)?;
        let id = native_tls::Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|_| {
            // The OpenSSL message may quote key material: say only which files.
            Error::new(
                Kind::Config,
                format!(
                    "{}/{}: {} and {} are not a PEM certificate and its PKCS#8 private key",
                    crate::config::ENV_CLIENT_SSLCERT,
                    crate::config::ENV_CLIENT_SSLKEY,
                    cert.display(),
                    key.display()
                ),
            )
        })?;
        b.identity(id);
    }
    let c = b
        .build()
        .map_err(|e| Error::new(Kind::Tls, format!("{}: set up TLS: {e}", db.side)))?;
    Ok(MakeTlsConnector::new(c))
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

fn read(path: &std::path::Path, var: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::new(
            Kind::Config,
            format!("{var}: cannot read {}: {e}", path.display()),
        )
    })
}
