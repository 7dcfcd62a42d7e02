//! Human forms of CLI values: durations (`90d`, `12h`, `30m`, `45s`, `2w`), rate
//! limits (`60/min`, `1000/hour`, `10/s`, `500/30s`) and executions refills
//! (`1000/30d`, `100/day`).

use serde_json::{Value, json};

/// Seconds in a duration like `90d`; a bare number is seconds.
pub fn duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90d, 12h, 30m or 45s"))?;
    let unit_secs = match unit {
        "" | "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" | "hour" => 3_600,
        "d" | "day" => 86_400,
        "w" | "week" => 7 * 86_400,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use s, m, h, d or w)"
            ));
        }
    };
    n.checked_mul(unit_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// Milliseconds in a run timeout like `500ms`, `10s` or `1m`; a bare number is seconds.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    match s.trim().strip_suffix("ms") {
        Some(ms) => ms
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like 500ms, 10s or 1m")),
        None => duration_secs(s).map(|secs| secs.saturating_mul(1000)),
    }
}

/// `{"limit", "windowSec"}` from `60/min` or `500/30s`.
pub fn rate_limit(s: &str) -> Result<Value, String> {
    let (limit, window_sec) = per_period(s, "a rate limit like 60/min")?;
    let limit = u32::try_from(limit).map_err(|_| format!("`{s}`: the limit is too large"))?;
    Ok(json!({ "limit": limit, "windowSec": window_sec }))
}

/// `{"amount", "intervalSec"}` from `1000/30d` or `100/day`.
pub fn refill(s: &str) -> Result<Value, String> {
    let (amount, interval_sec) = per_period(s, "a refill like 1000/30d or 100/day")?;
    Ok(json!({ "amount": amount, "intervalSec": interval_sec }))
}

/// `N/period`: the number and the period in seconds (`s`, `min`, `h`, `d`, `w`,
/// their long names, or a duration like `30d`).
fn per_period(s: &str, what: &str) -> Result<(u64, u64), String> {
    let (n, period) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not {what}"))?;
    let n: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: `{n}` is not a number"))?;
    let secs = match period.trim() {
        "s" | "sec" | "second" => 1,
        "min" | "minute" => 60,
        "h" | "hour" => 3_600,
        "d" | "day" => 86_400,
        "w" | "week" => 7 * 86_400,
        other => duration_secs(other)?,
    };
    Ok((n, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_secs("90d"), Ok(90 * 86_400));
        assert_eq!(duration_secs("12h"), Ok(43_200));
        assert_eq!(duration_secs("30m"), Ok(1_800));
        assert_eq!(duration_secs("45"), Ok(45));
        assert_eq!(duration_secs("2w"), Ok(14 * 86_400));
        assert!(duration_secs("d").is_err());
        assert!(duration_secs("5y").is_err());
    }

    #[test]
    fn rate_limits() {
        assert_eq!(
            rate_limit("60/min"),
            Ok(json!({"limit": 60, "windowSec": 60}))
        );
        assert_eq!(
            rate_limit("1000/hour"),
            Ok(json!({"limit": 1000, "windowSec": 3600}))
        );
        assert_eq!(
            rate_limit("500/30s"),
            Ok(json!({"limit": 500, "windowSec": 30}))
        );
        assert!(rate_limit("60").is_err());
        assert!(rate_limit("x/min").is_err());
        assert!(rate_limit("5000000000/min").is_err());
    }

    #[test]
    fn refills() {
        assert_eq!(
            refill("1000/30d"),
            Ok(json!({"amount": 1000, "intervalSec": 30 * 86_400}))
        );
        assert_eq!(
            refill("100/day"),
            Ok(json!({"amount": 100, "intervalSec": 86_400}))
        );
        assert_eq!(refill("5/2s"), Ok(json!({"amount": 5, "intervalSec": 2})));
        assert!(refill("1000").is_err());
        assert!(refill("1000/fortnight").is_err());
    }
}
