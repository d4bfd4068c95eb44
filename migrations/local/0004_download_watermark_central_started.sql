-- Which central server (history) a download watermark came from (docs/download.md,
-- "A restored or replaced central"): central's pg_postmaster_start_time() when the
-- watermark was read. Central's transaction ids only mean something within the
-- history of one running server; a restore from a backup or a promoted standby is
-- always another postmaster, with another start time, and the watermark is then not
-- trusted until a full reconciliation has run. NULL (a watermark written before this
-- migration): unknown, so the next download is a full one.
ALTER TABLE download_watermark ADD COLUMN IF NOT EXISTS central_started timestamptz;
