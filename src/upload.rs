//! Upload: select a batch of unsynchronized readings, insert it into central in
//! one atomic statement, then delete exactly those rows locally.

use crate::config::Config;
use crate::cycle::PhaseResult;
use crate::db::Db;
use crate::error::{Error, Kind, Result};
use crate::shutdown::Shutdown;

/// Drains the queue until it is empty, shutdown is requested or the time budget is spent.
pub async fn drain(
    _cfg: &Config,
    _local: &mut Db,
    _central: &mut Db,
    _shutdown: &Shutdown,
) -> Result<PhaseResult> {
    Err(Error::new(Kind::Other, "upload: not implemented"))
}

/// Clears the quarantine of the given readings (all when `ids` is None). Returns how many.
pub async fn requeue(_local: &Db, _ids: Option<&[i64]>) -> Result<u64> {
    Err(Error::new(Kind::Other, "requeue: not implemented"))
}
