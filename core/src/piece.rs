//! Piece math: how a task of a given length is cut into pieces, and which pieces a byte range needs.
//! Plain data, no I/O.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Smallest piece: below this, per-piece overhead (headers, digests, bitmap updates) dominates.
/// Small pieces keep a fan-out's pipeline short: a piece is shared only once it is whole, and each
/// hop costs a piece's time on a parent's shared uplink. On 5 Mbit/s links, 16 nodes pulling a
/// 16 MiB blob finish at 1.19× the lower bound with 64 KiB pieces, against 1.31× with 128 KiB
/// and 1.55× with 256 KiB ones (8 nodes: 1.09× against 1.27×).
pub const MIN_PIECE_SIZE: u64 = 64 << 10;
/// Largest piece: above this, a verified piece takes too long to arrive before it can be shared.
pub const MAX_PIECE_SIZE: u64 = 16 << 20;

/// A peer fetching a stripe of a task from the origin for the cluster does so in requests of a
/// quarter of the stripe, at least this many pieces, and stops before a piece whose digest
/// another peer reported: the scheduler may hand the end of a slow stripe to another peer while
/// it is fetched.
pub const MIN_STRIPE_REQUEST_PIECES: u32 = 4;

/// Pieces per origin request when fetching a stripe of `len` pieces (see
/// [`MIN_STRIPE_REQUEST_PIECES`]): four requests a stripe, so a far registry costs few round trips.
pub fn stripe_request_pieces(len: u32) -> u32 {
    (len / 4).max(MIN_STRIPE_REQUEST_PIECES)
}
/// A task aims for about this many pieces.
const TARGET_PIECES: u64 = 512;

/// The piece size for a task of `len` bytes: `clamp(next_pow2(len / 512), 64 KiB, 16 MiB)`.
pub fn piece_size_for(len: u64) -> u64 {
    (len / TARGET_PIECES).max(1).next_power_of_two().clamp(MIN_PIECE_SIZE, MAX_PIECE_SIZE)
}

/// How one task is cut into pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceLayout {
    /// Length of the whole task in bytes.
    pub len: u64,
    /// Size of every piece but the last.
    pub piece_size: u64,
}

impl PieceLayout {
    /// The layout the default rule gives a task of `len` bytes.
    pub fn for_len(len: u64) -> PieceLayout {
        PieceLayout { len, piece_size: piece_size_for(len) }
    }

    /// Number of pieces (zero for an empty task).
    pub fn count(&self) -> u32 {
        self.len.div_ceil(self.piece_size) as u32
    }

    /// The byte range piece `n` covers.
    pub fn range(&self, n: u32) -> Range<u64> {
        let start = n as u64 * self.piece_size;
        start.min(self.len)..(start + self.piece_size).min(self.len)
    }

    /// The pieces needed to serve `bytes` (an empty range needs none).
    pub fn covering(&self, bytes: Range<u64>) -> Range<u32> {
        let end = bytes.end.min(self.len);
        if bytes.start >= end {
            return 0..0;
        }
        (bytes.start / self.piece_size) as u32..end.div_ceil(self.piece_size) as u32
    }
}

/// Which pieces of a task are present. Serialised as hex so the on-disk metadata stays readable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    /// Number of pieces tracked.
    len: u32,
    /// One bit per piece, little-endian within each byte.
    #[serde(with = "hex_bytes")]
    bits: Vec<u8>,
}

impl Bitmap {
    /// An empty bitmap for `len` pieces.
    pub fn new(len: u32) -> Bitmap {
        Bitmap { len, bits: vec![0; (len as usize).div_ceil(8)] }
    }

    /// Number of pieces tracked.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True when it tracks no pieces.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether piece `n` is present (false when out of range).
    pub fn has(&self, n: u32) -> bool {
        n < self.len && self.bits[(n / 8) as usize] & (1 << (n % 8)) != 0
    }

    /// Marks piece `n` present. Out-of-range pieces are ignored.
    pub fn set(&mut self, n: u32) {
        if n < self.len {
            self.bits[(n / 8) as usize] |= 1 << (n % 8);
        }
    }

    /// Marks piece `n` missing.
    pub fn unset(&mut self, n: u32) {
        if n < self.len {
            self.bits[(n / 8) as usize] &= !(1 << (n % 8));
        }
    }

    /// Number of pieces present.
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    /// True when every piece is present.
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// The missing pieces within `pieces`, grouped into runs of consecutive numbers.
    pub fn missing_runs(&self, pieces: Range<u32>) -> Vec<Range<u32>> {
        let mut runs: Vec<Range<u32>> = Vec::new();
        for n in pieces.start..pieces.end.min(self.len) {
            if self.has(n) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end == n => run.end = n + 1,
                _ => runs.push(n..n + 1),
            }
        }
        runs
    }

    /// Whether the stored form is consistent (right byte count, no bits beyond `len`).
    pub fn is_valid(&self) -> bool {
        if self.bits.len() != (self.len as usize).div_ceil(8) {
            return false;
        }
        let spare = self.len % 8;
        spare == 0 || self.bits.last().is_none_or(|b| b >> spare == 0)
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn piece_size_follows_the_rule() {
        assert_eq!(piece_size_for(0), MIN_PIECE_SIZE);
        assert_eq!(piece_size_for(10), MIN_PIECE_SIZE);
        assert_eq!(piece_size_for(16 * MIB), 64 << 10);
        assert_eq!(piece_size_for(64 * MIB), 128 << 10);
        assert_eq!(piece_size_for(256 * MIB), MIB / 2);
        assert_eq!(piece_size_for(512 * MIB), MIB);
        assert_eq!(piece_size_for(1024 * MIB), 2 * MIB);
        assert_eq!(piece_size_for(1024 * MIB + 512), 4 * MIB);
        assert_eq!(piece_size_for(2048 * MIB), 4 * MIB);
        assert_eq!(piece_size_for(1 << 40), MAX_PIECE_SIZE);
    }

    #[test]
    fn layout_covers_every_byte_once() {
        for len in [0, 1, MIB - 1, MIB, MIB + 1, 3 * MIB + 17, 700 * MIB + 3] {
            let l = PieceLayout::for_len(len);
            let mut next = 0;
            for n in 0..l.count() {
                let r = l.range(n);
                assert_eq!(r.start, next);
                assert!(r.end > r.start && r.end - r.start <= l.piece_size);
                next = r.end;
            }
            assert_eq!(next, len, "len {len}");
        }
    }

    #[test]
    fn covering_pieces_of_ranges() {
        let l = PieceLayout { len: 10 * MIB + 5, piece_size: MIB };
        assert_eq!(l.count(), 11);
        assert_eq!(l.covering(0..1), 0..1);
        assert_eq!(l.covering(0..MIB), 0..1);
        assert_eq!(l.covering(MIB - 1..MIB + 1), 0..2);
        assert_eq!(l.covering(10 * MIB..u64::MAX), 10..11);
        assert_eq!(l.covering(5..5), 0..0);
        assert_eq!(l.covering(20 * MIB..30 * MIB), 0..0);
    }

    #[test]
    fn bitmap_tracks_and_groups_missing_pieces() {
        let mut b = Bitmap::new(10);
        assert_eq!(b.missing_runs(0..10), vec![0..10]);
        for n in [0, 3, 4, 9, 42] {
            b.set(n);
        }
        assert_eq!(b.count(), 4);
        assert!(b.has(3) && !b.has(2) && !b.has(42));
        assert_eq!(b.missing_runs(0..10), vec![1..3, 5..9]);
        assert_eq!(b.missing_runs(4..6), vec![5..6]);
        assert!(b.is_valid());
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Bitmap>(&json).unwrap(), b);
        for n in 0..10 {
            b.set(n);
        }
        assert!(b.is_full());
    }

    #[test]
    fn a_stripe_is_fetched_in_four_requests_of_at_least_four_pieces() {
        assert_eq!(stripe_request_pieces(16), 4);
        assert_eq!(stripe_request_pieces(64), 16);
        assert_eq!(stripe_request_pieces(6), 4, "a short stripe is one or two requests");
        assert_eq!(stripe_request_pieces(0), MIN_STRIPE_REQUEST_PIECES);
    }

    #[test]
    fn bitmap_validation_rejects_inconsistent_forms() {
        let bad: Bitmap = serde_json::from_str(r#"{"len":3,"bits":"ff"}"#).unwrap();
        assert!(!bad.is_valid());
        let short: Bitmap = serde_json::from_str(r#"{"len":9,"bits":"ff"}"#).unwrap();
        assert!(!short.is_valid());
    }
}
