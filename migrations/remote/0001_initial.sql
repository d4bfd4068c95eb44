-- Central schema. meter_readings has no is_synchronized and no default for
-- reading_uid: the gateway assigns identity at birth. The unique key includes
-- "timestamp" so that an operator may create the table declaratively partitioned
-- by it instead (see README); IF NOT EXISTS then leaves that table alone.

CREATE TABLE IF NOT EXISTS meter_readings (
    id            bigserial PRIMARY KEY,
    reading_uid   uuid NOT NULL,
    meter_id      varchar(255) NOT NULL,
    "timestamp"   timestamptz NOT NULL,
    value         numeric NOT NULL,
    unit          varchar(50) NOT NULL,
    metadata      jsonb,
    created_at    timestamptz DEFAULT now(),
    sync_attempts integer NOT NULL DEFAULT 0,
    sync_error    text,
    CONSTRAINT meter_readings_reading_uid_timestamp_key UNIQUE (reading_uid, "timestamp")
);

CREATE INDEX IF NOT EXISTS meter_readings_meter_id_timestamp_idx ON meter_readings (meter_id, "timestamp");

CREATE TABLE IF NOT EXISTS meters (
    meter_id      varchar(255) PRIMARY KEY,
    name          varchar(255) NOT NULL,
    location_id   varchar(255),
    meter_type    varchar(50) NOT NULL,
    unit          varchar(50) NOT NULL,
    configuration jsonb,
    updated_at    timestamptz
);

CREATE TABLE IF NOT EXISTS tenant (
    tenant_id     varchar(255) PRIMARY KEY,
    name          varchar(255) NOT NULL,
    configuration jsonb,
    metadata      jsonb,
    updated_at    timestamptz
);
