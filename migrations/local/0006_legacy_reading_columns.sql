-- A collector's own, older meter_readings may lack columns the upload reads; 0001
-- added only reading_uid, sync_attempts and sync_error, so such a table migrated
-- cleanly and then failed every upload ("column r.metadata does not exist").
-- created_at stays NULL for the readings already there (when they were written is
-- not known) and is now() for new ones. The catalog is asked first so that a table
-- that has both (every table our migrations made) is not even locked.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema()
                     AND table_name = 'meter_readings' AND column_name = 'metadata') THEN
        ALTER TABLE meter_readings ADD COLUMN metadata jsonb;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema()
                     AND table_name = 'meter_readings' AND column_name = 'created_at') THEN
        ALTER TABLE meter_readings ADD COLUMN created_at timestamptz;
        ALTER TABLE meter_readings ALTER COLUMN created_at SET DEFAULT now();
    END IF;
END
$$;
