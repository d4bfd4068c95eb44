-- The fleet heartbeat (SPEC §8): one row per gateway, upserted by the gateway after
-- every cycle in one round trip. Operators read it to find gateways that went
-- silent, fell behind, or whose client certificate is about to expire
-- (docs/security.md has the queries and an optional row-level security recipe,
-- deploy/central/gateway-status-rls.sql).
--
-- Every column but the key is nullable: a gateway reports what it knows (queue
-- columns are null when its local database was unreachable, cert_expires_at when
-- it authenticates without a client certificate, the byte counts when its central
-- connection is not TLS).

CREATE TABLE IF NOT EXISTS gateway_status (
    gateway_id        text PRIMARY KEY,
    version           text,
    last_cycle_at     timestamptz,
    last_cycle_ok     boolean,
    last_error        text,
    queue_size        bigint,
    oldest_pending_at timestamptz,
    quarantined       bigint,
    cert_expires_at   timestamptz,
    bytes_up          bigint,
    bytes_down        bigint,
    updated_at        timestamptz
) WITH (fillfactor = 50);

-- Deliberately no index but the key: every gateway rewrites its row every cycle
-- (10,000 gateways at one cycle a minute: ~170 updates/s), and an update that
-- touches no indexed column stays a HOT update on the same page (hence the free
-- space of fillfactor 50). The operators' queries scan 10,000 short rows in
-- milliseconds.
