-- The resend window (UPLOAD_RETAIN_HOURS > 0): an uploaded reading is kept, marked
-- is_synchronized, with the time central acknowledged it, so that
-- `meter-sync resend --since` can queue again what a central restored from an older
-- backup lost, and the purge can find what has outlived the window. Rows marked
-- is_synchronized by something else (no synced_at) are never purged or resent.
ALTER TABLE meter_readings ADD COLUMN IF NOT EXISTS synced_at timestamptz;

CREATE INDEX IF NOT EXISTS meter_readings_retained_idx
    ON meter_readings (synced_at)
    WHERE is_synchronized AND synced_at IS NOT NULL;
