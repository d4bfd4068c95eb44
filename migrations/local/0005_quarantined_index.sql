-- Counts the quarantine (every cycle's start line, the heartbeat after every cycle,
-- `status`) through an index of its own, as the queue is counted through
-- meter_readings_pending_idx: without it the count read the whole table, the
-- readings retained for the resend window (UPLOAD_RETAIN_HOURS) included. Small:
-- quarantined readings are few (at most 100 more per cycle).
CREATE INDEX IF NOT EXISTS meter_readings_quarantined_idx
    ON meter_readings (id)
    WHERE NOT is_synchronized AND sync_error IS NOT NULL;
