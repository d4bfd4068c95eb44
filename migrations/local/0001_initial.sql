-- Local (gateway) schema. The collector writes meter_id, timestamp, value, unit and
-- metadata; every other column has a default. IF NOT EXISTS and ADD COLUMN IF NOT
-- EXISTS let this run on a gateway whose collector already created meter_readings
-- with the seed's columns.

CREATE TABLE IF NOT EXISTS meter_readings (
    id              bigserial PRIMARY KEY,
    reading_uid     uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    meter_id        varchar(255) NOT NULL,
    "timestamp"     timestamptz NOT NULL,
    value           numeric NOT NULL,
    unit            varchar(50) NOT NULL,
    metadata        jsonb,
    is_synchronized boolean NOT NULL DEFAULT false,
    created_at      timestamptz DEFAULT now(),
    sync_attempts   integer NOT NULL DEFAULT 0,
    sync_error      text
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema()
                     AND table_name = 'meter_readings' AND column_name = 'reading_uid') THEN
        ALTER TABLE meter_readings ADD COLUMN reading_uid uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE;
    END IF;
END
$$;
ALTER TABLE meter_readings ADD COLUMN IF NOT EXISTS sync_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE meter_readings ADD COLUMN IF NOT EXISTS sync_error text;

-- Serves the upload's only query: unsynchronized, not quarantined, oldest first.
CREATE INDEX IF NOT EXISTS meter_readings_pending_idx
    ON meter_readings ("timestamp", id)
    WHERE NOT is_synchronized AND sync_error IS NULL;

CREATE TABLE IF NOT EXISTS meters (
    meter_id      varchar(255) PRIMARY KEY,
    name          varchar(255) NOT NULL,
    location_id   varchar(255),
    meter_type    varchar(50) NOT NULL,
    unit          varchar(50) NOT NULL,
    configuration jsonb,
    updated_at    timestamptz,
    synced_at     timestamptz
);

CREATE TABLE IF NOT EXISTS tenant (
    tenant_id     varchar(255) PRIMARY KEY,
    name          varchar(255) NOT NULL,
    configuration jsonb,
    metadata      jsonb,
    updated_at    timestamptz,
    synced_at     timestamptz
);

CREATE TABLE IF NOT EXISTS sync_logs (
    id                bigserial PRIMARY KEY,
    sync_type         varchar(20) NOT NULL CHECK (sync_type IN ('upload', 'meters', 'tenant')),
    success           boolean NOT NULL,
    records_processed integer NOT NULL DEFAULT 0,
    error_message     text,
    duration_ms       bigint,
    "timestamp"       timestamptz DEFAULT now()
);

CREATE INDEX IF NOT EXISTS sync_logs_timestamp_idx ON sync_logs ("timestamp");
