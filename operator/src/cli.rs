//! What the command-line tools share: printing that ends quietly when the reader goes away
//! (`infermesh ledger events | head -1`), and strict parsing of the values people type.

use std::io::Write;

/// Writes to standard output; when the reader closed the pipe, exits at once and quietly
/// (status 0: the reader had what it wanted), instead of panicking as `println!` does.
pub fn out(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("infermesh: cannot write to standard output: {e}");
        std::process::exit(2);
    }
}

/// `println!` that ends quietly on a closed pipe (see [`out`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that ends quietly on a closed pipe (see [`out`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::out(format_args!($($arg)*)) };
}

/// The most credits one ledger amount (a grant, a budget) may carry: the same bound as a
/// Mesh budget. With every account kept within ±[`MAX_BALANCE_CREDITS`], no sum the ledger
/// computes can overflow its 64-bit micro-credits.
pub use crate::core::pricing::MAX_BUDGET_CREDITS as MAX_AMOUNT_CREDITS;

/// The most credits an account's balance may reach either way: 1,000,000,000,000 (10^18
/// micro-credits, inside the 9.2 x 10^18 of a signed 64-bit integer).
pub const MAX_BALANCE_CREDITS: f64 = 1e12;

/// Parses a credit amount as people type it: finite, non-zero, at most
/// [`MAX_AMOUNT_CREDITS`] either way, at most six decimals' worth (micro-credits).
pub fn credits(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of credits"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number of credits"));
    }
    if v == 0.0 {
        return Err("a grant of 0 credits changes nothing".into());
    }
    if v.abs() > MAX_AMOUNT_CREDITS {
        return Err(format!(
            "{s} credits is more than one grant may carry ({MAX_AMOUNT_CREDITS:e} either way)"
        ));
    }
    Ok(v)
}

/// Parses a time as people type it: RFC 3339 (`2026-12-01T08:00:00Z`) or a date
/// (`2026-12-01`, midnight UTC at its start, or with `end_of_day` the last microsecond).
pub fn time(s: &str, end_of_day: bool) -> Result<String, String> {
    use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t
            .with_timezone(&Utc)
            .to_rfc3339_opts(SecondsFormat::Micros, true));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        let t = if end_of_day {
            d.and_hms_micro_opt(23, 59, 59, 999_999)
        } else {
            d.and_hms_opt(0, 0, 0)
        };
        if let Some(t) = t {
            return Ok(t.and_utc().to_rfc3339_opts(SecondsFormat::Micros, true));
        }
    }
    Err(format!(
        "`{s}` is not a time: use RFC 3339 (2026-12-01T08:00:00Z) or a date (2026-12-01)"
    ))
}

/// A `--from` time (a date means its start).
pub fn from_time(s: &str) -> Result<String, String> {
    time(s, false)
}

/// A `--to` time (a date means its end).
pub fn to_time(s: &str) -> Result<String, String> {
    time(s, true)
}

/// Parses an account name: `namespace/NAME`, `agent/ID` or `mesh/NAME`.
pub fn account(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some(("namespace" | "agent" | "mesh", rest)) if !rest.trim().is_empty() => Ok(s.into()),
        _ => Err(format!(
            "`{s}` is not an account: use namespace/NAME, agent/ID or mesh/NAME"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_must_be_finite_non_zero_and_bounded() {
        assert_eq!(credits("12.5"), Ok(12.5));
        assert_eq!(credits("-3"), Ok(-3.0));
        for bad in ["1e300", "NaN", "inf", "-inf", "abc", "0", "", "1e10"] {
            let e = credits(bad).expect_err(bad);
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(
            credits("1e300")
                .unwrap_err()
                .contains("more than one grant")
        );
        assert!(credits("NaN").unwrap_err().contains("finite"));
    }

    #[test]
    fn times_are_rfc3339_or_dates() {
        assert_eq!(
            from_time("2026-12-01").as_deref(),
            Ok("2026-12-01T00:00:00.000000Z")
        );
        assert_eq!(
            to_time("2026-12-01").as_deref(),
            Ok("2026-12-01T23:59:59.999999Z")
        );
        assert_eq!(
            from_time("2026-12-01T10:00:00+02:00").as_deref(),
            Ok("2026-12-01T08:00:00.000000Z")
        );
        for bad in ["yesterday", "garbage", "2026-13-01", "notadate", ""] {
            assert!(from_time(bad).unwrap_err().contains("not a time"), "{bad}");
        }
    }

    #[test]
    fn accounts_have_a_kind_and_a_name() {
        assert!(account("namespace/team-a").is_ok());
        assert!(account("agent/quickstart-local-0").is_ok());
        for bad in ["nobody", "namespace/", "team/a", ""] {
            assert!(
                account(bad).unwrap_err().contains("not an account"),
                "{bad}"
            );
        }
    }
}
