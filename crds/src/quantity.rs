//! Byte quantities in the Kubernetes notation (`1Mi`, `512Ki`, `2G`, `1048576`).

/// Parses a byte quantity such as `1Mi`, `64Ki`, `2G` or `1048576` into bytes.
pub fn parse_bytes(q: &str) -> Result<u64, String> {
    let q = q.trim();
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

#[cfg(test)]
mod tests {
    use super::parse_bytes;

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
    }
}
