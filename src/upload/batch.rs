//! A batch of readings as PostgreSQL's binary wire format delivered them from the
//! local server, kept untouched until it reaches central: nothing is decoded into a
//! Rust type, so nothing can be rounded, reformatted or refused on the way
//! (NaN and 1000-digit numerics, BC timestamps, microseconds, jsonb `null` versus SQL
//! NULL, any Unicode) and no value costs an allocation of its own.
//!
//! The batch is one contiguous buffer of `COPY … (FORMAT binary)` tuples, so that a
//! whole batch or any run of its rows (a slice being isolated) is sent as
//! header + slice + trailer without copying; the same bytes make the binary arrays
//! of the fallback `INSERT … ON CONFLICT DO NOTHING`.

use std::error::Error as StdError;
use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::Row;

/// The columns carried to central, in this order, after the local `id` that the
/// selection puts first. Central assigns its own `id`.
pub const CENTRAL_COLUMNS: &str =
    "reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts";

/// Element types of [`CENTRAL_COLUMNS`], for the fallback's binary arrays. They are
/// the spec's column types on both sides (SPEC §4), so the local binary encoding of
/// each value is exactly what central decodes.
pub const ELEMENT_TYPES: [Type; 8] = [
    Type::UUID,
    Type::VARCHAR,
    Type::TIMESTAMPTZ,
    Type::NUMERIC,
    Type::VARCHAR,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::INT4,
];
const ARRAY_TYPES: [Type; 8] = [
    Type::UUID_ARRAY,
    Type::VARCHAR_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::NUMERIC_ARRAY,
    Type::VARCHAR_ARRAY,
    Type::JSONB_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::INT4_ARRAY,
];
const FIELDS: usize = ELEMENT_TYPES.len();
/// Position of `"timestamp"` among the carried columns (the keyset key).
const TIMESTAMP: usize = 2;

/// Signature, flags (no OIDs), header extension length 0.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// A field count of -1 ends the data.
const COPY_TRAILER: &[u8] = &[0xff, 0xff];

/// One column value exactly as the server sent it in binary: accepts every type.
pub struct Raw<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A parameter whose binary encoding is already known (a keyset timestamp as the
/// local server sent it, a fallback array built by [`Batch::arrays`]).
#[derive(Debug)]
pub struct Encoded<'a>(pub &'a [u8]);

impl ToSql for Encoded<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.put_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Readings selected together, in selection order.
pub struct Batch {
    /// The rows' COPY tuples back to back (no header, no trailer).
    tuples: Bytes,
    /// Where each row's tuple starts in `tuples`, and one more entry for the end.
    starts: Vec<u32>,
    /// The local `id` of each row.
    ids: Vec<i64>,
}

/// Builds a [`Batch`] row by row as the selection streams in.
pub struct Builder {
    buf: BytesMut,
    starts: Vec<u32>,
    ids: Vec<i64>,
}

/// A local row that cannot be carried: a NULL or malformed `id` (the selection's
/// first column), which no constraint allows, or a batch over 4 GiB.
#[derive(Debug)]
pub struct Unreadable(pub String);

impl Builder {
    pub fn with_capacity(rows: usize) -> Builder {
        Builder {
            // About 100 bytes a reading (docs/upload.md: binary COPY size); grows if needed.
            buf: BytesMut::with_capacity(rows.min(1 << 16) * 112),
            starts: Vec::with_capacity(rows + 1),
            ids: Vec::with_capacity(rows),
        }
    }

    /// Appends one selected row: `id`, then the [`CENTRAL_COLUMNS`].
    pub fn push(&mut self, row: &Row) -> Result<(), Unreadable> {
        let id = match row.try_get::<_, Option<Raw>>(0) {
            Ok(Some(Raw(b))) if b.len() == 8 => i64::from_be_bytes(b.try_into().expect("8 bytes")),
            _ => return Err(Unreadable("a reading without a valid id".into())),
        };
        let start = u32::try_from(self.buf.len())
            .map_err(|_| Unreadable("a batch larger than 4 GiB".into()))?;
        self.starts.push(start);
        self.ids.push(id);
        self.buf.put_i16(FIELDS as i16);
        for i in 1..=FIELDS {
            match row.try_get::<_, Option<Raw>>(i) {
                Ok(Some(Raw(b))) => {
                    self.buf.put_i32(b.len() as i32);
                    self.buf.put_slice(b);
                }
                // NULL (a legacy nullable column included): central decides, and a
                // refusal is isolated like any other rejected reading.
                _ => self.buf.put_i32(-1),
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<Batch, Unreadable> {
        let end = u32::try_from(self.buf.len())
            .map_err(|_| Unreadable("a batch larger than 4 GiB".into()))?;
        self.starts.push(end);
        Ok(Batch {
            tuples: self.buf.freeze(),
            starts: self.starts,
            ids: self.ids,
        })
    }
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn ids(&self, rows: Range<usize>) -> &[i64] {
        &self.ids[rows]
    }

    /// The keyset position of the last row: its `timestamp` as the server encoded
    /// it (`None` for a NULL timestamp, which the NOT NULL column never holds) and
    /// its `id`.
    // The drain keys on the last row selected, unreadable ones included
    // (upload::Collect); this one is where the readings after the batch begin when
    // central's fault is to be confirmed (upload::refuses_the_newest).
    pub fn last_key(&self) -> Option<(Option<Bytes>, i64)> {
        let last = self.len().checked_sub(1)?;
        let ts = self
            .field(last, TIMESTAMP)
            .map(|r| self.tuples.slice_ref(r));
        Some((ts, self.ids[last]))
    }

    /// The `reading_uid` of row `i` as text, for log lines and quarantine messages.
    pub fn uid(&self, i: usize) -> String {
        match self.field(i, 0).and_then(uuid_text) {
            Some(text) => text,
            None => "(none)".into(),
        }
    }

    /// Binary COPY data for `rows`: header, their tuples (shared, not copied), trailer.
    pub fn copy_data(&self, rows: Range<usize>) -> impl Buf + Send + 'static {
        let body = self
            .tuples
            .slice(self.starts[rows.start] as usize..self.starts[rows.end] as usize);
        Bytes::from_static(COPY_HEADER)
            .chain(body)
            .chain(Bytes::from_static(COPY_TRAILER))
    }

    /// Size in bytes of [`Batch::copy_data`] for `rows`.
    #[cfg(test)]
    pub fn copy_len(&self, rows: Range<usize>) -> usize {
        COPY_HEADER.len()
            + (self.starts[rows.end] - self.starts[rows.start]) as usize
            + COPY_TRAILER.len()
    }

    /// One binary array per carried column for `rows`, with its type, for
    /// `unnest($1, …, $8)`: the same value bytes as the COPY tuples.
    pub fn arrays(&self, rows: Range<usize>) -> Vec<(Vec<u8>, Type)> {
        let n = rows.len();
        let mut out: Vec<(Vec<u8>, Type)> = ARRAY_TYPES
            .iter()
            .zip(&ELEMENT_TYPES)
            .map(|(t, e)| {
                let mut a = Vec::with_capacity(20 + n * 24);
                a.put_i32(1); // dimensions
                a.put_i32(0); // has-null flag, fixed below
                a.put_u32(e.oid());
                a.put_i32(n as i32);
                a.put_i32(1); // lower bound
                (a, t.clone())
            })
            .collect();
        for i in rows {
            for (c, (a, _)) in out.iter_mut().enumerate() {
                match self.field(i, c) {
                    Some(b) => {
                        a.put_i32(b.len() as i32);
                        a.put_slice(b);
                    }
                    None => {
                        a.put_i32(-1);
                        a[7] = 1;
                    }
                }
            }
        }
        out
    }

    /// Field `col` of row `i` (`None` for NULL), walking its tuple.
    fn field(&self, i: usize, col: usize) -> Option<&[u8]> {
        let mut t = &self.tuples[self.starts[i] as usize + 2..self.starts[i + 1] as usize];
        for c in 0.. {
            let len = t.get_i32();
            let value = (len >= 0).then(|| &t[..len as usize]);
            if c == col {
                return value;
            }
            t.advance(len.max(0) as usize);
        }
        unreachable!()
    }
}

/// A uuid's 16 bytes in binary format as its canonical text, for messages; None
/// for anything else.
pub fn uuid_text(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch built by hand the way [`Builder::push`] lays it out.
    fn batch(rows: &[[Option<&[u8]>; FIELDS]]) -> Batch {
        let mut buf = BytesMut::new();
        let mut starts = Vec::new();
        for r in rows {
            starts.push(buf.len() as u32);
            buf.put_i16(FIELDS as i16);
            for f in r {
                match f {
                    Some(b) => {
                        buf.put_i32(b.len() as i32);
                        buf.put_slice(b);
                    }
                    None => buf.put_i32(-1),
                }
            }
        }
        starts.push(buf.len() as u32);
        Batch {
            tuples: buf.freeze(),
            starts,
            ids: (1..=rows.len() as i64).collect(),
        }
    }

    fn row(tag: u8) -> [Option<&'static [u8]>; FIELDS] {
        let uid: &'static [u8] = Box::leak(vec![tag; 16].into_boxed_slice());
        let ts: &'static [u8] = Box::leak(vec![0, 0, 0, 0, 0, 0, 0, tag].into_boxed_slice());
        [
            Some(uid),
            Some(b"meter-1"),
            Some(ts),
            Some(&[0, 0, 0, 0, 0xc0, 0, 0, 0]), // numeric NaN
            Some(b"kWh"),
            None,
            Some(ts),
            Some(&[0, 0, 0, 0]),
        ]
    }

    #[test]
    fn copy_data_of_a_range_is_header_its_tuples_and_trailer() {
        let b = batch(&[row(1), row(2), row(3)]);
        let mut all = b.copy_data(0..3);
        let bytes = all.copy_to_bytes(all.remaining());
        assert_eq!(bytes.len(), b.copy_len(0..3));
        assert!(bytes.starts_with(COPY_HEADER) && bytes.ends_with(COPY_TRAILER));
        let mut middle = b.copy_data(1..2);
        let m = middle.copy_to_bytes(middle.remaining());
        assert_eq!(m.len(), b.copy_len(1..2));
        assert_eq!(
            &m[COPY_HEADER.len()..m.len() - 2],
            &b.tuples[b.starts[1] as usize..b.starts[2] as usize]
        );
    }

    #[test]
    fn fields_keys_and_uids_come_from_the_tuples() {
        let b = batch(&[row(1), row(0xab)]);
        assert_eq!(b.field(1, 1), Some(&b"meter-1"[..]));
        assert_eq!(b.field(1, 5), None);
        assert_eq!(b.field(1, 7), Some(&[0u8, 0, 0, 0][..]));
        let (ts, id) = b.last_key().unwrap();
        assert_eq!(
            (ts.unwrap().as_ref(), id),
            (&[0, 0, 0, 0, 0, 0, 0, 0xab][..], 2)
        );
        assert_eq!(b.uid(1), "abababab-abab-abab-abab-abababababab");
    }

    #[test]
    fn arrays_hold_the_same_values_and_mark_nulls() {
        let b = batch(&[row(1), row(2)]);
        let arrays = b.arrays(0..2);
        assert_eq!(arrays.len(), FIELDS);
        let (meta, t) = &arrays[5];
        assert_eq!(*t, Type::JSONB_ARRAY);
        let mut m = &meta[..];
        assert_eq!(
            (
                m.get_i32(),
                m.get_i32(),
                m.get_u32(),
                m.get_i32(),
                m.get_i32()
            ),
            (1, 1, Type::JSONB.oid(), 2, 1)
        );
        assert_eq!((m.get_i32(), m.get_i32(), m.remaining()), (-1, -1, 0));
        let mut units = &arrays[4].0[..];
        units.advance(4);
        assert_eq!(units.get_i32(), 0, "no NULL unit");
        units.advance(12);
        assert_eq!(units.get_i32(), 3);
        assert_eq!(&units[..3], b"kWh");
    }
}
