//! Cursors: a client's exact position in the log, opaque to clients.
//!
//! A cursor is the database's epoch and one offset per log partition: "every entry of
//! partition p up to offset[p] has been delivered", and when the gateway made it (seconds):
//! a resume delivers the read receipts of about that time on. Encoded as base64url (no
//! padding) of `version(2) | epoch(u32 LE) | partitions(u16 LE) | offsets as LEB128 varints
//! | made-at seconds as a LEB128 varint [| tag as a LEB128 varint]`; eight partitions at a
//! few million entries each make about 58 characters. The tag, when present, names the
//! long-poll session that handed the cursor out (so two clients of one user at the same
//! position never take over each other's parked session); it means nothing else. Version 1
//! (no time) is still read.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use quickim_shared::position::Position;

const VERSION: u8 = 2;
/// Cursors made before the time was added.
const VERSION_WITHOUT_TIME: u8 = 1;

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The database's epoch.
    pub epoch: u32,
    /// One offset per partition.
    pub position: Position,
    /// When a gateway made it, seconds since the epoch (0: unknown, a version 1 cursor).
    pub made_s: u64,
    /// The long-poll session that handed it out (0: none).
    pub tag: u64,
}

/// A string that is not a cursor.
#[derive(Debug, PartialEq, Eq)]
pub struct BadCursor;

impl Cursor {
    /// Encodes to the wire form.
    pub fn encode(&self) -> String {
        let mut s = encode_made(self.epoch, &self.position, self.made_s);
        if self.tag != 0 {
            s = tagged(&s, self.tag);
        }
        s
    }

    /// Decodes the wire form.
    pub fn decode(s: &str) -> Result<Cursor, BadCursor> {
        if s.len() > 4096 {
            return Err(BadCursor);
        }
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| BadCursor)?;
        let (&version, rest) = bytes.split_first().ok_or(BadCursor)?;
        if !(version == VERSION || version == VERSION_WITHOUT_TIME) || rest.len() < 6 {
            return Err(BadCursor);
        }
        let epoch = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let parts = usize::from(u16::from_le_bytes([rest[4], rest[5]]));
        let mut offsets = Vec::with_capacity(parts.min(1024));
        let mut input = &rest[6..];
        for _ in 0..parts {
            let (v, used) = read_varint(input).ok_or(BadCursor)?;
            offsets.push(v);
            input = &input[used..];
        }
        let (mut made_s, mut tag) = (0, 0);
        if version == VERSION {
            let (v, used) = read_varint(input).ok_or(BadCursor)?;
            made_s = v;
            input = &input[used..];
            if !input.is_empty() {
                let (t, used) = read_varint(input).ok_or(BadCursor)?;
                tag = t;
                input = &input[used..];
            }
        }
        if !input.is_empty() {
            return Err(BadCursor);
        }
        Ok(Cursor { epoch, position: Position::from(offsets), made_s, tag })
    }
}

/// Encodes `epoch` and `offsets`, made now, without building a [`Cursor`].
pub fn encode(epoch: u32, offsets: &[u64]) -> String {
    let now_s = u64::try_from(quickim_shared::time::now_ms() / 1000).unwrap_or(0);
    encode_made(epoch, offsets, now_s)
}

/// `cursor` (an untagged version 2 cursor) with `tag` appended; `cursor` itself if it is not
/// one.
pub fn tagged(cursor: &str, tag: u64) -> String {
    match URL_SAFE_NO_PAD.decode(cursor) {
        Ok(mut bytes) if bytes.first() == Some(&VERSION) => {
            write_varint(&mut bytes, tag);
            URL_SAFE_NO_PAD.encode(bytes)
        }
        _ => cursor.to_string(),
    }
}

/// Encodes `epoch` and `offsets` made at `made_s` (seconds).
pub fn encode_made(epoch: u32, offsets: &[u64], made_s: u64) -> String {
    let mut buf = Vec::with_capacity(12 + offsets.len() * 4);
    buf.push(VERSION);
    buf.extend_from_slice(&epoch.to_le_bytes());
    buf.extend_from_slice(&(offsets.len() as u16).to_le_bytes());
    for &o in offsets {
        write_varint(&mut buf, o);
    }
    write_varint(&mut buf, made_s);
    URL_SAFE_NO_PAD.encode(buf)
}

fn write_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn read_varint(input: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &b) in input.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for offsets in [vec![], vec![0], vec![0, 1, 127, 128, 300, u64::MAX], vec![5_000_000; 8]] {
            let c = Cursor { epoch: 0xdead_beef, position: Position::from(offsets), made_s: 1_795_000_000, tag: 0 };
            assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
            let t = Cursor { tag: 77, ..c.clone() };
            assert_eq!(Cursor::decode(&t.encode()).unwrap(), t);
            assert_eq!(t.encode(), tagged(&c.encode(), 77));
        }
    }

    #[test]
    fn is_short() {
        let c = Cursor { epoch: u32::MAX, position: Position::from(vec![5_000_000; 8]), made_s: 1_795_000_000, tag: 0 };
        assert!(c.encode().len() <= 60, "{}", c.encode());
    }

    #[test]
    fn reads_cursors_without_a_time() {
        let mut buf = vec![VERSION_WITHOUT_TIME];
        buf.extend_from_slice(&7u32.to_le_bytes());
        buf.extend_from_slice(&2u16.to_le_bytes());
        buf.extend_from_slice(&[5, 0x80, 0x01]);
        let c = Cursor::decode(&URL_SAFE_NO_PAD.encode(&buf)).unwrap();
        assert_eq!((c.epoch, &c.position[..], c.made_s), (7, &[5, 128][..], 0));
    }

    #[test]
    fn is_made_now() {
        let now_s = u64::try_from(quickim_shared::time::now_ms() / 1000).unwrap();
        let c = Cursor::decode(&encode(1, &[3])).unwrap();
        assert!(c.made_s.abs_diff(now_s) <= 1, "{} vs {now_s}", c.made_s);
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "!!", "AA", "not a cursor", &"A".repeat(5000)] {
            assert_eq!(Cursor::decode(s), Err(BadCursor), "{s:?}");
        }
        let mut good = Cursor { epoch: 1, position: Position::from(vec![1, 2]), made_s: 9, tag: 3 }.encode();
        good.push('A');
        assert!(Cursor::decode(&good).is_err(), "trailing bytes");
        let truncated = encode(1, &[300]);
        let bytes = URL_SAFE_NO_PAD.decode(&truncated).unwrap();
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() - 1])).is_err());
    }
}
