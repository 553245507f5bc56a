//! Planning: cutting an input object into byte-range shards. Only the object's size is
//! needed; the agents align each range to record boundaries when they read it
//! (`infermesh_io::shard`), so no record is split or dropped whatever the sizes.

/// A shard's byte range `[start, end)` of the input object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardRange {
    /// Shard index, from 0.
    pub index: u32,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The most shards one workload may have; bigger inputs get bigger shards.
pub const MAX_SHARDS: u64 = 100_000;

/// Splits `size` bytes into ranges of about `shard_bytes` each, covering `[0, size)` exactly.
/// An empty object gets no shard. When there are more shards than `slots` (the slots of the
/// Mesh's agents), the count is rounded up to a multiple of it, so the last round of shards
/// keeps every slot busy instead of leaving one agent to finish a lone shard while the others
/// idle; that at most doubles the count. Fewer shards than slots run in one round as they
/// are: on a thousand-slot Mesh a four-shard input stays four shards, not a thousand slivers
/// that are mostly empty.
pub fn plan(size: u64, shard_bytes: u64, slots: u32) -> Vec<ShardRange> {
    if size == 0 {
        return Vec::new();
    }
    let target = shard_bytes.max(1).max(size.div_ceil(MAX_SHARDS));
    let mut count = size.div_ceil(target);
    let slots = u64::from(slots.max(1));
    if slots > 1 && count > slots {
        count = count.div_ceil(slots) * slots;
    }
    // Never more shards than bytes, nor than the cap.
    let count = count.min(size).min(MAX_SHARDS);
    // Even ranges: the last shard is not a sliver.
    (0..count)
        .map(|i| ShardRange {
            index: i as u32,
            start: size * i / count,
            end: size * (i + 1) / count,
        })
        .collect()
}

/// Plans a dataset of files laid end to end ([`infermesh_io::Dataset`]): even ranges over its
/// virtual size as [`plan`] cuts them, with every cut that falls inside a unit (a compressed
/// file, a Parquet row group) moved to the nearer end of it, so each shard reads whole units
/// and none is empty.
pub fn plan_dataset(ds: &infermesh_io::Dataset, shard_bytes: u64, slots: u32) -> Vec<ShardRange> {
    let even = plan(ds.total(), shard_bytes, slots);
    let cuts: Vec<u64> = even.iter().map(|r| r.end).collect();
    ds.snap(&cuts)
        .into_iter()
        .enumerate()
        .map(|(i, (start, end))| ShardRange {
            index: i as u32,
            start,
            end,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_io::shard::{align_in_memory, records};
    use proptest::prelude::*;

    #[test]
    fn ranges_cover_the_object_exactly() {
        let shards = plan(10_000, 3_000, 1);
        assert_eq!(shards.len(), 4);
        assert_eq!(shards[0].start, 0);
        assert_eq!(shards.last().map(|s| s.end), Some(10_000));
        assert!(shards.windows(2).all(|w| w[0].end == w[1].start));
        assert!(plan(0, 100, 1).is_empty());
    }

    #[test]
    fn the_shard_count_is_capped() {
        assert_eq!(plan(10 * MAX_SHARDS, 1, 1).len() as u64, MAX_SHARDS);
        assert_eq!(plan(10 * MAX_SHARDS, 1, 3).len() as u64, MAX_SHARDS);
    }

    #[test]
    fn the_shard_count_is_a_multiple_of_the_slots() {
        assert_eq!(plan(9_000, 1_000, 2).len(), 10);
        assert_eq!(plan(9_000, 1_000, 4).len(), 12);
        assert_eq!(plan(9_000, 1_000, 3).len(), 9);
        assert_eq!(plan(500, 1_000, 4).len(), 1, "one shard stays one shard");
        assert_eq!(
            plan(4_000, 1_000, 1_000).len(),
            4,
            "fewer shards than slots are not cut into slivers"
        );
        assert_eq!(plan(4_000, 1_000, 4).len(), 4);
        assert_eq!(plan(5_000, 1_000, 4).len(), 8);
        assert_eq!(plan(3, 1, 4).len(), 3, "never more shards than bytes");
    }

    /// A JSONL object from records of the given lengths, with blank lines and a missing final
    /// newline sometimes.
    fn object(lens: &[usize], blank_every: usize, final_newline: bool) -> (Vec<u8>, Vec<String>) {
        let mut data = Vec::new();
        let mut recs = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let rec = format!("{{\"i\":{i},\"p\":\"{}\"}}", "x".repeat(len));
            data.extend_from_slice(rec.as_bytes());
            recs.push(rec);
            if i + 1 < lens.len() || final_newline {
                data.push(b'\n');
            }
            if blank_every > 0 && i % blank_every == 0 && i + 1 < lens.len() {
                data.push(b'\n');
            }
        }
        (data, recs)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn shard_boundaries_never_split_or_drop_a_record(
            lens in prop::collection::vec(0usize..300, 1..120),
            shard_bytes in 1u64..4000,
            blank_every in 0usize..7,
            final_newline in any::<bool>(),
            slots in 1u32..6,
        ) {
            let (data, expected) = object(&lens, blank_every, final_newline);
            let mut seen = Vec::new();
            for s in plan(data.len() as u64, shard_bytes, slots) {
                if let Some(a) = align_in_memory(&data, s.start, s.end) {
                    for r in records(a.begin, &data[a.begin as usize..a.end as usize]) {
                        seen.push(String::from_utf8(r.text.to_vec()).expect("utf8"));
                    }
                }
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
