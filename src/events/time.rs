//! Timestamps: RFC 3339 parsing to milliseconds since the Unix epoch, and the clock-skew
//! correction of ARCHITECTURE.md. Pure: the receive time is always passed in.

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Parses an RFC 3339 timestamp (`2026-11-20T09:14:03.120Z`, `…+02:00`) to milliseconds.
/// Fractions beyond milliseconds are truncated. Returns `None` for anything else.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return None;
        }
        for _ in (at - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match b.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = two_digits(*h1, *h2)?;
            let minutes = two_digits(*m1, *m2)?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let total = hours * 60 + minutes;
            if *sign == b'+' { total } else { -total }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(seconds * 1_000 + millis)
}

fn two_digits(a: u8, b: u8) -> Option<i64> {
    (a.is_ascii_digit() && b.is_ascii_digit())
        .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Formats milliseconds as RFC 3339 UTC with milliseconds (`2026-11-20T09:14:03.120Z`).
pub fn format_rfc3339(at: Millis) -> String {
    let days = at.div_euclid(86_400_000);
    let in_day = at.rem_euclid(86_400_000);
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1_000 % 60,
        in_day % 1_000
    )
}

/// How an event's time was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrected {
    /// The corrected event time.
    pub event_time: Millis,
    /// `sent_at − received_at`: how far the device clock was ahead (negative: behind).
    pub skew: Millis,
    /// Whether the time was in the future and clamped to the receive time.
    pub clamped: bool,
}

/// Corrects device clock skew: `event_time = received_at − (sent_at − timestamp)`. Without
/// `sent_at` the device timestamp is taken as it is. A result in the future (beyond
/// `tolerance`) is clamped to `received_at`.
pub fn correct(
    timestamp: Millis,
    sent_at: Option<Millis>,
    received_at: Millis,
    tolerance: Millis,
) -> Corrected {
    let (event_time, skew) = match sent_at {
        Some(sent_at) => (
            received_at.saturating_sub(sent_at.saturating_sub(timestamp)),
            sent_at.saturating_sub(received_at),
        ),
        None => (timestamp, 0),
    };
    if event_time > received_at.saturating_add(tolerance) {
        Corrected {
            event_time: received_at,
            skew,
            clamped: true,
        }
    } else {
        Corrected {
            event_time,
            skew,
            clamped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-20T09:14:03.120Z"),
            Some(1_795_166_043_120)
        );
        assert_eq!(
            parse_rfc3339("2026-11-20T10:14:03.12+01:00"),
            Some(1_795_166_043_120)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00.123456Z"),
            Some(1_709_164_800_123)
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.999Z"), Some(-1));
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for bad in [
            "",
            "2026-11-20",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-20T24:00:00Z",
            "2026-11-20T09:14:03",
            "2026-11-20T09:14:03.Z",
            "2026-11-20T09:14:03Z junk",
            "2026-11-20T09:14:03+1:00",
            "２０２６-11-20T09:14:03Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn skew_is_corrected_and_the_future_clamped() {
        // The tablet's clock runs 10 minutes fast.
        let received = 1_000_000_000;
        let sent = received + 600_000;
        let corrected = correct(sent - 5_000, Some(sent), received, 60_000);
        assert_eq!(corrected.event_time, received - 5_000);
        assert_eq!(corrected.skew, 600_000);
        let future = correct(received + 3_600_000, None, received, 60_000);
        assert!(future.clamped);
        assert_eq!(future.event_time, received);
    }

    proptest! {
        #[test]
        fn formatting_and_parsing_round_trip(at in -62_000_000_000_000i64..250_000_000_000_000i64) {
            let text = format_rfc3339(at);
            prop_assert_eq!(parse_rfc3339(&text), Some(at), "{}", text);
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,40}") {
            let _ = parse_rfc3339(&text);
        }

        /// Timestamps built from their parts, in any offset and with any fraction, parse to
        /// what a naive model computes: days since the epoch by counting every day of every
        /// year and month before, then the time of day, less the offset.
        #[test]
        fn parsing_agrees_with_a_naive_model(
            year in 1900i64..2200, month in 1i64..=12, day_seed in 0i64..31,
            hour in 0i64..24, minute in 0i64..60, second in 0i64..60,
            fraction in "[0-9]{0,9}", offset in -(14 * 60i64)..=(14 * 60),
        ) {
            let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let month_days = |y: i64, m: i64| match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let day = 1 + day_seed % month_days(year, month);
            let mut days: i64 = 0;
            if year >= 1970 {
                for y in 1970..year { days += if leap(y) { 366 } else { 365 }; }
            } else {
                for y in year..1970 { days -= if leap(y) { 366 } else { 365 }; }
            }
            for m in 1..month { days += month_days(year, m); }
            days += day - 1;
            let millis_of_fraction = fraction.chars().take(3).fold(0i64, |acc, c| acc * 10 + i64::from(c as u8 - b'0'))
                * 10i64.pow(3 - fraction.len().min(3) as u32);
            let expected = ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000
                + millis_of_fraction - offset * 60_000;
            let zone = if offset == 0 {
                "Z".to_owned()
            } else {
                let sign = if offset < 0 { '-' } else { '+' };
                format!("{sign}{:02}:{:02}", offset.abs() / 60, offset.abs() % 60)
            };
            let dot = if fraction.is_empty() { String::new() } else { format!(".{fraction}") };
            let text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{dot}{zone}");
            prop_assert_eq!(parse_rfc3339(&text), Some(expected), "{}", text);
        }
    }
}
