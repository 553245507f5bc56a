//! Prices in integer micro-credits, from a Mesh's pricing.

use infermesh_crds::Pricing;

/// Micro-credits per credit.
pub const MICRO: i64 = 1_000_000;

/// A Mesh's prices, converted once to micro-credits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    /// Per GPU-second.
    pub per_gpu_second: i64,
    /// Per CPU-second.
    pub per_cpu_second: i64,
    /// Per 1,000 records.
    pub per_thousand_records: i64,
}

/// Credits (as a Mesh writes them) in micro-credits.
pub fn credits_to_micro(credits: f64) -> i64 {
    (credits * MICRO as f64).round() as i64
}

fn micro(credits: f64) -> i64 {
    credits_to_micro(credits)
}

impl From<&Pricing> for Price {
    fn from(p: &Pricing) -> Self {
        Self {
            per_gpu_second: micro(p.per_gpu_second),
            per_cpu_second: micro(p.per_cpu_second),
            per_thousand_records: micro(p.per_thousand_records),
        }
    }
}

impl Price {
    /// What a shard costs: device seconds at the device's rate plus the per-record rate.
    pub fn charge(&self, device: &str, seconds: f64, records: u64) -> i64 {
        let rate = if device == "cpu" {
            self.per_cpu_second
        } else {
            self.per_gpu_second
        };
        let time = (rate as f64 * seconds.max(0.0)).round() as i64;
        let per_record = (i128::from(self.per_thousand_records) * i128::from(records) + 500) / 1000;
        time + per_record as i64
    }
}

/// Formats micro-credits as a decimal credit amount (`12.345678`).
pub fn format_credits(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    format!("{sign}{}.{:06}", m / MICRO as u64, m % MICRO as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_combine_time_and_records_in_micro_credits() {
        let price = Price::from(&Pricing {
            per_gpu_second: 1.0,
            per_cpu_second: 0.05,
            per_thousand_records: 0.2,
        });
        assert_eq!(price.charge("cpu", 2.0, 0), 100_000);
        assert_eq!(price.charge("cuda", 0.5, 0), 500_000);
        assert_eq!(price.charge("cpu", 0.0, 1500), 300_000);
        assert_eq!(price.charge("cpu", 1.0, 1000), 250_000);
    }

    #[test]
    fn credits_format_with_six_decimals() {
        assert_eq!(format_credits(1_500_000), "1.500000");
        assert_eq!(format_credits(-42), "-0.000042");
    }
}
