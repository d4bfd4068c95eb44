//! The one error type at the boundary between meter-sync and its databases: which
//! database, which operation, and whether trying again later can help. A leaf: it
//! knows no other module of the crate (db.rs, which knows TLS, marks a refused
//! certificate as [`Kind::Tls`]).

use std::fmt;

/// Which of the two databases; every database error names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Local,
    Central,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Central => "central",
        })
    }
}

/// What went wrong, broadly: decides the exit code and whether a retry can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bad variable or unreadable file: exit 78.
    Config,
    /// A database (local or central) failed or was unreachable.
    Db,
    /// TLS could not be set up or the server's certificate was refused.
    Tls,
    /// A migration could not be applied or was edited after being applied.
    Migration,
    /// The schema was migrated by a newer release that says this one cannot work
    /// with it (a rollback too far): exit 78, since a restart cannot help.
    SchemaTooNew,
    /// A round trip that did not answer within `DB_QUERY_TIMEOUT_MS`.
    Timeout,
    /// Anything else (I/O on local files, the metrics file, ...).
    Other,
}

pub struct Error {
    kind: Kind,
    side: Option<Side>,
    /// For [`Kind::Config`]: the variable at fault, when one is.
    var: Option<&'static str>,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// SQLSTATE of the database error, if it was one.
    code: Option<String>,
    /// The connection is gone (tokio-postgres said so, or the error carries no
    /// SQLSTATE, i.e. the server did not answer for a statement): the caller must
    /// reconnect rather than retry on it.
    closed: bool,
    /// What failed cannot have been about the size of what was sent: see
    /// [`Error::not_about_size`], [`Error::cancelled_by_someone`],
    /// [`Error::commit_unanswered`].
    not_about_size: bool,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, context: impl Into<String>) -> Error {
        Error {
            kind,
            side: None,
            var: None,
            context: context.into(),
            source: None,
            code: None,
            closed: false,
            not_about_size: false,
        }
    }

    /// A database error on `side` while doing `what` ("insert batch of 100").
    pub fn db(side: Side, what: impl Into<String>, e: tokio_postgres::Error) -> Error {
        let code = e.code().map(|c| c.code().to_string());
        // A server that turned read-only under us (a primary demoted, or a standby
        // PgBouncer now points at) will refuse every write on this session: it must
        // be dropped, so that the reconnect finds the writable host.
        let closed = e.is_closed() || code.is_none() || code.as_deref() == Some(READ_ONLY);
        Error {
            kind: Kind::Db,
            side: Some(side),
            var: None,
            context: what.into(),
            source: Some(Box::new(e)),
            code,
            closed,
            not_about_size: false,
        }
    }

    /// A round trip to `side` that did not answer in time.
    pub fn timeout(side: Side, what: impl Into<String>, after: std::time::Duration) -> Error {
        Error {
            kind: Kind::Timeout,
            side: Some(side),
            var: None,
            context: format!("{}: no answer within {} ms", what.into(), after.as_millis()),
            source: None,
            code: None,
            closed: true,
            not_about_size: false,
        }
    }

    /// A configuration error about `var` ("is not a PEM certificate").
    pub fn config(var: &'static str, problem: impl Into<String>) -> Error {
        Error {
            var: Some(var),
            ..Error::new(Kind::Config, problem)
        }
    }

    /// For a configuration error about one variable: the variable and the problem.
    pub fn config_problem(&self) -> Option<(&'static str, &str)> {
        self.var.map(|v| (v, self.context.as_str()))
    }

    /// The same error (its SQLSTATE, its cause) with another context: what it
    /// was about, once that is known.
    pub fn with_context(mut self, context: impl Into<String>) -> Error {
        self.context = context.into();
        self
    }

    pub fn with_side(mut self, side: Side) -> Error {
        self.side = Some(side);
        self
    }

    /// The same error as another kind: db.rs marks a refused server certificate
    /// [`Kind::Tls`], which waiting cannot heal.
    pub fn with_kind(mut self, kind: Kind) -> Error {
        self.kind = kind;
        self
    }

    /// Marks a statement cancelled (57014) before its `statement_timeout` could
    /// have run out: someone cancelled it (an operator's `pg_cancel_backend`, a
    /// tool that clears sessions for a migration), so it says nothing about its
    /// size, and sending it again can succeed at once.
    pub fn cancelled_by_someone(mut self) -> Error {
        self.not_about_size |= self.code() == Some(QUERY_CANCELED);
        self
    }

    /// Marks a round trip that timed out after its statement was answered, so
    /// only the COMMIT was: central did not acknowledge the commit in time,
    /// which is a synchronous standby that does not confirm (or a central that
    /// cannot flush its WAL), not a batch too large for it; the message says so.
    pub fn commit_unanswered(mut self) -> Error {
        if self.kind == Kind::Timeout {
            self.not_about_size = true;
            self.context = format!(
                "{}; the statement was answered, its COMMIT was not (a synchronous standby \
                 that does not confirm?)",
                self.context
            );
        }
        self
    }

    /// Marks an error that says nothing about the size of what was sent: a round
    /// trip that failed before it was its turn (the upload's pipeline gave the
    /// connection up for another one's timeout).
    pub fn not_about_size(mut self) -> Error {
        self.not_about_size = true;
        self
    }

    /// See [`Error::not_about_size`], [`Error::cancelled_by_someone`] and
    /// [`Error::commit_unanswered`].
    pub fn is_not_about_size(&self) -> bool {
        self.not_about_size
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn side(&self) -> Option<Side> {
        self.side
    }

    /// The SQLSTATE, if the database answered with an error.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The server's (or a pooler's) own message, if the database answered with
    /// an error.
    pub fn server_message(&self) -> Option<&str> {
        self.source
            .as_ref()?
            .downcast_ref::<tokio_postgres::Error>()?
            .as_db_error()
            .map(|db| db.message())
    }

    /// The connection this error came through can no longer be used.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self.kind, Kind::Timeout) || (self.kind == Kind::Db && self.closed)
    }

    /// Whether the same round trip, sent again at once on the same connection, can
    /// succeed: transient, the connection still usable, not a lock wait that ran
    /// out (55P03, `lock_timeout`) and not a lack of resources (class 53). A lock
    /// held that long is maintenance (a `CREATE INDEX` without `CONCURRENTLY`,
    /// `VACUUM FULL`, an `ALTER TABLE`), which 100 ms more do not outlast, and each
    /// retry would wait as long again. A full disk (53100) or a configured limit
    /// (53400) is not freed in 100 ms either, and each retry of each batch in the
    /// upload's pipeline sent its readings again into it (a central whose disk
    /// filled got 32 COPYs per gateway and cycle instead of 8, with a warning for
    /// each). The next cycle tries again.
    pub fn is_worth_retrying_now(&self) -> bool {
        self.is_transient()
            && !self.is_connection_lost()
            && !self
                .code()
                .is_some_and(|c| c == LOCK_NOT_AVAILABLE || c.starts_with("53"))
    }

    /// Whether trying the same thing later can succeed: a lost connection, a timeout,
    /// or a SQLSTATE of class 08 (connection), 40 (serialization, deadlock), 53
    /// (resources), 57P (shutdown, recovery), 58 (system) or 55P03 (lock not
    /// available). Everything else the server said (classes 22 data and 23
    /// constraint above all) is a property of the data and repeats forever.
    pub fn is_transient(&self) -> bool {
        match self.kind {
            Kind::Timeout => true,
            Kind::Db => match self.code.as_deref() {
                None => true,
                Some(c) => is_transient_sqlstate(c),
            },
            _ => false,
        }
    }
}

/// SQLSTATE read_only_sql_transaction: a write reached a server in recovery.
pub const READ_ONLY: &str = "25006";

/// SQLSTATE query_canceled: a `statement_timeout` ran out, or someone cancelled
/// the statement.
pub const QUERY_CANCELED: &str = "57014";

/// SQLSTATE too_many_connections: the server's `max_connections`, or a role's or
/// database's `CONNECTION LIMIT`, is reached.
pub const TOO_MANY_CONNECTIONS: &str = "53300";

/// SQLSTATE lock_not_available: a `lock_timeout` ran out.
pub const LOCK_NOT_AVAILABLE: &str = "55P03";

/// See [`Error::is_transient`]. 25006 (a read-only server) heals by reconnecting to
/// the writable host after a failover.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code == READ_ONLY
        || code.starts_with("08")
        || code.starts_with("40")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("58")
        || code == LOCK_NOT_AVAILABLE
        || code == QUERY_CANCELED
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(side) = self.side {
            write!(f, "{side}: ")?;
        }
        if let Some(var) = self.var {
            write!(f, "{var}: ")?;
        }
        f.write_str(&self.context)?;
        if let Some(src) = &self.source {
            write!(f, ": {}", describe_source(src.as_ref()))?;
        }
        Ok(())
    }
}

/// tokio-postgres' Display of a server error is only "db error"; the useful part
/// (message, SQLSTATE, detail) is in its `as_db_error()`, and the cause of a lost
/// connection is one level down.
fn describe_source(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(db) = e
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|pg| pg.as_db_error())
    {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(": ");
            s.push_str(d);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes() {
        for c in [
            "08006", "08001", "40001", "40P01", "53300", "57P01", "57P03", "55P03", "57014",
            "25006",
        ] {
            assert!(is_transient_sqlstate(c), "{c}");
        }
        for c in [
            "23505", "23503", "23514", "22003", "22P02", "42P01", "42501",
        ] {
            assert!(!is_transient_sqlstate(c), "{c}");
        }
    }

    #[test]
    fn display_names_the_side() {
        let e = Error::timeout(
            Side::Central,
            "insert batch of 100",
            std::time::Duration::from_millis(1500),
        );
        assert_eq!(
            e.to_string(),
            "central: insert batch of 100: no answer within 1500 ms"
        );
        assert!(e.is_transient());
        assert!(e.is_connection_lost());
        assert!(!e.is_worth_retrying_now());
    }

    #[test]
    fn a_lock_wait_that_ran_out_waits_for_the_next_cycle() {
        let coded = |c: &str| Error {
            code: Some(c.to_string()),
            ..Error::new(Kind::Db, "insert batch of 100")
        };
        assert!(coded("40001").is_worth_retrying_now());
        let lock = coded(LOCK_NOT_AVAILABLE);
        assert!(lock.is_transient());
        assert!(!lock.is_worth_retrying_now());
        assert!(!coded("23505").is_worth_retrying_now());
    }

    #[test]
    fn only_a_cancel_can_be_one_by_someone() {
        let coded = |c: &str| Error {
            code: Some(c.to_string()),
            ..Error::new(Kind::Db, "copy batch of 100")
        };
        let cancel = coded(QUERY_CANCELED).cancelled_by_someone();
        assert!(cancel.is_not_about_size());
        assert!(cancel.is_worth_retrying_now());
        assert!(!coded(QUERY_CANCELED).is_not_about_size());
        assert!(!coded(QUERY_CANCELED)
            .commit_unanswered()
            .is_not_about_size());
        assert!(!coded("53200").cancelled_by_someone().is_not_about_size());
    }

    #[test]
    fn an_unanswered_commit_is_not_about_size_and_says_so() {
        let e = Error::timeout(
            Side::Central,
            "copy batch of 100",
            std::time::Duration::from_secs(30),
        )
        .commit_unanswered();
        assert!(e.is_not_about_size() && e.is_connection_lost());
        assert!(e.to_string().contains("its COMMIT was not"), "{e}");
    }

    #[test]
    fn a_lack_of_resources_waits_for_the_next_cycle() {
        for c in ["53000", "53100", "53200", "53400"] {
            let e = Error {
                code: Some(c.to_string()),
                ..Error::new(Kind::Db, "copy batch of 100")
            };
            assert!(e.is_transient(), "{c}");
            assert!(!e.is_worth_retrying_now(), "{c}");
        }
    }
}
