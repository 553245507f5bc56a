//! What the store tests check through [`Location`], whatever the scheme.
#![allow(dead_code)]

use infermesh_io::{Location, ObjectError, read_aligned};

/// A JSONL object of `n` records of varied length, some longer than `read_aligned`'s 64 KiB
/// step so that its follow-up reads run too.
pub fn jsonl(n: usize) -> Vec<u8> {
    let mut data = Vec::new();
    for i in 0..n {
        let len = if i % 7 == 3 {
            70_000
        } else {
            10 + (i * 37) % 400
        };
        data.extend_from_slice(format!("{{\"i\":{i},\"text\":\"").as_bytes());
        data.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, len));
        data.extend_from_slice(b"\"}\n");
    }
    data
}

/// Reads `loc`, which holds `data`: its size, whole, raw ranges, and record-aligned shards
/// that together give back every record exactly once.
pub async fn check_reads(loc: &Location, data: &[u8]) {
    let size = loc.size().await.expect("size");
    assert_eq!(size, data.len() as u64, "size of {}", loc.uri());
    assert_eq!(loc.get().await.expect("get"), data, "get {}", loc.uri());
    for (a, b) in [
        (0, 1),
        (0, 100),
        (5, 70_005),
        (size - 3, size),
        (size - 3, size + 10),
    ] {
        let got = loc.get_range(a, b).await.expect("get_range");
        assert_eq!(
            got,
            &data[a as usize..b.min(size) as usize],
            "range {a}..{b}"
        );
    }
    assert!(loc.get_range(7, 7).await.expect("empty range").is_empty());
    for shards in [1u64, 3, 8] {
        let mut joined = Vec::new();
        let mut next = 0;
        for s in 0..shards {
            let (start, end) = (size * s / shards, size * (s + 1) / shards);
            let (begin, bytes) = read_aligned(loc, start, end, size, None)
                .await
                .expect("aligned");
            if !bytes.is_empty() {
                assert_eq!(
                    begin, next,
                    "shard {s}/{shards} starts where the last ended"
                );
                next = begin + bytes.len() as u64;
            }
            joined.extend_from_slice(&bytes);
        }
        assert_eq!(joined, data, "{shards} aligned shards give back the object");
    }
}

/// `loc` holds `found` bytes but was planned at `planned`: the last shard of any plan fails
/// with `Changed`, naming both sizes, not transient; no shard panics, and any other shard that
/// fails says the same.
pub async fn check_changed(loc: &Location, planned: u64, found: u64) {
    let want = format!(
        "input {} changed since it was planned: {planned} bytes planned, {found} found; \
         resubmit the workload",
        loc.uri()
    );
    for shards in [1u64, 3, 8] {
        for s in 0..shards {
            let (start, end) = (planned * s / shards, planned * (s + 1) / shards);
            match read_aligned(loc, start, end, planned, None).await {
                Err(e) => {
                    assert!(
                        matches!(e, ObjectError::Changed { .. }) && !e.is_transient(),
                        "shard {s}/{shards}: {e:?}"
                    );
                    assert_eq!(e.to_string(), want, "shard {s}/{shards}");
                }
                Ok(_) => assert!(
                    s + 1 < shards,
                    "the last shard {s}/{shards} read {found} bytes"
                ),
            }
        }
    }
}

/// `uri` names no object: every read says NotFound, which is not transient.
pub async fn check_not_found(uri: &str) {
    let loc = Location::parse(uri).expect("uri");
    let size = loc.size().await;
    assert!(
        matches!(size, Err(ObjectError::NotFound { .. })),
        "size of {uri}: {size:?}"
    );
    let got = loc.get().await;
    assert!(
        matches!(got, Err(ObjectError::NotFound { .. })),
        "get {uri}: {got:?}"
    );
    let range = loc.get_range(0, 10).await;
    assert!(
        matches!(range, Err(ObjectError::NotFound { .. })),
        "range of {uri}: {range:?}"
    );
    let err = size.expect_err("missing");
    assert!(!err.is_transient());
    assert_eq!(err.to_string(), format!("{uri} does not exist"));
}
