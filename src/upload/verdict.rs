//! When central refuses readings, whose fault is it? The rules that decide between
//! "this reading is bad: quarantine it" and "central refuses everything alike: keep
//! the readings queued and fail the phase" (SPEC P7, P24). Pure functions, so that
//! the rules can be read and tested apart from the database round trips.
//!
//! A refused range is split into at most [`FANOUT`] slices, sent together; the
//! refused slices are split again, the leftmost first, down to single readings.
//! The evidence that a refusal is not about rows is always about single readings
//! ([`batch_fault`]):
//!
//! - [`FANOUT`] (16) or more consecutive readings of a batch, adjacent in the
//!   table too (consecutive ids), each refused on its own with the same SQLSTATE: a missing partition for this month, a new NOT NULL
//!   column, a revoked privilege or a trigger raising during maintenance refuse
//!   every reading (and, across a month boundary, every reading from the first of
//!   the month on), while poison readings lie here and there among good ones;
//! - or a whole batch of fewer readings, adjacent likewise, every one of them
//!   refused alike.
//!
//! Sixteen consecutive readings refused alike cannot be told apart from sixteen
//! poison readings in a row; the rules take the reading of central's fault, because
//! that one loses nothing: the readings wait, the phase fails and says why. Proving
//! it reading by reading would cost a statement (and an ERROR in central's log) per
//! reading of the batch, in every cycle, from every gateway; this costs about 40.

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

/// One single reading central refused: its position in the batch, its local id,
/// and the SQLSTATE.
pub type Refused<'a> = (usize, i64, &'a str);

/// Judges a batch of `batch_len` readings from the single readings central has
/// refused so far, positions ascending.
pub fn batch_fault(batch_len: usize, refused: &[Refused]) -> Fault {
    let whole = batch_len >= 2
        && refused.len() == batch_len
        && refused
            .windows(2)
            .all(|w| adjacent(w[0], w[1]) && w[0].2 == w[1].2);
    if whole || alike_run(refused).is_some() {
        Fault::Central
    } else {
        Fault::Rows
    }
}

/// Two refused readings next to each other in the batch and in the table: no
/// reading was written between them. Readings left over from an earlier cycle
/// (poison readings whose good neighbours went through) are next to each other in
/// the batch only, and are no evidence against central.
fn adjacent(a: Refused, b: Refused) -> bool {
    b.0 == a.0 + 1 && b.1 == a.1 + 1
}

/// The longest run of adjacent readings (see [`adjacent`]) that central refused
/// with the same SQLSTATE, if it is [`FANOUT`] or longer: then the fault is
/// central's. Returns (length, SQLSTATE).
pub fn alike_run(refused: &[Refused]) -> Option<(usize, String)> {
    let mut best: Option<(usize, String)> = None;
    let mut i = 0;
    while i < refused.len() {
        let mut j = i + 1;
        while j < refused.len()
            && adjacent(refused[j - 1], refused[j])
            && refused[j].2 == refused[i].2
        {
            j += 1;
        }
        if j - i >= FANOUT && best.as_ref().is_none_or(|b| j - i > b.0) {
            best = Some((j - i, refused[i].2.to_string()));
        }
        i = j;
    }
    best
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

/// Decides on the candidates, given their SQLSTATEs in queue order, how many
/// readings central accepted in the same drain, and how many were quarantined
/// already in this cycle (unreadable local rows).
///
/// When central accepted nothing at all and refused every candidate alike (a
/// lone reading, or batches of one), there is no evidence that any reading is at
/// fault: none is quarantined. Otherwise the candidates are quarantined up to the
/// cap per cycle.
pub fn decide(codes: &[&str], accepted: u64, quarantined: u64) -> Decision {
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
    let room = MAX_QUARANTINED_PER_CYCLE.saturating_sub(quarantined);
    let n = codes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
    let hold = (n < codes.len()).then(|| {
        format!(
            "quarantine cap reached: at most {MAX_QUARANTINED_PER_CYCLE} readings are quarantined \
             per cycle; {} more refused reading(s) stay queued for the next cycle",
            codes.len() - n
        )
    });
    Decision {
        quarantine: n,
        hold,
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

    /// Refused readings at these positions, with ids following the positions (as
    /// the collector writes them) from 1000 on.
    fn at(positions: impl IntoIterator<Item = usize>, code: &str) -> Vec<(usize, i64, String)> {
        positions
            .into_iter()
            .map(|p| (p, 1000 + p as i64, code.to_string()))
            .collect()
    }

    fn fault(batch_len: usize, refused: &[(usize, i64, String)]) -> Fault {
        let r: Vec<Refused> = refused
            .iter()
            .map(|(p, i, c)| (*p, *i, c.as_str()))
            .collect();
        batch_fault(batch_len, &r)
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
    fn leftovers_of_earlier_cycles_are_no_evidence() {
        // A batch made only of poison readings whose good neighbours went through
        // in an earlier cycle: next to each other in the batch, not in the table.
        let left: Vec<(usize, i64, String)> = (0..30)
            .map(|p| (p, 10 * p as i64, "23514".to_string()))
            .collect();
        assert_eq!(fault(30, &left), Fault::Rows);
        assert_eq!(fault(3, &left[..3]), Fault::Rows);
    }

    #[test]
    fn runs_need_adjacent_readings_with_one_sqlstate() {
        let run = |r: &[(usize, i64, String)]| {
            let r: Vec<Refused> = r.iter().map(|(p, i, c)| (*p, *i, c.as_str())).collect();
            alike_run(&r)
        };
        assert_eq!(run(&at(50..100, "23514")), Some((50, "23514".into())));
        assert_eq!(run(&at([3, 17, 18, 40, 41, 42], "23514")), None);
        assert_eq!(run(&at(0..15, "23514")), None);
        let mut broken = at(0..20, "23514");
        broken[10].2 = "23503".into();
        assert_eq!(run(&broken), None);
        // The longest run counts.
        let two = [at(0..16, "23514"), at(30..50, "23502")].concat();
        assert_eq!(run(&two), Some((20, "23502".into())));
    }

    #[test]
    fn candidates_are_quarantined_when_central_accepted_others() {
        assert_eq!(
            decide(&["23514"], 99, 0),
            Decision {
                quarantine: 1,
                hold: None
            }
        );
        assert_eq!(decide(&["42501"; 60], 540, 0).quarantine, 60);
        assert_eq!(decide(&[], 0, 0).hold, None);
    }

    #[test]
    fn nothing_accepted_and_all_refused_alike_quarantines_nothing() {
        let d = decide(&["23514"], 0, 0);
        assert_eq!(d.quarantine, 0);
        assert!(d.hold.unwrap().contains("SQLSTATE 23514"));
        // Different reasons are about the readings, even with nothing accepted.
        assert_eq!(decide(&["23514", "23503"], 0, 0).quarantine, 2);
    }

    #[test]
    fn the_cap_counts_the_whole_cycle() {
        let many = vec!["23514"; 150];
        let d = decide(&many, 10, 0);
        assert_eq!(d.quarantine, MAX_QUARANTINED_PER_CYCLE as usize);
        assert!(d.hold.unwrap().contains("50 more"));
        let d = decide(&["23514"; 5], 10, MAX_QUARANTINED_PER_CYCLE - 2);
        assert_eq!(d.quarantine, 2);
        assert!(d.hold.is_some());
    }
}
