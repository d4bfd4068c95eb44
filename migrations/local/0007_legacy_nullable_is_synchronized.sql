-- A collector's own meter_readings whose is_synchronized is nullable: a collector
-- that writes NULL there (an ORM that writes every mapped column) made readings the
-- upload never saw, never counted and never purged, since NULL is neither true nor
-- false. Such a table gets a trigger that writes false for NULL, as the column's
-- default would, and the readings already written with NULL are queued. NOT NULL
-- instead would make the collector's inserts fail. A table our migrations made has
-- the column NOT NULL and is left as it is.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'meter_readings'
                 AND column_name = 'is_synchronized' AND is_nullable = 'YES') THEN
        CREATE OR REPLACE FUNCTION meter_readings_unsynchronized_by_default() RETURNS trigger
        LANGUAGE plpgsql AS $f$
        BEGIN
            NEW.is_synchronized := coalesce(NEW.is_synchronized, false);
            RETURN NEW;
        END
        $f$;
        DROP TRIGGER IF EXISTS meter_readings_unsynchronized_by_default ON meter_readings;
        CREATE TRIGGER meter_readings_unsynchronized_by_default
            BEFORE INSERT OR UPDATE OF is_synchronized ON meter_readings
            FOR EACH ROW EXECUTE FUNCTION meter_readings_unsynchronized_by_default();
        UPDATE meter_readings SET is_synchronized = false WHERE is_synchronized IS NULL;
    END IF;
END
$$;
