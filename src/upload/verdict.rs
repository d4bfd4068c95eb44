//! When central refuses readings, whose fault is it? The rules that decide between
//! "this reading is bad: quarantine it" and "central refuses everything alike: keep
//! the readings queued and fail the phase" (SPEC P7, P24). Pure functions, so that
//! the rules can be read and tested apart from the database round trips.
//!
//! A refused range is split into at most [`FANOUT`] slices, sent together; the
//! refused slices are split again, the leftmost first, down to single readings.
//! Central's fault shows as refusals that go on "from here on": a missing partition
//! for this month, a new NOT NULL column, a revoked privilege or a trigger raising
//! during maintenance refuse every reading (across a month boundary, every reading
//! from the first of the month on), while poison readings lie among good ones that
//! central accepts, older and newer. The evidence:
//!
//! - within a batch ([`batch_fault`]): [`FANOUT`] (16) or more readings in a row of
//!   the batch refused alone with the same SQLSTATE, or a whole batch of fewer,
//!   every one refused alike; confirmed only when central refuses alike, each alone,
//!   the newest readings queued after that batch too ([`newest_refused_alike`]);
//! - over the drain ([`decide`]): 16 or more refused readings after the last one
//!   central accepted, refused alike (the batch that crosses into the month without
//!   a partition, at the end of the queue, with nothing after it to confirm by).
//!
//! The readings' ids (and their order among themselves) are no evidence either
//! way: a collector that writes each meter's readings as a block interleaves two
//! runs of ids in queue order. What the confirmation protects is the readings left
//! over from an earlier cycle: poison readings past the cap, whose good neighbours
//! went through, stand in a row at the head of the queue and look, within their
//! batch, exactly like central's fault; held as such, they would stop the queue
//! behind them in every cycle and never be quarantined. Newer readings that central
//! accepts (the collector writes on) tell them apart. (Consecutive ids used to be
//! the test: leftovers fail it, but so does a month boundary met by readings that
//! a collector wrote one meter at a time, and 100 valid readings were quarantined.)
//!
//! Sixteen readings in a row refused alike, with the newest refused alike too,
//! cannot be told apart from poison readings up to the newest; the rules take the
//! reading of central's fault, because that one loses nothing: the readings wait,
//! the phase fails and says why. Proving it reading by reading would cost a
//! statement (and an ERROR in central's log) per reading of the batch, in every
//! cycle, from every gateway; this costs about 60.

use std::ops::Range;

/// How many slices a refused range is split into at once (one round trip).
pub const FANOUT: usize = 16;

/// At most this many readings are quarantined in one cycle, however they were
/// refused: a central fault that slipped past the rules above (a foreign key to a
/// table being reloaded refuses the readings of some meters but not of others)
/// then costs at most this many readings to `requeue`, not the queue.
pub const MAX_QUARANTINED_PER_CYCLE: u64 = 100;

/// `range` cut into `min(len, FANOUT)` consecutive slices whose lengths differ by
/// at most one, in order.
pub fn slices(range: Range<usize>) -> Vec<Range<usize>> {
    let n = range.len();
    let k = n.min(FANOUT);
    let mut out = Vec::with_capacity(k);
    let mut start = range.start;
    for i in 0..k {
        let len = n / k + usize::from(i < n % k);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Whose fault a refusal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Central refuses the readings alike: nothing may be quarantined.
    Central,
    /// Some readings are bad (or there is not enough evidence yet): go on.
    Rows,
}

/// One single reading central refused: its position in the batch and the
/// SQLSTATE.
pub type Refused<'a> = (usize, &'a str);

/// Judges a batch of `batch_len` readings from the single readings central has
/// refused so far, positions ascending. [`Fault::Central`] here is a suspicion, to
/// be confirmed by the newest readings ([`newest_refused_alike`]): within one batch
/// the leftovers of an earlier cycle look the same.
pub fn batch_fault(batch_len: usize, refused: &[Refused]) -> Fault {
    let whole =
        batch_len >= 2 && refused.len() == batch_len && refused.iter().all(|r| r.1 == refused[0].1);
    if whole || alike_run(refused).is_some() {
        Fault::Central
    } else {
        Fault::Rows
    }
}

/// The longest run of readings next to each other in the batch that central
/// refused with the same SQLSTATE, if it is [`FANOUT`] or longer. Returns (length,
/// SQLSTATE).
pub fn alike_run(refused: &[Refused]) -> Option<(usize, String)> {
    let mut best: Option<(usize, String)> = None;
    let mut i = 0;
    while i < refused.len() {
        let mut j = i + 1;
        while j < refused.len()
            && refused[j].0 == refused[j - 1].0 + 1
            && refused[j].1 == refused[i].1
        {
            j += 1;
        }
        if j - i >= FANOUT && best.as_ref().is_none_or(|b| j - i > b.0) {
            best = Some((j - i, refused[i].1.to_string()));
        }
        i = j;
    }
    best
}

/// Whether central's answers to the newest queued readings, each sent alone
/// (`None`: accepted, `Some(code)`: refused with that SQLSTATE), confirm a
/// suspicion of central's fault with SQLSTATE `code`: every one refused alike.
/// One accepted reading is enough to clear central: it takes readings written now,
/// so what it refused further back is about those readings (leftovers of an
/// earlier cycle, or a broken meter among good ones). No answers confirm nothing.
pub fn newest_refused_alike(code: &str, answers: &[Option<&str>]) -> bool {
    !answers.is_empty() && answers.iter().all(|a| *a == Some(code))
}

/// What to do with the single readings central refused in one drain (the
/// candidates), decided once the drain is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Quarantine this many candidates, the oldest first.
    pub quarantine: usize,
    /// The phase fails with this reason; the candidates not quarantined stay queued.
    pub hold: Option<String>,
}

/// Decides on the candidates, given their SQLSTATEs in queue order, how many of
/// the last of them come after the last reading central accepted in the same drain
/// (`after`), how many readings central accepted in the drain, and how many were
/// quarantined already in this cycle (unreadable local rows).
///
/// When central accepted nothing at all and refused every candidate alike (a
/// lone reading, or batches of one), there is no evidence that any reading is at
/// fault: none is quarantined. When [`FANOUT`] or more candidates after the last
/// accepted reading were refused alike, central refuses from there on: those stay
/// queued (the earlier candidates are judged as usual). A shorter tail is
/// quarantined like any other candidate: a poison reading may well be the newest.
/// The candidates are quarantined up to the cap per cycle.
pub fn decide(codes: &[&str], after: usize, accepted: u64, quarantined: u64) -> Decision {
    if codes.is_empty() {
        return Decision {
            quarantine: 0,
            hold: None,
        };
    }
    if accepted == 0 && codes.iter().all(|c| *c == codes[0]) {
        return Decision {
            quarantine: 0,
            hold: Some(format!(
                "central refused all {} reading(s) it was sent in this cycle alike (SQLSTATE {}) \
                 and accepted none: no evidence that the readings are at fault, so none is \
                 quarantined; they stay queued",
                codes.len(),
                codes[0]
            )),
        };
    }
    let after = after.min(codes.len());
    let last = codes[codes.len() - 1];
    let tail = codes[codes.len() - after..]
        .iter()
        .rev()
        .take_while(|c| **c == last)
        .count();
    let (judged, held) = if tail >= FANOUT {
        (codes.len() - tail, Some(tail))
    } else {
        (codes.len(), None)
    };
    let room = MAX_QUARANTINED_PER_CYCLE.saturating_sub(quarantined);
    let n = judged.min(usize::try_from(room).unwrap_or(usize::MAX));
    let mut why = Vec::new();
    if let Some(tail) = held {
        why.push(format!(
            "central refused the last {tail} reading(s) it was sent alike (SQLSTATE {last}) and \
             accepted none after them, so the fault is central's, not the readings': nothing \
             quarantined of those, they stay queued until central is fixed"
        ));
    }
    if n < judged {
        why.push(format!(
            "quarantine cap reached: at most {MAX_QUARANTINED_PER_CYCLE} readings are quarantined \
             per cycle; {} more refused reading(s) stay queued for the next cycle",
            judged - n
        ));
    }
    Decision {
        quarantine: n,
        hold: (!why.is_empty()).then(|| why.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_range_in_order_evenly() {
        for (range, lens) in [
            (0..1, vec![1]),
            (0..5, vec![1; 5]),
            (10..26, vec![1; 16]),
            (0..17, [vec![2], vec![1; 15]].concat()),
            (0..100, [vec![7; 4], vec![6; 12]].concat()),
        ] {
            let s = slices(range.clone());
            assert_eq!(s.iter().map(|r| r.len()).collect::<Vec<_>>(), lens);
            assert_eq!(s.first().unwrap().start, range.start);
            assert_eq!(s.last().unwrap().end, range.end);
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    /// Refused readings at these positions.
    fn at(positions: impl IntoIterator<Item = usize>, code: &str) -> Vec<(usize, String)> {
        positions
            .into_iter()
            .map(|p| (p, code.to_string()))
            .collect()
    }

    fn refused(r: &[(usize, String)]) -> Vec<Refused<'_>> {
        r.iter().map(|(p, c)| (*p, c.as_str())).collect()
    }

    fn fault(batch_len: usize, r: &[(usize, String)]) -> Fault {
        batch_fault(batch_len, &refused(r))
    }

    #[test]
    fn a_whole_batch_refused_alike_is_centrals_fault() {
        // A missing partition, a new NOT NULL column, a missing INSERT privilege:
        // the first 16 readings of the batch are enough.
        assert_eq!(fault(100, &at(0..16, "23514")), Fault::Central);
        assert_eq!(fault(5000, &at(0..20, "42501")), Fault::Central);
        // A small batch, every reading of it.
        assert_eq!(fault(3, &at(0..3, "23502")), Fault::Central);
    }

    #[test]
    fn the_refused_tail_of_a_batch_is_centrals_fault() {
        // The batch that crosses into a month without a partition.
        assert_eq!(fault(100, &at(50..100, "23514")), Fault::Central);
    }

    #[test]
    fn readings_refused_here_and_there_are_the_rows() {
        // One poison reading; a broken meter among five (every fifth reading); row
        // level security refusing one meter of ten.
        assert_eq!(fault(100, &at([37], "23514")), Fault::Rows);
        assert_eq!(fault(100, &at((0..100).step_by(5), "23514")), Fault::Rows);
        assert_eq!(fault(600, &at((3..600).step_by(10), "42501")), Fault::Rows);
        // Fifteen in a row inside a larger batch; a small batch not wholly refused;
        // a small batch refused for different reasons.
        assert_eq!(fault(100, &at(20..35, "23514")), Fault::Rows);
        assert_eq!(fault(5, &at(0..4, "23514")), Fault::Rows);
        let mixed = [at([0], "23514"), at([1], "23503")].concat();
        assert_eq!(fault(2, &mixed), Fault::Rows);
        // A batch of one has nothing to compare with: decided over the drain.
        assert_eq!(fault(1, &at([0], "23514")), Fault::Rows);
    }

    #[test]
    fn the_newest_readings_tell_leftovers_from_centrals_fault() {
        // Leftovers of an earlier cycle and a month without a partition look the
        // same within a batch; the newest readings central takes clear central.
        assert!(newest_refused_alike("23514", &[Some("23514"); 16]));
        assert!(newest_refused_alike("23514", &[Some("23514")]));
        let mut one_taken = vec![Some("23514"); 16];
        one_taken[9] = None;
        assert!(!newest_refused_alike("23514", &one_taken));
        assert!(!newest_refused_alike(
            "23514",
            &[Some("23514"), Some("23503")]
        ));
        // Nothing queued after the batch: nothing to confirm by.
        assert!(!newest_refused_alike("23514", &[]));
    }

    #[test]
    fn runs_need_readings_in_a_row_with_one_sqlstate() {
        let run = |r: &[(usize, String)]| alike_run(&refused(r));
        assert_eq!(run(&at(50..100, "23514")), Some((50, "23514".into())));
        assert_eq!(run(&at([3, 17, 18, 40, 41, 42], "23514")), None);
        assert_eq!(run(&at(0..15, "23514")), None);
        let mut broken = at(0..20, "23514");
        broken[10].1 = "23503".into();
        assert_eq!(run(&broken), None);
        // The longest run counts.
        let two = [at(0..16, "23514"), at(30..50, "23502")].concat();
        assert_eq!(run(&two), Some((20, "23502".into())));
    }

    #[test]
    fn candidates_are_quarantined_when_central_accepted_others() {
        assert_eq!(
            decide(&["23514"], 0, 99, 0),
            Decision {
                quarantine: 1,
                hold: None
            }
        );
        assert_eq!(decide(&["42501"; 60], 0, 540, 0).quarantine, 60);
        assert_eq!(decide(&[], 0, 0, 0).hold, None);
    }

    #[test]
    fn nothing_accepted_and_all_refused_alike_quarantines_nothing() {
        let d = decide(&["23514"], 1, 0, 0);
        assert_eq!(d.quarantine, 0);
        assert!(d.hold.unwrap().contains("SQLSTATE 23514"));
        // Different reasons are about the readings, even with nothing accepted.
        assert_eq!(decide(&["23514", "23503"], 2, 0, 0).quarantine, 2);
    }

    #[test]
    fn the_cap_counts_the_whole_cycle() {
        let many = vec!["23514"; 150];
        let d = decide(&many, 0, 10, 0);
        assert_eq!(d.quarantine, MAX_QUARANTINED_PER_CYCLE as usize);
        assert!(d.hold.unwrap().contains("50 more"));
        let d = decide(&["23514"; 5], 0, 10, MAX_QUARANTINED_PER_CYCLE - 2);
        assert_eq!(d.quarantine, 2);
        assert!(d.hold.is_some());
    }

    #[test]
    fn sixteen_refused_alike_after_the_last_accepted_reading_stay_queued() {
        // 30 readings of last month went in, then 70 of this month refused (the
        // queue ends there: nothing after them to confirm by).
        let d = decide(&["23514"; 70], 70, 30, 0);
        assert_eq!(d.quarantine, 0);
        assert!(d.hold.unwrap().contains("central's"));
        // A poison reading before them is still judged.
        let codes = [vec!["23503"], vec!["23514"; 20]].concat();
        let d = decide(&codes, 20, 30, 0);
        assert_eq!(d.quarantine, 1);
        assert!(d.hold.is_some());
        // Fewer than 16 after the last accepted reading: judged like the others
        // (a broken meter's reading may be the newest).
        assert_eq!(decide(&["23514"; 15], 15, 30, 0).quarantine, 15);
        assert_eq!(decide(&["23514"; 40], 1, 200, 0).quarantine, 40);
        // The tail counts only the refusals alike with the last one.
        let codes = [vec!["23514"; 20], vec!["23503"]].concat();
        assert_eq!(decide(&codes, 21, 30, 0).quarantine, 21);
    }
}
