//! What a cycle did: the phases, each phase's outcome, the cycle's report. Leaf
//! types that every layer may use (the phases produce them, the daemon, the
//! metrics file and systemd's STATUS= read them).

use std::time::Duration;

use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Upload,
    Meters,
    Tenant,
}

impl Phase {
    /// Every phase, in the order a cycle runs them.
    pub const ALL: [Phase; 3] = [Phase::Upload, Phase::Meters, Phase::Tenant];

    /// The `sync_logs.sync_type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Upload => "upload",
            Phase::Meters => "meters",
            Phase::Tenant => "tenant",
        }
    }

    /// Its position in [`Phase::ALL`], for per-phase arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The counts a phase reports back when it succeeds.
pub struct PhaseResult {
    pub records: u64,
    /// A human summary of the counts ("uploaded 300 in 3 batches, 0 quarantined").
    pub summary: String,
}

/// A phase that ended with an error after it had done `records` of its work (an
/// upload cut short by central delivered its readings all the same). An error
/// before any of it converts with `?`.
pub struct PhaseFailed {
    pub records: u64,
    pub error: Error,
}

impl From<Error> for PhaseFailed {
    fn from(error: Error) -> PhaseFailed {
        PhaseFailed { records: 0, error }
    }
}

/// What one phase did.
#[derive(Clone, Debug)]
pub struct PhaseOutcome {
    pub phase: Phase,
    /// Also of a phase that failed part way: an upload cut short by central
    /// delivered its readings all the same.
    pub records: u64,
    pub duration: Duration,
    pub error: Option<String>,
    pub summary: String,
}

impl PhaseOutcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What one cycle did.
#[derive(Clone, Debug)]
pub struct CycleReport {
    pub phases: Vec<PhaseOutcome>,
    pub duration: Duration,
}

impl CycleReport {
    /// Every phase ran (shutdown did not cut the cycle short) and succeeded.
    pub fn complete_and_ok(&self) -> bool {
        self.phases.len() == Phase::ALL.len() && self.ok()
    }

    /// No phase that ran failed.
    pub fn ok(&self) -> bool {
        self.phases.iter().all(PhaseOutcome::ok)
    }

    /// One line for logs and systemd's STATUS=: each phase's counts and duration,
    /// then the cycle's.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|p| {
                let what = match &p.error {
                    None => p.summary.as_str(),
                    Some(_) => "FAILED",
                };
                format!(
                    "{}: {what} ({} ms)",
                    p.phase.as_str(),
                    p.duration.as_millis()
                )
            })
            .collect();
        format!(
            "{}; {} ms in all",
            parts.join("; "),
            self.duration.as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_index_follows_all() {
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
        }
    }

    #[test]
    fn a_cycle_cut_short_is_not_complete() {
        let ok = |phase| PhaseOutcome {
            phase,
            records: 0,
            duration: Duration::ZERO,
            error: None,
            summary: String::new(),
        };
        let short = CycleReport {
            phases: vec![ok(Phase::Upload)],
            duration: Duration::ZERO,
        };
        assert!(short.ok() && !short.complete_and_ok());
        let full = CycleReport {
            phases: Phase::ALL.into_iter().map(ok).collect(),
            duration: Duration::ZERO,
        };
        assert!(full.complete_and_ok());
    }
}
