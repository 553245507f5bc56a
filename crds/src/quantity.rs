//! Byte quantities in the Kubernetes notation (`1Mi`, `512Ki`, `2G`, `1048576`).

/// Parses a byte quantity such as `1Mi`, `64Ki`, `2G` or `1048576` into bytes.
pub fn parse_bytes(q: &str) -> Result<u64, String> {
    let q = q.trim();
    if q.starts_with('-') {
        return Err(format!("`{q}` must be a non-negative quantity"));
    }
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mult: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit `{other}` in quantity `{q}` (use Ki, Mi, Gi, K, M, G)"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{q}` is not a byte quantity such as 1Mi"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{q}` must be a non-negative quantity"));
    }
    Ok((value * mult as f64).round() as u64)
}

/// What a byte quantity given as a string must look like (the CRD schema's `pattern`).
pub const QUANTITY_PATTERN: &str = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|K|M|G|T)?$";

/// `shardBytes` when the spec leaves it out.
pub const DEFAULT_SHARD_BYTES: &str = "1Mi";

/// The smallest `shardBytes` taken: below it an input is cut into about a shard per record
/// (`shardBytes: "1"` made 27,459 shards of 200 records), each paying an assignment, a read
/// and an output part.
pub const MIN_SHARD_BYTES: u64 = 1 << 10;

/// Parses a shard size (see [`parse_bytes`]) and refuses one below [`MIN_SHARD_BYTES`],
/// naming the value and the minimum.
pub fn parse_shard_bytes(q: &str) -> Result<u64, String> {
    let bytes = parse_bytes(q)?;
    if bytes < MIN_SHARD_BYTES {
        return Err(format!(
            "`{}` is {bytes} byte{}, below the minimum of 1Ki ({MIN_SHARD_BYTES} bytes)",
            q.trim(),
            if bytes == 1 { "" } else { "s" }
        ));
    }
    Ok(bytes)
}

/// Deserializes a byte quantity given either as a string (`1Mi`) or, as Kubernetes
/// quantities may be, as a plain integer of bytes (`131072`), keeping its string form (which
/// [`parse_bytes`] checks). A null (which the API server keeps for a nullable field) is the
/// default shard size.
pub fn int_or_string<'de, D>(de: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::{Error, Visitor};
    struct IntOrString;
    impl Visitor<'_> for IntOrString {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte quantity: a string such as \"1Mi\" or a whole number of bytes")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        // Kept as written: the API server takes any integer here, so a negative one must
        // still read (for validation to refuse it, naming the field) rather than make the
        // whole object unreadable.
        fn visit_i64<E: Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_unit<E: Error>(self) -> Result<String, E> {
            Ok(DEFAULT_SHARD_BYTES.to_string())
        }
        fn visit_none<E: Error>(self) -> Result<String, E> {
            Ok(DEFAULT_SHARD_BYTES.to_string())
        }
    }
    de.deserialize_any(IntOrString)
}

/// The CRD schema of a byte quantity that may be a string or an integer, as Kubernetes
/// writes it for its own quantities (`x-kubernetes-int-or-string`); the pattern applies to
/// strings only.
pub fn int_or_string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "pattern": QUANTITY_PATTERN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("1Mi"), Ok(1 << 20));
        assert_eq!(parse_bytes("64Ki"), Ok(65536));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5Ki"), Ok(1536));
        assert_eq!(parse_bytes("4096"), Ok(4096));
    }

    #[test]
    fn rejects_unknown_units_and_garbage() {
        assert!(parse_bytes("1Xi").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("").is_err());
        assert_eq!(
            parse_bytes("-1"),
            Err("`-1` must be a non-negative quantity".to_string())
        );
    }

    #[test]
    fn a_shard_size_below_one_kib_is_refused_naming_value_and_minimum() {
        assert_eq!(parse_shard_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_shard_bytes("131072"), Ok(131_072));
        let err = parse_shard_bytes("1").expect_err("too small");
        assert_eq!(err, "`1` is 1 byte, below the minimum of 1Ki (1024 bytes)");
        let err = parse_shard_bytes("1023").expect_err("too small");
        assert!(
            err.contains("`1023` is 1023 bytes") && err.contains("1Ki"),
            "{err}"
        );
        assert!(
            parse_shard_bytes("0")
                .expect_err("zero")
                .contains("minimum"),
            "zero is refused too"
        );
        assert!(parse_shard_bytes("a lot").is_err());
    }
}
