//! Per-bucket digests of a mirror's records, as `crate::import::verify`
//! compares them with the register files: a record count and an
//! order-independent checksum per bucket. Digests never hold a phone number.

/// The digest of one bucket: how many records, and a checksum of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketDigest {
    /// Records in the bucket.
    pub count: u64,
    /// Wrapping sum of [`record_hash`] over the records (order-independent).
    pub sum: u64,
}

impl BucketDigest {
    /// Adds one record: `number` ([`crate::domain::PhoneNumber::value`])
    /// with `day` (days since 1970-01-01, or any stored value).
    pub fn add(&mut self, number: u64, day: u64) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(record_hash(number, day));
    }
}

/// A 64-bit mix of one record (splitmix64 finaliser over both values).
pub fn record_hash(number: u64, day: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    mix(mix(number.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ day)
}

/// What a store holds, as `crate::import::verify::verify` compares it.
#[derive(Clone, Debug)]
pub struct MirrorDigest {
    /// The mirror's sequence.
    pub sequence: u64,
    /// `record_count` of its metadata.
    pub meta_records: u64,
    /// The digests of buckets `0..nbuckets` (its length is `nbuckets`).
    pub buckets: Vec<BucketDigest>,
    /// A bucket's name in the report is this followed by its index (e.g.
    /// `rn:g7:`, making the Redis key).
    pub name_prefix: String,
}
