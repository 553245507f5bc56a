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

/// The most credits a budget entry may hold (and a grant carry): 10^9.
pub const MAX_BUDGET_CREDITS: f64 = 1e9;

/// The most credits a price (per GPU-second, CPU-second or 1,000 records) may be: 10^6.
pub const MAX_PRICE_CREDITS: f64 = 1e6;

/// Credits (as a Mesh or a person writes them) in micro-credits; a value that is not finite
/// or does not fit 64 bits is an error, never a silent cap.
pub fn credits_to_micro(credits: f64) -> Result<i64, String> {
    if !credits.is_finite() {
        return Err(format!("{credits} is not a finite number of credits"));
    }
    let micro = (credits * MICRO as f64).round();
    if micro.abs() >= 9.0e18 {
        return Err(format!("{credits} credits is out of range"));
    }
    Ok(micro as i64)
}

/// Checks one amount of a Mesh: finite, not negative, at most `max`.
pub fn checked_amount(field: &str, credits: f64, max: f64) -> Result<i64, String> {
    if !credits.is_finite() || credits < 0.0 {
        return Err(format!(
            "{field}: {credits} is not a finite, non-negative number of credits"
        ));
    }
    if credits > max {
        return Err(format!(
            "{field}: {credits} credits is more than the maximum of {max:e}"
        ));
    }
    credits_to_micro(credits).map_err(|e| format!("{field}: {e}"))
}

impl TryFrom<&Pricing> for Price {
    type Error = String;

    fn try_from(p: &Pricing) -> Result<Self, String> {
        Ok(Self {
            per_gpu_second: checked_amount(
                "spec.pricing.perGpuSecond",
                p.per_gpu_second,
                MAX_PRICE_CREDITS,
            )?,
            per_cpu_second: checked_amount(
                "spec.pricing.perCpuSecond",
                p.per_cpu_second,
                MAX_PRICE_CREDITS,
            )?,
            per_thousand_records: checked_amount(
                "spec.pricing.perThousandRecords",
                p.per_thousand_records,
                MAX_PRICE_CREDITS,
            )?,
        })
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
        let price = Price::try_from(&Pricing {
            per_gpu_second: 1.0,
            per_cpu_second: 0.05,
            per_thousand_records: 0.2,
        })
        .expect("valid prices");
        use super::super::accounting::{Device, charge};
        use std::time::Duration;
        assert_eq!(
            charge(&price, Device::Cpu, Duration::from_secs(2), 0),
            Ok(100_000)
        );
        assert_eq!(
            charge(&price, Device::Gpu, Duration::from_millis(500), 0),
            Ok(500_000)
        );
        assert_eq!(
            charge(&price, Device::Cpu, Duration::ZERO, 1500),
            Ok(300_000)
        );
        assert_eq!(
            charge(&price, Device::Cpu, Duration::from_secs(1), 1000),
            Ok(250_000)
        );
    }

    #[test]
    fn amounts_that_are_not_finite_or_out_of_range_are_errors() {
        assert_eq!(credits_to_micro(1.5), Ok(1_500_000));
        assert!(credits_to_micro(f64::NAN).is_err());
        assert!(credits_to_micro(1e300).is_err());
        assert!(
            checked_amount("b", -100.0, MAX_BUDGET_CREDITS)
                .unwrap_err()
                .contains("non-negative")
        );
        assert!(
            checked_amount("b", 1e300, MAX_BUDGET_CREDITS)
                .unwrap_err()
                .contains("maximum")
        );
        assert!(checked_amount("b", f64::INFINITY, MAX_BUDGET_CREDITS).is_err());
        let bad = Pricing {
            per_gpu_second: f64::NAN,
            per_cpu_second: 0.0,
            per_thousand_records: 0.0,
        };
        assert!(Price::try_from(&bad).unwrap_err().contains("perGpuSecond"));
    }

    #[test]
    fn credits_format_with_six_decimals() {
        assert_eq!(format_credits(1_500_000), "1.500000");
        assert_eq!(format_credits(-42), "-0.000042");
    }
}
