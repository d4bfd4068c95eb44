-- Where the download resumes (docs/download.md): per downloaded table, the
-- snapshot xmin of central at the last download (changes-only cycles ask for rows
-- with change_xid >= it), which central database it belongs to, and when the last
-- full reconciliation ran. Written in the same local transaction as the rows it
-- describes, so a crash never advances it past data that was not applied.
CREATE TABLE IF NOT EXISTS download_watermark (
    table_name  text PRIMARY KEY,
    central_db  text NOT NULL,
    watermark   bigint NOT NULL CHECK (watermark >= 0),
    full_at     timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
