//! Connecting to either database (Unix socket or TCP, TLS per sslmode), and a
//! client wrapper that puts a timeout on every round trip and names the database
//! and the operation in every error.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::config::{Config, DbConfig, Side};
use crate::error::{Error, Kind, Result};
use crate::shutdown::Shutdown;

/// First backoff cap; it doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One open connection and the task that drives it.
pub struct Db {
    client: Client,
    side: Side,
    timeout: Duration,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Db {
    fn drop(&mut self) {
        // Dropping the client closes the socket gracefully; the driver ends by
        // itself then, but abort it in case the peer is silent.
        self.driver.abort();
    }
}

/// The tokio-postgres configuration for one database: timeouts, keepalive, and a
/// session in UTC with ISO dates so that timestamps travel as exact text.
fn pg_config(db: &DbConfig, cfg: &Config) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    // tokio-postgres pairs the n-th host with the n-th port, as libpq does.
    for e in &db.hosts {
        if e.host.starts_with('/') {
            c.host_path(&e.host);
        } else {
            c.host(&e.host);
        }
        c.port(e.port);
    }
    c.dbname(&db.dbname)
        .user(&db.user)
        .application_name("meter-sync")
        .connect_timeout(cfg.connect_timeout)
        .ssl_mode(crate::tls::pg_ssl_mode(db.sslmode));
    if !db.password.is_empty() {
        c.password(db.password.expose());
    }
    // A server that outlives us in an open transaction (we were killed, the link
    // died) releases its locks after this long instead of holding them forever.
    let idle_ms = (cfg.query_timeout.as_millis() * 2).max(10_000);
    c.options(format!(
        "-c TimeZone=UTC -c DateStyle=ISO -c idle_in_transaction_session_timeout={idle_ms}"
    ));
    if !db.is_unix_socket() {
        // Keepalive finds a dead peer while we wait on it without a query in
        // flight; the user timeout bounds unacknowledged writes on a blackholed link.
        let probe = (cfg.query_timeout / 3).max(Duration::from_secs(1));
        c.keepalives(true)
            .keepalives_idle(probe)
            .keepalives_interval(Duration::from_secs(1).max(probe / 3))
            .keepalives_retries(3)
            .tcp_user_timeout(cfg.query_timeout);
    }
    c
}

impl Db {
    /// One connection attempt, bounded by `DB_CONNECTION_TIMEOUT_MS` (TCP connect
    /// and the TLS and startup handshakes together).
    pub async fn connect(db: &DbConfig, cfg: &Config) -> Result<Db> {
        let tls = crate::tls::connector(db)?;
        let pc = pg_config(db, cfg);
        let what = format!("connect to {}", db.describe());
        let (client, connection) = match crate::notify::while_bounded(tokio::time::timeout(
            cfg.connect_timeout,
            pc.connect(tls),
        ))
        .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                // A certificate the gateway refused stays refused until someone
                // changes it: not transient, unlike other failed handshakes.
                let refused = crate::tls::is_refusal(&e);
                let err = Error::db(db.side, what, e);
                return Err(if refused {
                    err.with_kind(Kind::Tls)
                } else {
                    err
                });
            }
            Err(_) => return Err(Error::timeout(db.side, what, cfg.connect_timeout)),
        };
        let side = db.side;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("{side}: connection closed: {e}");
            }
        });
        Ok(Db {
            client,
            side,
            timeout: cfg.query_timeout,
            driver,
        })
    }

    /// Connects with up to `MAX_CONNECTION_RETRIES` attempts. After failed attempt
    /// k (counting from 0) it waits a random time between 0 and
    /// min(30 s, 0.5 s × 2^k) ("full jitter", so that a fleet of gateways whose
    /// uplink came back at the same moment does not reconnect in lockstep). Each
    /// failure is logged with the delay chosen. The waits feed the watchdog and end
    /// early on shutdown.
    pub async fn connect_with_retry(
        db: &DbConfig,
        cfg: &Config,
        shutdown: &Shutdown,
    ) -> Result<Db> {
        let mut attempt = 0u32;
        loop {
            crate::notify::alive();
            let err = match Db::connect(db, cfg).await {
                Ok(c) => {
                    if attempt > 0 {
                        log::info!(
                            "{}: connected to {} after {} attempts",
                            db.side,
                            db.describe(),
                            attempt + 1
                        );
                    }
                    return Ok(c);
                }
                Err(e) => e,
            };
            attempt += 1;
            // What does not heal by waiting (a malformed file, a refused certificate,
            // a server that rejects our credentials) is not retried within the cycle.
            if attempt >= cfg.max_connection_retries || !err.is_transient() {
                return Err(err);
            }
            let cap = backoff_cap(attempt - 1);
            let delay = jitter(cap);
            log::warn!(
                "{err}; attempt {attempt}/{}, retrying in {} ms (backoff cap {} ms)",
                cfg.max_connection_retries,
                delay.as_millis(),
                cap.as_millis()
            );
            if !shutdown.sleep(delay).await {
                return Err(err);
            }
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The connection is gone; a new one is needed.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs one round trip with the query timeout, mapping errors to "side: what: cause".
    pub async fn timed<T, F>(&self, what: &str, fut: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        timed(self.side, self.timeout, what, fut).await
    }

    pub async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.timed(what, self.client.query(sql, params)).await
    }

    pub async fn query_one(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        self.timed(what, self.client.query_one(sql, params)).await
    }

    pub async fn execute(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        self.timed(what, self.client.execute(sql, params)).await
    }

    pub async fn batch(&self, what: &str, sql: &str) -> Result<()> {
        self.timed(what, self.client.batch_execute(sql)).await
    }

    /// Runs `op` again when it fails transiently on a connection that is still open
    /// (a serialization failure, a deadlock, a lock timeout), up to
    /// `MAX_QUERY_RETRIES` more times, waiting 100 ms, 200 ms, 400 ms… in between.
    /// A lost connection is not retried here: the caller must reconnect.
    pub async fn retrying<T, F, Fut>(&self, retries: u32, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut n = 0;
        loop {
            match op().await {
                Err(e)
                    if e.is_transient()
                        && !e.is_connection_lost()
                        && !self.is_closed()
                        && n < retries =>
                {
                    n += 1;
                    log::warn!("{e}; retry {n}/{retries}");
                    tokio::time::sleep(Duration::from_millis(100 << (n - 1).min(6))).await;
                }
                other => return other,
            }
        }
    }
}

/// A round trip on `side` bounded by `limit`. A timeout means the link is dead (a
/// blackholed uplink never answers and never resets), so the error counts as a lost
/// connection.
pub async fn timed<T, F>(side: Side, limit: Duration, what: &str, fut: F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    // The wait is bounded by `limit`, so feeding the watchdog meanwhile cannot keep
    // a hung loop alive (see notify.rs).
    match crate::notify::while_bounded(tokio::time::timeout(limit, fut)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::db(side, what, e)),
        Err(_) => Err(Error::timeout(side, what, limit)),
    }
}

/// The cap on the wait after failed attempt `k` (from 0): 0.5 s × 2^k, at most 30 s.
pub fn backoff_cap(k: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << k.min(16))
        .min(BACKOFF_MAX)
}

/// A uniformly random duration in [0, cap].
pub fn jitter(cap: Duration) -> Duration {
    // RandomState is seeded from the OS per instance: enough randomness to spread a
    // fleet, without a dependency.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let ms = cap.as_millis() as u64;
    Duration::from_millis(if ms == 0 { 0 } else { r % (ms + 1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let caps: Vec<u64> = (0..9).map(|k| backoff_cap(k).as_millis() as u64).collect();
        assert_eq!(
            caps,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff_cap(100), BACKOFF_MAX);
    }

    /// Against a port nobody listens on, every attempt fails at once, so the time
    /// spent is the backoff alone: MAX_CONNECTION_RETRIES attempts, each wait at most
    /// its cap (0.5 s, 1 s, 2 s), and the error is the last attempt's.
    #[tokio::test(start_paused = true)]
    async fn connect_backs_off_within_the_caps_and_gives_up_after_the_retries() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = Config::from_vars([
            ("POSTGRES_SYNC_HOST".to_string(), "127.0.0.1".to_string()),
            ("POSTGRES_SYNC_PORT".to_string(), port.to_string()),
            ("POSTGRES_CLIENT_HOST".to_string(), "c.example".to_string()),
            ("MAX_CONNECTION_RETRIES".to_string(), "4".to_string()),
        ])
        .unwrap();
        let t = tokio::time::Instant::now();
        let err = match Db::connect_with_retry(&cfg.local, &cfg, &Shutdown::never()).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(e) => e,
        };
        assert!(err.is_transient(), "{err}");
        assert!(
            err.to_string().starts_with("local: connect to 127.0.0.1:"),
            "{err}"
        );
        let spent = t.elapsed();
        assert!(
            spent <= Duration::from_millis(500 + 1000 + 2000),
            "{spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_ends_the_backoff_at_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = Config::from_vars([
            ("POSTGRES_SYNC_HOST".to_string(), "127.0.0.1".to_string()),
            ("POSTGRES_SYNC_PORT".to_string(), port.to_string()),
            ("POSTGRES_CLIENT_HOST".to_string(), "c.example".to_string()),
            ("MAX_CONNECTION_RETRIES".to_string(), "100".to_string()),
        ])
        .unwrap();
        let (trigger, shutdown) = crate::shutdown::channel();
        trigger.trigger();
        let t = tokio::time::Instant::now();
        assert!(Db::connect_with_retry(&cfg.local, &cfg, &shutdown)
            .await
            .is_err());
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "waited although shutdown was requested"
        );
    }

    #[test]
    fn jitter_stays_within_the_cap_and_varies() {
        let cap = Duration::from_millis(1000);
        let draws: Vec<Duration> = (0..200).map(|_| jitter(cap)).collect();
        assert!(draws.iter().all(|d| *d <= cap));
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(
            distinct.len() > 50,
            "jitter is not random: {} distinct",
            distinct.len()
        );
    }
}
