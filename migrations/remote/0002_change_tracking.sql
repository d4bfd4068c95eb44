-- Change tracking for the download (docs/download.md): every row of meters and
-- tenant carries the id of the transaction that last inserted or updated it, so
-- that a gateway asks only for rows written since its watermark (an index probe)
-- instead of copying both tables every cycle.
--
-- Why a transaction id and not a timestamp or a sequence: the gateway's watermark
-- is the xmin of the snapshot it read with (the oldest transaction still running
-- then). A transaction that commits after that snapshot was either running then
-- or started later, so its id is >= that xmin and the next cycle's
-- `change_xid >= watermark` finds it, however the commits were ordered. A
-- timestamp or sequence value is taken inside the writing transaction and can be
-- older than a watermark advanced by a transaction that committed first.
--
-- Existing rows are stamped with this migration's transaction (the column
-- default), so tables that already hold data get tracking too.

ALTER TABLE meters ADD COLUMN IF NOT EXISTS change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE tenant ADD COLUMN IF NOT EXISTS change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

-- The stamp is set by a trigger, not left to the writer: an UPDATE (or an
-- INSERT naming the column) cannot keep an old value. pg_current_xact_id() is the
-- top-level transaction's id, also inside a subtransaction (whose changes become
-- visible exactly when the top level commits). A DELETE followed by an INSERT of
-- the same key in one transaction stamps the new row like any insert.
CREATE OR REPLACE FUNCTION meter_sync_stamp_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_xid := pg_current_xact_id();
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS meters_change_xid ON meters;
CREATE TRIGGER meters_change_xid BEFORE INSERT OR UPDATE ON meters
    FOR EACH ROW EXECUTE FUNCTION meter_sync_stamp_change();
DROP TRIGGER IF EXISTS tenant_change_xid ON tenant;
CREATE TRIGGER tenant_change_xid BEFORE INSERT OR UPDATE ON tenant
    FOR EACH ROW EXECUTE FUNCTION meter_sync_stamp_change();

-- ALWAYS: rows that reach central through logical replication (whose apply
-- worker runs with session_replication_role = replica) are stamped too.
ALTER TABLE meters ENABLE ALWAYS TRIGGER meters_change_xid;
ALTER TABLE tenant ENABLE ALWAYS TRIGGER tenant_change_xid;

-- The idle cycle's only central work: a probe of this index past the watermark.
CREATE INDEX IF NOT EXISTS meters_change_xid_idx ON meters (change_xid);
CREATE INDEX IF NOT EXISTS tenant_change_xid_idx ON tenant (change_xid);
