-- meter-sync: each gateway sees only its own meters and tenants, and may upload
-- readings only for its own meters (docs/download.md, "This gateway's rows only").
--
-- Optional and NOT a migration: run it once on central, as the owner of meters,
-- tenant and meter_readings, after `meter-sync migrate remote` (it relies on the
-- change_xid column and trigger of remote migration 0002). It is idempotent.
--
--   psql -v ON_ERROR_STOP=1 -f deploy/central/rls-recipe.sql "$CENTRAL_URL"
--
-- Then, per gateway (one login role each, member of meter_sync_gateway):
--
--   CREATE ROLE gw_0042 LOGIN PASSWORD '…' IN ROLE meter_sync_gateway;
--   INSERT INTO gateway_meters (gateway_role, meter_id) VALUES ('gw_0042', 'm-17'), …;
--   INSERT INTO gateway_tenants (gateway_role, tenant_id) VALUES ('gw_0042', 't-3');
--
-- Roles that are not members of meter_sync_gateway (your applications, the owner,
-- superusers) keep seeing every row.

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_sync_gateway') THEN
        CREATE ROLE meter_sync_gateway NOLOGIN;
    END IF;
END
$$;

-- Which meters and tenants belong to which gateway role. No foreign key: a meter
-- deleted and re-inserted in one transaction must keep its assignment.
CREATE TABLE IF NOT EXISTS gateway_meters (
    gateway_role name NOT NULL,
    meter_id     varchar(255) NOT NULL,
    PRIMARY KEY (gateway_role, meter_id)
);
CREATE TABLE IF NOT EXISTS gateway_tenants (
    gateway_role name NOT NULL,
    tenant_id    varchar(255) NOT NULL,
    PRIMARY KEY (gateway_role, tenant_id)
);

-- A row assigned later is an old, unchanged row: its change_xid is behind the
-- gateway's watermark. Touching it on assignment re-stamps it (the change_xid
-- trigger runs on every UPDATE), so the next changes-only download brings it.
-- SECURITY DEFINER: whoever may assign need not be allowed to update meters.
CREATE OR REPLACE FUNCTION meter_sync_assignment_touch() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'gateway_meters' THEN
        UPDATE meters SET change_xid = change_xid WHERE meter_id = NEW.meter_id;
    ELSE
        UPDATE tenant SET change_xid = change_xid WHERE tenant_id = NEW.tenant_id;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION meter_sync_assignment_touch() FROM PUBLIC;

DROP TRIGGER IF EXISTS gateway_meters_touch ON gateway_meters;
CREATE TRIGGER gateway_meters_touch AFTER INSERT OR UPDATE ON gateway_meters
    FOR EACH ROW EXECUTE FUNCTION meter_sync_assignment_touch();
DROP TRIGGER IF EXISTS gateway_tenants_touch ON gateway_tenants;
CREATE TRIGGER gateway_tenants_touch AFTER INSERT OR UPDATE ON gateway_tenants
    FOR EACH ROW EXECUTE FUNCTION meter_sync_assignment_touch();

-- A gateway sees its own assignments only (the policies below read them as the
-- gateway's role).
ALTER TABLE gateway_meters ENABLE ROW LEVEL SECURITY;
ALTER TABLE gateway_tenants ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS own_assignments ON gateway_meters;
CREATE POLICY own_assignments ON gateway_meters FOR SELECT TO meter_sync_gateway
    USING (gateway_role = current_user);
DROP POLICY IF EXISTS own_assignments ON gateway_tenants;
CREATE POLICY own_assignments ON gateway_tenants FOR SELECT TO meter_sync_gateway
    USING (gateway_role = current_user);

-- Everyone who is not a gateway keeps full access (policies are OR-ed; the owner
-- and superusers bypass row-level security anyway).
ALTER TABLE meters ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant ENABLE ROW LEVEL SECURITY;
ALTER TABLE meter_readings ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS not_a_gateway ON meters;
CREATE POLICY not_a_gateway ON meters
    USING (NOT pg_has_role(current_user, 'meter_sync_gateway', 'MEMBER'));
DROP POLICY IF EXISTS not_a_gateway ON tenant;
CREATE POLICY not_a_gateway ON tenant
    USING (NOT pg_has_role(current_user, 'meter_sync_gateway', 'MEMBER'));
DROP POLICY IF EXISTS not_a_gateway ON meter_readings;
CREATE POLICY not_a_gateway ON meter_readings
    USING (NOT pg_has_role(current_user, 'meter_sync_gateway', 'MEMBER'));

-- A gateway reads its assigned meters and tenants...
DROP POLICY IF EXISTS gateway_reads_own ON meters;
CREATE POLICY gateway_reads_own ON meters FOR SELECT TO meter_sync_gateway
    USING (EXISTS (SELECT 1 FROM gateway_meters g
                   WHERE g.gateway_role = current_user AND g.meter_id = meters.meter_id));
DROP POLICY IF EXISTS gateway_reads_own ON tenant;
CREATE POLICY gateway_reads_own ON tenant FOR SELECT TO meter_sync_gateway
    USING (EXISTS (SELECT 1 FROM gateway_tenants g
                   WHERE g.gateway_role = current_user AND g.tenant_id = tenant.tenant_id));

-- ...and inserts readings only for its assigned meters: billing data from a
-- compromised gateway stays its own.
DROP POLICY IF EXISTS gateway_writes_own ON meter_readings;
CREATE POLICY gateway_writes_own ON meter_readings FOR INSERT TO meter_sync_gateway
    WITH CHECK (EXISTS (SELECT 1 FROM gateway_meters g
                        WHERE g.gateway_role = current_user AND g.meter_id = meter_readings.meter_id));
-- The upload's ON CONFLICT (reading_uid, "timestamp") needs SELECT on those
-- columns, and an INSERT that needs SELECT must also pass the SELECT policies (as
-- a check on the new row): without this policy every upload fails with "new row
-- violates row-level security policy". The column grant below keeps it to the
-- key columns of its own meters' readings.
DROP POLICY IF EXISTS gateway_sees_own ON meter_readings;
CREATE POLICY gateway_sees_own ON meter_readings FOR SELECT TO meter_sync_gateway
    USING (EXISTS (SELECT 1 FROM gateway_meters g
                   WHERE g.gateway_role = current_user AND g.meter_id = meter_readings.meter_id));

-- The least privileges meter-sync needs as a gateway (docs/download.md):
-- downloads: SELECT on meters and tenant (change_xid included);
-- uploads: INSERT on meter_readings, SELECT on the ON CONFLICT arbiter's columns,
-- USAGE on the id sequence behind the column default.
REVOKE ALL ON meters, tenant, meter_readings, gateway_meters, gateway_tenants FROM meter_sync_gateway;
GRANT SELECT ON meters, tenant, gateway_meters, gateway_tenants TO meter_sync_gateway;
GRANT INSERT ON meter_readings TO meter_sync_gateway;
GRANT SELECT (reading_uid, "timestamp") ON meter_readings TO meter_sync_gateway;
GRANT USAGE ON SEQUENCE meter_readings_id_seq TO meter_sync_gateway;

COMMIT;
