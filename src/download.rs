//! Download: bring the local `meters` and `tenant` tables in line with central,
//! logging what is new and which fields changed.

use crate::cycle::PhaseResult;
use crate::db::Db;
use crate::error::{Error, Kind, Result};

pub async fn sync_meters(_local: &mut Db, _central: &mut Db) -> Result<PhaseResult> {
    Err(Error::new(Kind::Other, "meters download: not implemented"))
}

pub async fn sync_tenants(_local: &mut Db, _central: &mut Db) -> Result<PhaseResult> {
    Err(Error::new(Kind::Other, "tenant download: not implemented"))
}
