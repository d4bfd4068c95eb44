//! The drain's scheduling decisions, apart from the I/O so that they can be tested
//! with a paused clock: how large the next batch is ([`Pace`]), and when a batch's
//! round-trip timeout starts ([`Pipeline`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Error, Kind};

/// Consecutive full batches at one size before the size doubles again.
pub const GROW_AFTER: u32 = 8;

/// Behind a connection pooler, how long the drain keeps its pipeline full before
/// it lets it run dry (no new batch until every batch in flight is answered).
///
/// PgBouncer in transaction pooling mode hands a server connection back to its
/// pool only when the transaction has ended and the client has sent nothing more;
/// a pipeline that is never empty holds the server connection for the whole
/// drain, up to `UPLOAD_TIME_BUDGET_SECONDS`. Meanwhile the operator's `PAUSE`
/// (and `RECONNECT`, and PgBouncer's safe shutdown on SIGINT) waits for this one
/// gateway, and every other client of the pool, its queries held by the `PAUSE`
/// in progress or queued for a server, times out (`query_wait_timeout`). Running
/// dry every 2 s bounds that wait to about 2 s plus one batch, at the cost of one
/// round trip per 2 s of upload (about 5 % over a 100 ms link).
pub const POOLER_TURN: Duration = Duration::from_secs(2);

/// The batch size the last drain of this process ended with (0: none yet), so that
/// a size that failed is not tried again at once by the next cycle (after a
/// client-side timeout the connection is given up and the drain ends; the smaller
/// size is what the next cycle starts with).
static REMEMBERED: AtomicUsize = AtomicUsize::new(0);

/// And its streak of full batches: a gateway's steady trickle (15 readings a
/// cycle) brings fewer than [`GROW_AFTER`] full batches per drain, so with the
/// streak starting at 0 in every drain a halved size never grew back: after one
/// timeout (a `PAUSE` on PgBouncer longer than `DB_QUERY_TIMEOUT_MS`) every cycle
/// sent its 15 readings in 3 transactions, for the life of the process, and each
/// further timeout halved again.
static REMEMBERED_STREAK: AtomicU32 = AtomicU32::new(0);

/// Whether a failed batch may have failed because of its size: a round trip that
/// did not answer in time (ours, `DB_QUERY_TIMEOUT_MS`), a statement cancelled by
/// central's `statement_timeout` (57014), central out of memory (53200), or a
/// protocol violation (08P01: a message over a proxy's size limit, PgBouncer's
/// `max_packet_size`, "bad packet header"), unless it is one of
/// [`POOLER_NOT_ABOUT_SIZE`]. Smaller batches may pass where this one did not.
/// Not a cancel that came before the timeout could run out, a timeout that waited
/// only for the COMMIT, nor a round trip the pipeline gave up before its turn
/// ([`Error::is_not_about_size`]).
pub fn is_size_failure(e: &Error) -> bool {
    size_failure(e.kind(), e.code(), e.server_message()) && !e.is_not_about_size()
}

/// PgBouncer sends every error of its own as 08P01, whatever its cause. These
/// name a cause that a smaller batch does not cure: its pool had no server for us
/// in time, the operator's `KILL`, the server connection died under the
/// transaction (central restarted or crashed), central refused PgBouncer. Read as
/// size, they halved the batches and told the operator "failed because of its
/// size". An 08P01 not listed stays a size failure: a message too large for a
/// proxy fails at every size above its limit, and would otherwise hold the queue
/// for good.
pub const POOLER_NOT_ABOUT_SIZE: [&str; 6] = [
    "query_wait_timeout",
    "database removed",
    "server conn crashed?",
    "pgbouncer cannot connect to server",
    "server login has been failing",
    "no more connections allowed",
];

fn size_failure(kind: Kind, code: Option<&str>, message: Option<&str>) -> bool {
    let pooler_said_otherwise =
        || message.is_some_and(|m| POOLER_NOT_ABOUT_SIZE.iter().any(|p| m.starts_with(p)));
    kind == Kind::Timeout
        || (kind == Kind::Db
            && match code {
                Some("57014" | "53200") => true,
                Some("08P01") => !pooler_said_otherwise(),
                _ => false,
            })
}

/// What to do after a batch failed because of its size.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterSizeFailure {
    /// The size is halved: finish the batches in flight, then read the queue again
    /// from the oldest reading with the smaller size.
    RetrySmaller,
    /// Already at one reading: the phase fails, the readings stay queued.
    GiveUp,
}

/// Batch size: `BATCH_SIZE` until a batch fails because of its size, then halved
/// per such failure (down to 1), and doubled back (up to `BATCH_SIZE`) after every
/// [`GROW_AFTER`] consecutive full batches that succeeded.
#[derive(Debug)]
pub struct Pace {
    max: usize,
    size: usize,
    streak: u32,
}

impl Pace {
    pub fn new(max: usize) -> Pace {
        let max = max.max(1);
        Pace {
            max,
            size: max,
            streak: 0,
        }
    }

    /// Starts from the size (and the streak towards growing it) the previous drain
    /// of this process ended with.
    pub fn resume(max: usize) -> Pace {
        let mut p = Pace::new(max);
        match REMEMBERED.load(Ordering::Relaxed) {
            0 => {}
            n if n < p.max => {
                p.size = n;
                p.streak = REMEMBERED_STREAK.load(Ordering::Relaxed);
            }
            _ => {}
        }
        p
    }

    /// Keeps the current size and streak for the next drain of this process.
    pub fn remember(&self) {
        REMEMBERED.store(self.size, Ordering::Relaxed);
        REMEMBERED_STREAK.store(self.streak, Ordering::Relaxed);
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A batch of `rows` readings was delivered. Only a batch at least as large as
    /// the current size counts towards growing: the short last batch of a queue says
    /// nothing about whether a larger one would pass.
    pub fn succeeded(&mut self, rows: usize) {
        if rows < self.size || self.size >= self.max {
            return;
        }
        self.streak += 1;
        if self.streak >= GROW_AFTER {
            self.size = (self.size * 2).min(self.max);
            self.streak = 0;
            log::info!("upload: batch size back up to {}", self.size);
        }
    }

    /// A batch of `rows` failed because of its size (see [`is_size_failure`]).
    /// Batches selected before an earlier halving may still be in flight and fail
    /// too; those do not halve again.
    pub fn failed_by_size(&mut self, rows: usize) -> AfterSizeFailure {
        self.streak = 0;
        if rows > self.size {
            return AfterSizeFailure::RetrySmaller;
        }
        if self.size == 1 {
            return AfterSizeFailure::GiveUp;
        }
        self.size = (rows / 2).max(1).min(self.size / 2).max(1);
        log::warn!("upload: batch size halved to {}", self.size);
        AfterSizeFailure::RetrySmaller
    }
}

/// The central statements in flight, in the order they were sent. The server
/// answers them in that order, so a statement can only be slow once the ones before
/// it are answered: its round-trip timeout runs from when it reached the head of
/// the pipeline, not from when it was queued behind the others (with a depth of 8
/// and a slow central, the eighth batch would otherwise time out while it waits).
///
/// Once one statement has timed out the connection counts as dead (P18: a silent
/// link is given up within `DB_QUERY_TIMEOUT_MS`): every statement still queued
/// behind it fails at once, instead of each waiting out a limit of its own.
#[derive(Default)]
pub struct Pipeline {
    state: Mutex<State>,
    moved: Notify,
}

#[derive(Default)]
struct State {
    next: u64,
    waiting: BTreeSet<u64>,
    dead: bool,
}

/// A place in the pipeline; leaving (dropping it) lets the next one be head.
struct Ticket<'a> {
    pipe: &'a Pipeline,
    n: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.pipe.lock().waiting.remove(&self.n);
        self.pipe.moved.notify_waiters();
    }
}

impl Pipeline {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Poisoned only by a panic while holding it, and the state stays valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self) -> Ticket<'_> {
        let mut s = self.lock();
        let n = s.next;
        s.next += 1;
        s.waiting.insert(n);
        Ticket { pipe: self, n }
    }

    /// Waits until statement `n` is the head, or the connection is dead (false).
    async fn reach_head(&self, n: u64) -> bool {
        loop {
            let moved = self.moved.notified();
            {
                let s = self.lock();
                if s.dead {
                    return false;
                }
                if s.waiting.first() == Some(&n) {
                    return true;
                }
            }
            moved.await;
        }
    }

    fn give_up(&self) {
        self.lock().dead = true;
        self.moved.notify_waiters();
    }

    /// Runs `fut`, one central round trip that is sent on its first poll, and gives
    /// up after `limit` counted from when every statement sent before it has been
    /// answered. `timeout` makes the error for that case.
    pub async fn timed<T, F>(
        &self,
        limit: Duration,
        fut: F,
        timeout: impl FnOnce() -> Error,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let ticket = self.enter();
        let mut fut = std::pin::pin!(fut);
        let alive = tokio::select! {
            biased;
            r = &mut fut => return r,
            alive = self.reach_head(ticket.n) => alive,
        };
        if !alive {
            // Never sent, or never its turn: what it carried was not to blame.
            return Err(timeout().not_about_size());
        }
        let r = crate::notify::while_bounded(tokio::time::timeout(limit, fut)).await;
        if r.is_err() {
            self.give_up();
        }
        drop(ticket);
        r.unwrap_or_else(|_| Err(timeout()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Side;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::{sleep, Instant};

    #[test]
    fn size_failures_are_timeouts_cancels_memory_and_protocol() {
        let t = Error::timeout(Side::Central, "insert batch", Duration::from_secs(1));
        assert!(is_size_failure(&t));
        for c in ["57014", "53200", "08P01"] {
            assert!(size_failure(Kind::Db, Some(c), None), "{c}");
        }
        for c in ["23505", "40001", "42501", "57P01", "08006"] {
            assert!(!size_failure(Kind::Db, Some(c), None), "{c}");
        }
        assert!(
            !size_failure(Kind::Db, None, None),
            "a lost connection is not about size"
        );
    }

    /// What PgBouncer 1.18 said, each seen in tests/central.rs or by hand.
    #[test]
    fn pgbouncers_own_errors_are_about_size_only_when_they_say_so() {
        let pooler = |m: &str| size_failure(Kind::Db, Some("08P01"), Some(m));
        assert!(
            pooler("bad packet header: '420000253f000000'"),
            "max_packet_size"
        );
        assert!(pooler("query timeout"), "PgBouncer's query_timeout");
        for m in [
            "query_wait_timeout",
            "database removed",
            "server conn crashed?",
            "pgbouncer cannot connect to server",
        ] {
            assert!(!pooler(m), "{m}");
        }
    }

    #[test]
    fn halves_down_to_one_then_gives_up() {
        let mut p = Pace::new(1000);
        let mut sizes = vec![p.size()];
        while p.failed_by_size(p.size()) == AfterSizeFailure::RetrySmaller {
            sizes.push(p.size());
        }
        assert_eq!(sizes, [1000, 500, 250, 125, 62, 31, 15, 7, 3, 1]);
        assert_eq!(p.failed_by_size(1), AfterSizeFailure::GiveUp);
    }

    #[test]
    fn batches_selected_before_a_halving_do_not_halve_again() {
        let mut p = Pace::new(1000);
        p.failed_by_size(1000);
        // The other seven of the pipeline, sent at 1000, fail the same way.
        for _ in 0..7 {
            assert_eq!(p.failed_by_size(1000), AfterSizeFailure::RetrySmaller);
        }
        assert_eq!(p.size(), 500);
    }

    #[test]
    fn grows_back_after_full_successes_only() {
        let mut p = Pace::new(1000);
        p.failed_by_size(1000);
        p.failed_by_size(500);
        assert_eq!(p.size(), 250);
        for _ in 0..GROW_AFTER * 3 {
            p.succeeded(100); // short batches: the end of the queue
        }
        assert_eq!(p.size(), 250);
        for _ in 0..GROW_AFTER - 1 {
            p.succeeded(250);
        }
        assert_eq!(p.size(), 250);
        p.succeeded(250);
        assert_eq!(p.size(), 500);
        for _ in 0..GROW_AFTER * 4 {
            p.succeeded(p.size());
        }
        assert_eq!(p.size(), 1000, "never above BATCH_SIZE");
    }

    /// A gateway's steady trickle after one halving (a timeout at 15 queued):
    /// batches of 7, 7, 1 each cycle. The full ones count across drains, so the
    /// size grows back; it stayed at 7 when each drain's streak began at 0. The
    /// only test that uses the process-wide memory.
    #[test]
    fn a_halved_size_grows_back_over_the_drains_of_a_trickle() {
        let mut p = Pace::new(20);
        p.failed_by_size(15);
        assert_eq!(p.size(), 7);
        p.remember();
        let mut batches = Vec::new();
        for _ in 0..20 {
            let mut p = Pace::resume(20);
            let (mut left, mut n) = (15, 0);
            while left > 0 {
                let b = left.min(p.size());
                p.succeeded(b);
                left -= b;
                n += 1;
            }
            batches.push(n);
            p.remember();
        }
        assert_eq!(
            Pace::resume(20).size(),
            20,
            "batches per cycle: {batches:?}"
        );
        assert_eq!(batches.last(), Some(&1), "{batches:?}");
        REMEMBERED.store(0, Ordering::Relaxed);
    }

    #[test]
    fn a_failure_resets_the_streak() {
        let mut p = Pace::new(100);
        p.failed_by_size(100);
        for _ in 0..GROW_AFTER - 1 {
            p.succeeded(50);
        }
        p.failed_by_size(50);
        for _ in 0..GROW_AFTER - 1 {
            p.succeeded(25);
        }
        assert_eq!(p.size(), 25);
    }

    /// A round trip that answers after `delay`, in pipeline order: it cannot finish
    /// before the ones sent earlier (as on one connection).
    async fn answer(prev: Option<Arc<Notify>>, done: Arc<Notify>, delay: Duration) -> u32 {
        if let Some(p) = prev {
            p.notified().await;
        }
        sleep(delay).await;
        done.notify_waiters();
        7
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_of_a_queued_statement_starts_at_the_head() {
        let pipe = Pipeline::default();
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let first_done = Arc::new(Notify::new());
        // The head takes 8 s (within its limit), the one behind it 5 s after that:
        // 13 s after it was queued, but only 5 s after it reached the head.
        let first = pipe.timed(
            limit,
            {
                let d = first_done.clone();
                async move { Ok(answer(None, d, Duration::from_secs(8)).await) }
            },
            || Error::timeout(Side::Central, "first", limit),
        );
        let second =
            pipe.timed(
                limit,
                {
                    let p = first_done.clone();
                    async move {
                        Ok(answer(Some(p), Arc::new(Notify::new()), Duration::from_secs(5)).await)
                    }
                },
                || Error::timeout(Side::Central, "second", limit),
            );
        let (a, b) = tokio::join!(first, second);
        assert_eq!((a.unwrap(), b.unwrap()), (7, 7));
        assert_eq!(start.elapsed(), Duration::from_secs(13));
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_still_times_out_after_its_limit() {
        let pipe = Pipeline::default();
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let r = pipe
            .timed(
                limit,
                async {
                    sleep(Duration::from_secs(3600)).await;
                    Ok(())
                },
                || Error::timeout(Side::Central, "stuck", limit),
            )
            .await;
        assert_eq!(r.unwrap_err().kind(), Kind::Timeout);
        assert_eq!(start.elapsed(), limit);
        // A statement that answers before it would have to wait is not held back.
        let start = Instant::now();
        let r = pipe.timed(limit, async { Ok(1) }, || unreachable!()).await;
        assert_eq!((r.unwrap(), start.elapsed()), (1, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_timeout_the_statements_queued_behind_fail_at_once() {
        // A dead link: nothing is ever answered. The head gives up after its limit,
        // and the seven behind it with it, not one limit after another.
        let pipe = Pipeline::default();
        let limit = Duration::from_secs(2);
        let start = Instant::now();
        let all: Vec<_> = (0..8)
            .map(|i| {
                pipe.timed(
                    limit,
                    async {
                        sleep(Duration::from_secs(3600)).await;
                        Ok(())
                    },
                    move || Error::timeout(Side::Central, format!("batch {i}"), limit),
                )
            })
            .collect();
        let results = futures_util::future::join_all(all).await;
        assert!(results
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.kind() == Kind::Timeout)));
        assert_eq!(start.elapsed(), limit);
        // Only the head waited its limit; the others say nothing about their size.
        let sized = results
            .iter()
            .filter(|r| r.as_ref().is_err_and(is_size_failure))
            .count();
        assert_eq!(sized, 1);
        // And so does anything sent on the dead connection afterwards.
        let r = pipe.timed(limit, async { Ok(1) }, || {
            Error::timeout(Side::Central, "late", limit)
        });
        assert!(
            r.await.is_ok(),
            "a statement that answers at once still succeeds"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_statement_whose_turn_never_lasts_its_limit_is_not_timed_out() {
        // Eight statements of 4 s each, limit 5 s: the last is answered at 32 s,
        // long after 5 s from being queued, yet none times out.
        let pipe = Pipeline::default();
        let limit = Duration::from_secs(5);
        let mut prev: Option<Arc<Notify>> = None;
        let mut all = Vec::new();
        for i in 0..8 {
            let done = Arc::new(Notify::new());
            let p = prev.replace(done.clone());
            all.push(pipe.timed(
                limit,
                async move { Ok(answer(p, done, Duration::from_secs(4)).await) },
                move || Error::timeout(Side::Central, format!("batch {i}"), limit),
            ));
        }
        let start = Instant::now();
        let results = futures_util::future::join_all(all).await;
        assert!(
            results.iter().all(|r| r.is_ok()),
            "{:?}",
            results.iter().filter(|r| r.is_err()).count()
        );
        assert_eq!(start.elapsed(), Duration::from_secs(32));
    }
}
