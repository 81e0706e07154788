//! The compact integers of a snapshot (its fourth layout): LEB128
//! varints, and values written as their zigzag-coded difference from a
//! base (a snapshot's LSN, a time near its mark), so that the LSNs and
//! timestamps of recent ids take 2-4 bytes instead of 8.

use stockd_protocol::{DecodeError, Reader};

/// `v` in 1-10 bytes, 7 bits each, low bits first.
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint `put` wrote; `what` names the field in an error. Decoded in
/// place from the reader's bytes (a bounds-checked read per byte was a
/// tenth of loading a snapshot).
pub fn read(r: &mut Reader<'_>, what: &str) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for (i, &b) in r.rest().iter().take(10).enumerate() {
        // The tenth byte holds bit 63 alone.
        if i == 9 && b > 1 {
            return Err(DecodeError(format!("{what}: varint overflows 64 bits")));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            r.skip(i + 1);
            return Ok(v);
        }
    }
    Err(DecodeError(format!("body ends inside {what}")))
}

/// A varint that must fit a u32.
pub fn read_u32(r: &mut Reader<'_>, what: &str) -> Result<u32, DecodeError> {
    let v = read(r, what)?;
    u32::try_from(v).map_err(|_| DecodeError(format!("{what} {v} exceeds 32 bits")))
}

/// `v` as its difference from `base`, either way (wrapping: any two
/// values have one), zigzag-coded so that small differences are small.
pub fn put_delta(out: &mut Vec<u8>, v: u64, base: u64) {
    let d = v.wrapping_sub(base) as i64;
    put(out, ((d << 1) ^ (d >> 63)) as u64);
}

/// A value `put_delta` wrote against the same `base`.
pub fn read_delta(r: &mut Reader<'_>, base: u64, what: &str) -> Result<u64, DecodeError> {
    let z = read(r, what)?;
    let d = (z >> 1) as i64 ^ -((z & 1) as i64);
    Ok(base.wrapping_add(d as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn values_and_differences_read_back(v in any::<u64>(), base in any::<u64>(), near in -100_000i64..100_000) {
            let close = base.wrapping_add(near as u64);
            let mut out = Vec::new();
            put(&mut out, v);
            put_delta(&mut out, v, base);
            put_delta(&mut out, close, base);
            let at_near = out.len();
            let mut r = Reader::new(&out);
            prop_assert_eq!(read(&mut r, "v").unwrap(), v);
            prop_assert_eq!(read_delta(&mut r, base, "d").unwrap(), v);
            prop_assert_eq!(read_delta(&mut r, base, "near").unwrap(), close);
            prop_assert_eq!(r.remaining(), 0);
            // A difference within 100,000 either way takes at most 3 bytes.
            let mut small = Vec::new();
            put_delta(&mut small, close, base);
            prop_assert!(small.len() <= 3, "{} bytes", small.len());
            prop_assert!(at_near <= 30);
        }
    }

    #[test]
    fn sizes_and_bad_input() {
        let bytes = |v: u64| {
            let mut out = Vec::new();
            put(&mut out, v);
            out
        };
        assert_eq!(bytes(0), [0]);
        assert_eq!(bytes(127), [127]);
        assert_eq!(bytes(128), [0x80, 1]);
        assert_eq!(bytes(u64::MAX).len(), 10);
        let mut r = Reader::new(&[0x80, 0x80]);
        assert_eq!(read(&mut r, "lsn").unwrap_err().0, "body ends inside lsn");
        let eleven = [0xff; 11];
        let mut r = Reader::new(&eleven);
        assert_eq!(read(&mut r, "ts").unwrap_err().0, "ts: varint overflows 64 bits");
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x10]);
        assert_eq!(read_u32(&mut r, "center").unwrap_err().0, "center 4563402751 exceeds 32 bits");
    }
}
