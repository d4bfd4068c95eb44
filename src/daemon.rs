//! The run loop: cycle, report, pause `SYNC_INTERVAL_SECONDS`, until shutdown.

use crate::config::Config;
use crate::cycle::{self, Connections};
use crate::error::Result;
use crate::shutdown::Shutdown;

/// Cycles until `shutdown` is requested. The pause runs from the end of one cycle
/// to the start of the next, so a long drain never makes cycles overlap.
pub async fn run(cfg: &Config, shutdown: Shutdown) -> Result<()> {
    crate::notify::init();
    crate::notify::ready();
    log::info!(
        "meter-sync {} running; cycle every {} s",
        env!("CARGO_PKG_VERSION"),
        cfg.sync_interval.as_secs()
    );
    let mut conns = Connections::default();
    loop {
        let report = cycle::run(cfg, &mut conns, &shutdown).await;
        crate::notify::status(&report.summary());
        if !shutdown.sleep(cfg.sync_interval).await {
            break;
        }
    }
    crate::notify::stopping();
    conns.close();
    log::info!("meter-sync stopped");
    Ok(())
}
