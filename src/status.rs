//! `meter-sync status [--json]`.

use crate::config::Config;
use crate::error::{Error, Kind, Result};

/// Prints the status; returns the exit code.
pub async fn print(_cfg: &Config, _json: bool) -> Result<u8> {
    Err(Error::new(Kind::Other, "status: not implemented"))
}
