-- Optional: each gateway may read and write only its own gateway_status row.
--
-- For a fleet where every gateway logs in to central with a role of its own and
-- its METER_SYNC_GATEWAY_ID is that role's name. Apply once, as the owner of
-- gateway_status (the privileged role that ran `meter-sync migrate remote`), after
-- that migration:
--
--     psql -v ON_ERROR_STOP=1 -d meters -f gateway-status-rls.sql
--
-- then make each gateway's role a member of meter_sync_gateway:
--
--     CREATE ROLE "gw-0042" LOGIN PASSWORD '...' IN ROLE meter_sync_gateway;
--
-- and dashboards' roles members of meter_sync_monitor. Running it again is
-- harmless. docs/security.md explains the choices; tests/heartbeat.rs proves that
-- one gateway cannot insert, update or delete another's row.
--
-- Through PgBouncer this holds only if PgBouncer logs in to central as the client's
-- own user (its default when the [databases] entry names no user=): current_user is
-- what the policy compares.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_sync_gateway') THEN
        CREATE ROLE meter_sync_gateway NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_sync_monitor') THEN
        CREATE ROLE meter_sync_monitor NOLOGIN;
    END IF;
END
$$;

-- The heartbeat is INSERT ... ON CONFLICT (gateway_id) DO UPDATE: it needs all three.
GRANT SELECT, INSERT, UPDATE ON gateway_status TO meter_sync_gateway;
GRANT SELECT ON gateway_status TO meter_sync_monitor;

ALTER TABLE gateway_status ENABLE ROW LEVEL SECURITY;

-- USING decides which existing rows a gateway sees, updates or deletes; WITH
-- CHECK which rows it may write. A heartbeat naming another gateway fails with
-- SQLSTATE 42501 ("new row violates row-level security policy"); the gateway
-- logs that once and its cycles go on.
DROP POLICY IF EXISTS gateway_status_own_row ON gateway_status;
CREATE POLICY gateway_status_own_row ON gateway_status
    TO meter_sync_gateway
    USING (gateway_id = current_user)
    WITH CHECK (gateway_id = current_user);

DROP POLICY IF EXISTS gateway_status_read_all ON gateway_status;
CREATE POLICY gateway_status_read_all ON gateway_status
    FOR SELECT
    TO meter_sync_monitor
    USING (true);

-- When gateway ids cannot be role names (ids from /etc/machine-id, say), map them
-- instead, and use this policy in place of gateway_status_own_row:
--
--   CREATE TABLE gateway_roles (role_name name PRIMARY KEY, gateway_id text UNIQUE NOT NULL);
--   GRANT SELECT ON gateway_roles TO meter_sync_gateway;
--   CREATE POLICY gateway_status_own_row ON gateway_status TO meter_sync_gateway
--       USING (gateway_id = (SELECT gateway_id FROM gateway_roles WHERE role_name = current_user))
--       WITH CHECK (gateway_id = (SELECT gateway_id FROM gateway_roles WHERE role_name = current_user));
