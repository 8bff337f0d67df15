//! DUMP payloads of listpack-encoded hashes, built here and loaded with
//! `RESTORE`: Redis copies and checks the ready-made listpack instead of
//! inserting field by field, which makes snapshot imports several times
//! faster than HSET (Redis' single thread is the bottleneck of an import).
//!
//! A payload is: the RDB type `RDB_TYPE_HASH_LISTPACK` (16), the listpack as
//! an RDB string, the RDB version (2 bytes, little-endian) and a CRC-64
//! (Jones, reflected; 8 bytes, little-endian) of everything before it. The
//! listpack holds field, value, field, value, ... each entry as the smallest
//! integer encoding and a one-byte back-length, exactly as Redis itself
//! encodes integers (a test compares with Redis' own DUMP).

/// The RDB version written: Redis 7.0's. Every later Redis accepts it; older
/// ones (without listpack hashes) refuse the payload and the importer falls
/// back to HSET.
pub(super) const RDB_VERSION: u16 = 10;
const RDB_TYPE_HASH_LISTPACK: u8 = 16;
const LP_HEADER_SIZE: usize = 6;
const LP_EOF: u8 = 0xFF;
const LP_NUMELE_UNKNOWN: u16 = u16::MAX;

/// Appends to `out` the DUMP payload of a hash of integer fields and values,
/// followed by the bucket sentinel field `sentinel.0` (a short non-numeric
/// name) with the integer value `sentinel.1`, if given: the same listpack
/// HSET of the fields and then of the sentinel builds.
pub(super) fn hash_payload(
    pairs: impl Iterator<Item = (i64, i64)>,
    sentinel: Option<(&str, i64)>,
    out: &mut Vec<u8>,
) {
    let mut lp = Vec::with_capacity(LP_HEADER_SIZE + 10 * 256);
    lp.extend_from_slice(&[0; LP_HEADER_SIZE]);
    let mut elements = 0usize;
    for (field, value) in pairs {
        push_int(&mut lp, field);
        push_int(&mut lp, value);
        elements += 2;
    }
    if let Some((name, value)) = sentinel {
        push_short_str(&mut lp, name.as_bytes());
        push_int(&mut lp, value);
        elements += 2;
    }
    lp.push(LP_EOF);
    let total = u32::try_from(lp.len()).unwrap_or(u32::MAX);
    lp[0..4].copy_from_slice(&total.to_le_bytes());
    let count = u16::try_from(elements)
        .ok()
        .filter(|&c| c < LP_NUMELE_UNKNOWN)
        .unwrap_or(LP_NUMELE_UNKNOWN);
    lp[4..6].copy_from_slice(&count.to_le_bytes());

    let start = out.len();
    out.push(RDB_TYPE_HASH_LISTPACK);
    push_rdb_len(out, lp.len() as u64);
    out.extend_from_slice(&lp);
    out.extend_from_slice(&RDB_VERSION.to_le_bytes());
    let crc = crc64(0, &out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// One listpack integer entry: encoding and data, then the back-length.
fn push_int(lp: &mut Vec<u8>, v: i64) {
    let start = lp.len();
    if (0..=127).contains(&v) {
        lp.push(v as u8);
    } else if (-4096..=4095).contains(&v) {
        let u = if v < 0 { v + (1 << 13) } else { v } as u16;
        lp.push(0xC0 | (u >> 8) as u8);
        lp.push(u as u8);
    } else if (-32_768..=32_767).contains(&v) {
        lp.push(0xF1);
        lp.extend_from_slice(&(v as i16).to_le_bytes());
    } else if (-8_388_608..=8_388_607).contains(&v) {
        lp.push(0xF2);
        lp.extend_from_slice(&(v as i32).to_le_bytes()[..3]);
    } else if let Ok(v) = i32::try_from(v) {
        lp.push(0xF3);
        lp.extend_from_slice(&v.to_le_bytes());
    } else {
        lp.push(0xF4);
        lp.extend_from_slice(&v.to_le_bytes());
    }
    // Integer entries are at most 9 bytes: a one-byte back-length.
    lp.push((lp.len() - start) as u8);
}

/// One listpack string entry of at most 63 bytes (6-bit length encoding)
/// that does not look like an integer (Redis would store that as one).
fn push_short_str(lp: &mut Vec<u8>, s: &[u8]) {
    debug_assert!(s.len() < 64, "short strings only");
    let len = s.len().min(63);
    lp.push(0x80 | len as u8);
    lp.extend_from_slice(&s[..len]);
    // Entry size 1 + len < 128: a one-byte back-length.
    lp.push((1 + len) as u8);
}

/// An RDB length (big-endian forms, as Redis writes them).
fn push_rdb_len(out: &mut Vec<u8>, len: u64) {
    if len < 1 << 6 {
        out.push(len as u8);
    } else if len < 1 << 14 {
        out.push(0x40 | (len >> 8) as u8);
        out.push(len as u8);
    } else if let Ok(len) = u32::try_from(len) {
        out.push(0x80);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0x81);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// CRC-64/Jones as Redis computes it (reflected, polynomial
/// 0xad93d23594c935a9, initial value 0, no final xor).
pub(super) fn crc64(mut crc: u64, data: &[u8]) -> u64 {
    for &b in data {
        crc = CRC64_TABLE[((crc ^ u64::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

static CRC64_TABLE: [u64; 256] = crc64_table();

const fn crc64_table() -> [u64; 256] {
    // 0xad93d23594c935a9 with its bits reversed.
    const POLY: u64 = 0x95ac_9329_ac4b_c9b5;
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_redis() {
        // The check value in Redis' crc64.c.
        assert_eq!(crc64(0, b"123456789"), 0xe9c6_d914_c4b8_d9ca);
    }

    fn entries(values: &[i64]) -> Vec<u8> {
        let mut lp = Vec::new();
        for &v in values {
            push_int(&mut lp, v);
        }
        lp
    }

    #[test]
    fn integer_encodings() {
        assert_eq!(entries(&[0]), [0x00, 1]);
        assert_eq!(entries(&[127]), [0x7F, 1]);
        assert_eq!(entries(&[128]), [0xC0, 0x80, 2]);
        assert_eq!(entries(&[4095]), [0xCF, 0xFF, 2]);
        assert_eq!(entries(&[-1]), [0xDF, 0xFF, 2]);
        assert_eq!(entries(&[-4096]), [0xD0, 0x00, 2]);
        assert_eq!(entries(&[20_000]), [0xF1, 0x20, 0x4E, 3]);
        assert_eq!(entries(&[1_000_000]), [0xF2, 0x40, 0x42, 0x0F, 4]);
        assert_eq!(entries(&[100_000_000]), [0xF3, 0x00, 0xE1, 0xF5, 0x05, 5]);
        assert_eq!(entries(&[1 << 40])[0], 0xF4);
        assert_eq!(entries(&[1 << 40]).len(), 10);
    }

    #[test]
    fn payload_shape() {
        let mut out = Vec::new();
        hash_payload([(5, 20_000)].into_iter(), None, &mut out);
        // type, length 13, listpack (6 header + 2 + 4 + EOF), version, crc.
        assert_eq!(out[0], 16);
        assert_eq!(out[1], 13);
        assert_eq!(&out[2..8], &[13, 0, 0, 0, 2, 0]);
        assert_eq!(&out[8..14], &[5, 1, 0xF1, 0x20, 0x4E, 3]);
        assert_eq!(out[14], LP_EOF);
        assert_eq!(&out[15..17], &RDB_VERSION.to_le_bytes());
        assert_eq!(out.len(), 17 + 8);
        let crc = crc64(0, &out[..17]);
        assert_eq!(&out[17..], &crc.to_le_bytes());
    }

    #[test]
    fn sentinel_is_a_short_string_entry() {
        let mut out = Vec::new();
        hash_payload(std::iter::empty(), Some(("_g", 7)), &mut out);
        // type, length, listpack (6 header + 4 + 2 + EOF).
        assert_eq!(out[1], 13);
        assert_eq!(&out[2..8], &[13, 0, 0, 0, 2, 0]);
        assert_eq!(&out[8..14], &[0x82, b'_', b'g', 3, 7, 1]);
        assert_eq!(out[14], LP_EOF);
    }
}
