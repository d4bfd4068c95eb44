//! Connecting to either database (Unix socket or TCP, TLS per sslmode), and a
//! client wrapper that puts a timeout on every round trip and names the database
//! and the operation in every error.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Transaction};

use crate::config::{Config, DbConfig, Side};
use crate::error::{Error, Kind, Result};
use crate::shutdown::Shutdown;

/// First backoff cap; it doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A statement's parameters, for the local side (central takes none: see
/// `Db::named_statements_allowed`).
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

/// One open connection and the task that drives it.
pub struct Db {
    client: Client,
    side: Side,
    timeout: Duration,
    /// `SET LOCAL …` for every central transaction (empty for local, whose session
    /// carries its settings from the startup packet).
    settings: String,
    /// Central answers through a connection pooler (see [`Db::behind_pooler`]).
    pooled: bool,
    /// The upload found central's table fit for it on this connection (see
    /// [`Db::upload_table_checked`]).
    upload_table_checked: AtomicBool,
    /// Why the connection ended, once the task driving it has ended (see
    /// [`Db::closed_reason`]).
    closed_by: Arc<Mutex<Option<String>>>,
    driver: tokio::task::JoinHandle<()>,
}

/// What every central transaction sets for itself, since under PgBouncer's
/// transaction pooling nothing set on a session survives its transaction:
///
/// - `TimeZone` and `DateStyle`, so that any timestamp central prints is exact
///   UTC ISO text whatever the server's or PgBouncer's defaults;
/// - `statement_timeout` a little under ours (see [`statement_timeout`]);
/// - `lock_timeout` at half of that ([`lock_timeout`]): a statement that waits for
///   a lock (central's maintenance: a `CREATE INDEX` without `CONCURRENTLY`,
///   `VACUUM FULL`, an `ALTER TABLE`) gives up with 55P03, transient, before the
///   statement timeout would cancel it with 57014, which the upload must read as
///   a batch too large (docs/upload.md) and would halve its batches for;
/// - `idle_in_transaction_session_timeout`, so that a transaction whose client
///   died releases its locks (PgBouncer also ends it when the client goes);
/// - `synchronous_commit = on`: our commit is acknowledged only once central has
///   flushed it to its WAL and, if central names synchronous standbys
///   (`synchronous_standby_names`), once they have flushed it too; whatever the
///   role's or database's default (an operator's `off` would make an acknowledged
///   batch, already deleted on the gateway, vanish in a crash). `remote_apply`
///   would add nothing to durability, only wait for replay on the standby.
fn central_settings(cfg: &Config) -> String {
    format!(
        "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; \
         SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; \
         SET LOCAL idle_in_transaction_session_timeout = {}; SET LOCAL synchronous_commit = on",
        statement_timeout(cfg.query_timeout).as_millis(),
        lock_timeout(statement_timeout(cfg.query_timeout)).as_millis(),
        idle_timeout(cfg).as_millis()
    )
}

/// Half of a statement's `statement_timeout`: see [`central_settings`].
fn lock_timeout(statement: Duration) -> Duration {
    (statement / 2).max(Duration::from_millis(1))
}

impl Drop for Db {
    fn drop(&mut self) {
        // Dropping the client closes the socket gracefully; the driver ends by
        // itself then, but abort it in case the peer is silent.
        self.driver.abort();
    }
}

/// The tokio-postgres configuration for one database: timeouts, keepalive, and for
/// the local database a session in UTC with ISO dates so that timestamps travel as
/// exact text.
///
/// Central gets no startup `options` at all: PgBouncer refuses the parameter
/// (`unsupported startup parameter: options`), and under transaction pooling a
/// session setting would not follow us to the next server connection anyway. What
/// central needs is set per transaction instead (see [`central_settings`]).
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
        .ssl_mode(crate::tls::pg_ssl_mode(db.sslmode))
        .channel_binding(crate::tls::pg_channel_binding(db.channel_binding));
    let password = db.password_now();
    if !password.is_empty() {
        c.password(password.expose());
    }
    match db.side {
        Side::Local => {
            // The local session is ours for its whole life (the cycle lock is a
            // session lock), so its settings go into the startup packet.
            c.options(format!(
                "-c TimeZone=UTC -c DateStyle=ISO -c idle_in_transaction_session_timeout={} \
                 -c statement_timeout={}",
                idle_timeout(cfg).as_millis(),
                statement_timeout(cfg.query_timeout).as_millis()
            ));
        }
        Side::Central if db.hosts.len() > 1 => {
            // With several hosts listed, the first that accepts writes: a standby
            // (or a primary demoted by a failover) is skipped, as libpq does with
            // target_session_attrs=read-write. With one host there is nothing to
            // choose, and the check would cost a round trip that, through a pooler,
            // waits for a free server inside the connect timeout: a fleet reconnecting
            // at once through PgBouncer then timed out and reconnected in a loop.
            // A write that meets a read-only server still drops the session (25006).
            c.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        Side::Central => {}
    }
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

/// A server that outlives us in an open transaction (we were killed, the link
/// died) releases its locks after this long instead of holding them forever.
fn idle_timeout(cfg: &Config) -> Duration {
    (cfg.query_timeout * 2).max(Duration::from_secs(10))
}

/// A little under `DB_QUERY_TIMEOUT_MS`: when we give up waiting on a statement,
/// the server has already cancelled it (or is about to), so a backend whose client
/// left does not go on running it (and, locally, holding the cycle lock) for as
/// long as the statement would have taken. Streams that legitimately last longer
/// (download's COPY, migrations) lift it with `SET LOCAL statement_timeout = 0`;
/// their every wait is bounded on our side instead.
fn statement_timeout(q: Duration) -> Duration {
    q.saturating_sub((q / 10).max(Duration::from_millis(100)))
        .max(q / 2)
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
            crate::tls::connect(db, pc, tls),
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
        let closed_by = Arc::new(Mutex::new(None));
        let driver = tokio::spawn({
            let closed_by = Arc::clone(&closed_by);
            let mut connection = connection;
            async move {
                // tokio-postgres would log a notice bare ("WARNING: terminating
                // connection due to immediate shutdown command", on central's bad
                // day): said here with the database it came from.
                let why = loop {
                    match futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notice(n))) => {
                            log::info!("{side}: the server says: {}: {}", n.severity(), n.message())
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break Error::db(side, "connection closed", e).to_string(),
                        None => break format!("{side}: connection closed by the server"),
                    }
                };
                log::debug!("{why}");
                *closed_by.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
        });
        let mut db = Db {
            client,
            side,
            timeout: cfg.query_timeout,
            settings: match side {
                Side::Local => String::new(),
                Side::Central => central_settings(cfg),
            },
            pooled: false,
            upload_table_checked: AtomicBool::new(false),
            closed_by,
            driver,
        };
        // `UPLOAD_METHOD=auto` chooses by the answer, and whatever the method the
        // drain lets its pipeline run dry now and then behind a pooler.
        if side == Side::Central {
            db.pooled = db.detect_pooler(&what).await?;
        }
        Ok(db)
    }

    /// A pooler cannot announce the key of a backend it has not chosen yet, so it
    /// sends one of its own: PgBouncer, Odyssey and pgcat all do, while a plain TCP
    /// relay (a NAT, HAProxy, our tests' fault proxy) passes the server's through.
    /// One round trip per connection, on the unnamed statement.
    async fn detect_pooler(&self, what: &str) -> Result<bool> {
        let row = self
            .timed(
                what,
                self.client.query_typed_one("SELECT pg_backend_pid()", &[]),
            )
            .await?;
        let pid: i32 = row
            .try_get(0)
            .map_err(|e| Error::db(self.side, what.to_string(), e))?;
        let pooled = pid != self.client.backend_key_pid();
        if pooled {
            log::debug!("{}: answers through a connection pooler", self.side);
        }
        Ok(pooled)
    }

    /// Central answers through a connection pooler (asked at every central
    /// connect): the backend behind this connection may change at every
    /// transaction boundary. PgBouncer before 1.21 hands the backend back to its
    /// pool at the first ReadyForQuery after a COPY, so nothing may be pipelined
    /// behind a COPY there; and it hands it back only when nothing more is
    /// pipelined behind a transaction, so the upload lets its pipeline run dry
    /// now and then (docs/upload.md).
    pub fn behind_pooler(&self) -> bool {
        self.pooled
    }

    /// Whether the upload has checked central's table on this connection; the
    /// first call after a check passed marks it so ([`Db::mark_upload_table_checked`]).
    pub fn upload_table_checked(&self) -> bool {
        self.upload_table_checked.load(Ordering::Relaxed)
    }

    pub fn mark_upload_table_checked(&self) {
        self.upload_table_checked.store(true, Ordering::Relaxed);
    }

    /// Connects with up to `MAX_CONNECTION_RETRIES` attempts. After failed attempt
    /// k (counting from 0) it waits a random time between 0 and
    /// min(30 s, 0.5 s × 2^k) ("full jitter", so that a fleet of gateways whose
    /// uplink came back at the same moment does not reconnect in lockstep). Each
    /// failure is logged with the delay chosen. The waits feed the watchdog and end
    /// early on shutdown, and so does an attempt in progress: nothing is in flight
    /// on a connection not yet made, so a stop need not wait out
    /// `DB_CONNECTION_TIMEOUT_MS` on a blackholed link.
    pub async fn connect_with_retry(
        db: &DbConfig,
        cfg: &Config,
        shutdown: &Shutdown,
    ) -> Result<Db> {
        let mut attempt = 0u32;
        loop {
            crate::notify::alive();
            let connected = tokio::select! {
                c = Db::connect(db, cfg) => c,
                _ = shutdown.requested() => {
                    return Err(Error::new(
                        Kind::Db,
                        format!("connect to {}: abandoned for shutdown", db.describe()),
                    )
                    .with_side(db.side));
                }
            };
            let err = match connected {
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
            // Nor is a central that says it is full (53300): a fleet that asked again
            // within seconds kept it full, each refusal a fork, a TLS handshake and
            // (for a role's CONNECTION LIMIT) a SCRAM exchange on central, five per
            // gateway and cycle instead of one; the next cycle asks again. The
            // gateway's own server has no fleet behind it and is asked as before.
            if attempt >= cfg.max_connection_retries
                || !err.is_transient()
                || (db.side == Side::Central
                    && err.code() == Some(crate::error::TOO_MANY_CONNECTIONS))
            {
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

    /// The `lock_timeout` of the daemon's local session (see `lock::acquire`): half
    /// its statement timeout, as on central, so that a statement waiting for the
    /// collector's lock (a `VACUUM FULL`, an `ALTER TABLE`, a long transaction
    /// holding the rows) gives up with 55P03, which is not retried at once, well
    /// before our round-trip timeout would give the whole connection up.
    pub fn lock_wait(&self) -> Duration {
        lock_timeout(statement_timeout(self.timeout))
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

    /// Why the connection is gone, if it is: the server's own message when it
    /// ended the session (`terminating connection due to idle-session timeout
    /// (SQLSTATE 57P05)`, `... administrator command (SQLSTATE 57P01)`), else the
    /// I/O error that ended it.
    pub fn closed_reason(&self) -> Option<String> {
        if !self.is_closed() {
            return None;
        }
        let why = self.closed_by.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            why.clone()
                .unwrap_or_else(|| format!("{}: connection closed", self.side)),
        )
    }

    /// Runs one round trip with the query timeout, mapping errors to "side: what: cause".
    pub async fn timed<T, F>(&self, what: &str, fut: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        timed(self.side, self.timeout, what, fut).await
    }

    /// A statement with a parameter list goes through tokio-postgres's named
    /// prepared statements (`s0`, `s1`, … per process): three messages with a Sync
    /// each, which under transaction pooling land on different server connections
    /// (`prepared statement "s35" does not exist`). On central, use tokio-postgres's
    /// `query_typed`/`execute_typed` (the unnamed statement) instead; this refuses
    /// loudly rather than failing one phase in twenty behind PgBouncer.
    fn named_statements_allowed(&self, what: &str, params: usize) -> Result<()> {
        if self.side == Side::Central && params > 0 {
            return Err(Error::new(
                crate::error::Kind::Other,
                format!("{what}: internal error: a named prepared statement on central (use query_typed)"),
            )
            .with_side(self.side));
        }
        Ok(())
    }

    /// A query; on central it must be without parameters (see `named_statements_allowed`).
    pub async fn query(&self, what: &str, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let (local, central) = (
            self.client.query(sql, params),
            self.client.query_typed(sql, &[]),
        );
        self.on_side(what, params.len(), local, central).await
    }

    pub async fn query_one(&self, what: &str, sql: &str, params: Params<'_>) -> Result<Row> {
        let local = self.client.query_one(sql, params);
        let central = self.client.query_typed_one(sql, &[]);
        self.on_side(what, params.len(), local, central).await
    }

    pub async fn execute(&self, what: &str, sql: &str, params: Params<'_>) -> Result<u64> {
        let local = self.client.execute(sql, params);
        let central = self.client.execute_typed(sql, &[]);
        self.on_side(what, params.len(), local, central).await
    }

    /// Runs `local` on a local connection, `central` (the same statement on the
    /// unnamed statement) on central; neither is sent before it is awaited.
    async fn on_side<T>(
        &self,
        what: &str,
        params: usize,
        local: impl Future<Output = PgResult<T>>,
        central: impl Future<Output = PgResult<T>>,
    ) -> Result<T> {
        self.named_statements_allowed(what, params)?;
        match self.side {
            Side::Local => self.timed(what, local).await,
            Side::Central => self.timed(what, central).await,
        }
    }

    /// Opens a REPEATABLE READ READ ONLY transaction with this side's
    /// per-transaction settings (see [`central_settings`]): one snapshot for every
    /// statement in it (the download's probe, its watermark and its COPY), and the
    /// statement timeout lifted, because a COPY stream over a slow uplink may
    /// outlast it while every wait for it is bounded on our side. Dropped without
    /// commit, it rolls back. Inside it, named prepared statements are safe even
    /// behind PgBouncer (the server connection is ours until the transaction ends,
    /// and tokio-postgres closes each statement when it is dropped), so COPY works.
    pub async fn begin_snapshot(&mut self, what: &str) -> Result<Transaction<'_>> {
        let (side, limit) = (self.side, self.timeout);
        let settings = [self.settings.as_str(), "SET LOCAL statement_timeout = 0"]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("; ");
        let tx = timed(
            side,
            limit,
            what,
            self.client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start(),
        )
        .await?;
        timed(side, limit, what, tx.batch_execute(&settings)).await?;
        Ok(tx)
    }

    /// One statement in its own transaction with this side's settings, as one
    /// pipelined exchange: `BEGIN; SET LOCAL …`, the statement, `COMMIT`. Returns
    /// the statement's result once the commit is acknowledged. Untimed: the caller
    /// times it (upload counts from the head of its pipeline).
    ///
    /// The requests are sent back to back without waiting in between, so this
    /// costs one round trip, and several of these may be in flight on one
    /// connection at once (upload's pipeline) without their messages interleaving:
    /// `join3` polls its futures in order, and each sends its request on its first
    /// poll before it first waits (true of `batch_execute`, `execute_typed` and
    /// upload's `copy_in_all`; not of `execute` with a `&str`, which prepares first).
    ///
    /// The statement timeout does not cover the commit's wait for synchronous
    /// standbys (PostgreSQL disarms it before committing; a cancel there would
    /// report the commit as done with only a WARNING). A commit that cannot reach
    /// a standby waits until our query timeout gives up on the connection: nothing
    /// is deleted locally, and the batch is sent again later (a no-op for rows
    /// central has). The durability test in tests/central.rs holds both.
    pub async fn in_transaction<T>(
        &self,
        statement: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> std::result::Result<T, tokio_postgres::Error> {
        self.in_transaction_of(1, statement).await
    }

    /// The `statement_timeout` each of `statements` statements of one
    /// [`Db::in_transaction_of`] runs under.
    pub fn statement_timeout_of(&self, statements: u32) -> Duration {
        statement_timeout(self.timeout) / statements.max(1)
    }

    /// [`Db::in_transaction`] for a `statement` that runs `statements` statements
    /// (upload's COPY in parts): each gets an equal share of the statement timeout,
    /// so that together they are still cancelled by the server (57014) before our
    /// own timeout gives up on the connection, as one statement would be.
    pub async fn in_transaction_of<T>(
        &self,
        statements: u32,
        statement: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> std::result::Result<T, tokio_postgres::Error> {
        let mut begin = format!("BEGIN; {}", self.settings);
        if statements > 1 {
            let share = self.statement_timeout_of(statements);
            begin.push_str(&format!(
                "; SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
                share.as_millis().max(1),
                lock_timeout(share).as_millis()
            ));
        }
        let (b, n, c) = futures_util::future::join3(
            self.client.batch_execute(&begin),
            statement,
            // After a failed statement the server answers COMMIT with ROLLBACK (no
            // error): the statement's own error is reported.
            self.client.batch_execute("COMMIT"),
        )
        .await;
        b?;
        let n = n?;
        c?;
        Ok(n)
    }

    /// Runs `op` again when it fails transiently on a connection that is still open
    /// (a serialization failure, a deadlock; see [`Error::is_worth_retrying_now`]), up to
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
                Err(e) if e.is_worth_retrying_now() && !self.is_closed() && n < retries => {
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

    fn two_central_hosts() -> Config {
        Config::from_vars(
            [
                ("POSTGRES_SYNC_HOST", "127.0.0.1"),
                (
                    "POSTGRES_CLIENT_HOST",
                    "central-a.example,central-b.example",
                ),
                ("POSTGRES_CLIENT_PORT", "6432,6433"),
                ("DB_QUERY_TIMEOUT_MS", "30000"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    }

    /// PgBouncer refuses startup `options` (P22); the local session keeps them.
    #[test]
    fn central_gets_no_startup_options_and_asks_for_a_writable_host() {
        let cfg = two_central_hosts();
        let c = pg_config(&cfg.central, &cfg);
        assert_eq!(c.get_options(), None);
        assert_eq!(
            c.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(c.get_hosts().len(), 2);
        assert_eq!(c.get_ports(), &[6432, 6433]);
        let l = pg_config(&cfg.local, &cfg);
        let opts = l.get_options().unwrap();
        assert!(opts.contains("TimeZone=UTC") && opts.contains("statement_timeout=27000"));
    }

    /// One host: nothing to choose, so no read-write check at connect (through a
    /// pooler it would wait for a free server inside the connect timeout).
    #[test]
    fn one_central_host_is_not_asked_whether_it_accepts_writes() {
        let cfg = Config::from_vars(
            [
                ("POSTGRES_SYNC_HOST", "127.0.0.1"),
                ("POSTGRES_CLIENT_HOST", "central.example"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        let c = pg_config(&cfg.central, &cfg);
        assert_eq!(
            c.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::Any
        );
    }

    #[test]
    fn every_central_transaction_sets_what_it_needs() {
        let s = central_settings(&two_central_hosts());
        for want in [
            "SET LOCAL TimeZone = 'UTC'",
            "SET LOCAL DateStyle = 'ISO'",
            "SET LOCAL statement_timeout = 27000",
            "SET LOCAL lock_timeout = 13500",
            "SET LOCAL idle_in_transaction_session_timeout = 60000",
            "SET LOCAL synchronous_commit = on",
        ] {
            assert!(s.contains(want), "{want} missing from {s}");
        }
    }

    #[test]
    fn the_statement_timeout_is_a_little_under_the_query_timeout() {
        for (q, st) in [
            (30_000, 27_000),
            (1000, 900),
            (500, 400),
            (150, 75),
            (100, 50),
        ] {
            assert_eq!(
                statement_timeout(Duration::from_millis(q)),
                Duration::from_millis(st),
                "{q}"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let caps: Vec<u64> = (0..9).map(|k| backoff_cap(k).as_millis() as u64).collect();
        assert_eq!(
            caps,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff_cap(100), BACKOFF_MAX);
    }

    /// A configuration whose local database is a port nobody listens on.
    fn local_on_a_closed_port(retries: u32) -> Config {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Config::from_vars([
            ("POSTGRES_SYNC_HOST".to_string(), "127.0.0.1".to_string()),
            ("POSTGRES_SYNC_PORT".to_string(), port.to_string()),
            ("POSTGRES_CLIENT_HOST".to_string(), "c.example".to_string()),
            ("MAX_CONNECTION_RETRIES".to_string(), retries.to_string()),
        ])
        .unwrap()
    }

    /// Against a port nobody listens on, every attempt fails at once, so the time
    /// spent is the backoff alone: MAX_CONNECTION_RETRIES attempts, each wait at most
    /// its cap (0.5 s, 1 s, 2 s), and the error is the last attempt's.
    #[tokio::test(start_paused = true)]
    async fn connect_backs_off_within_the_caps_and_gives_up_after_the_retries() {
        let cfg = local_on_a_closed_port(4);
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
        let cfg = local_on_a_closed_port(100);
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
