//! ISO 8601 date and time as Python's `datetime.isoformat()` writes it, the
//! form Celery uses for `eta`, `expires` and `date_done`. The calendar is
//! chrono's; this module only fixes the accepted shapes and the clamping to
//! microseconds since the Unix epoch.

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};

/// Longest `eta` / `expires` text accepted, in bytes: the longest form
/// Python writes (nanosecond fraction, offset with seconds) is 41 bytes. A
/// longer header is refused at decode instead of parsed.
pub const MAX_TIME_LEN: usize = 64;

/// The latest time formatted as itself: 9999-12-31T23:59:59.999999Z, the
/// last one Python's `datetime` can read. Later times are written as it.
pub const MAX_FORMATTED_US: u64 = 253_402_300_799_999_999;

/// Parses `YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]][Z|±HH[:MM[:SS]]]` into
/// microseconds since the Unix epoch (0 for earlier times). No offset means
/// UTC, as Celery's protocol v2 says. Digits past the microsecond are
/// dropped; text longer than [`MAX_TIME_LEN`] is refused.
pub fn parse_iso8601(s: &str) -> Option<u64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() > MAX_TIME_LEN
        || b.len() < 16
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || !b.is_ascii()
    {
        return None;
    }
    let (local, offset) = split_offset(s)?;
    let local = normalise(local)?;
    let naive = NaiveDateTime::parse_from_str(&local, "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    let at: DateTime<FixedOffset> = offset.from_local_datetime(&naive).single()?;
    let us = at.timestamp_micros();
    Some(u64::try_from(us).unwrap_or(0))
}

/// Splits the trailing UTC offset (`Z`, `±HH`, `±HHMM`, `±HH:MM`,
/// `±HH:MM:SS`) off the local date and time.
fn split_offset(s: &str) -> Option<(&str, FixedOffset)> {
    let utc = FixedOffset::east_opt(0)?;
    if let Some(local) = s.strip_suffix(['Z', 'z']) {
        return Some((local, utc));
    }
    // The date's own '-' are before byte 10; a sign after the time is the offset.
    let Some(at) = s[11..].find(['+', '-']).map(|i| i + 11) else {
        return Some((s, utc));
    };
    let (local, off) = s.split_at(at);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let digits = off[1..].replace(':', "");
    if !matches!(digits.len(), 2 | 4 | 6) || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let part =
        |i: usize| -> Option<i32> { digits.get(i..i + 2).map_or(Some(0), |p| p.parse().ok()) };
    let (h, m, sec) = (part(0)?, part(2)?, part(4)?);
    if h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some((
        local,
        FixedOffset::east_opt(sign * (h * 3600 + m * 60 + sec))?,
    ))
}

/// The local part in the one shape chrono is asked to parse: `T` between
/// date and time, seconds present, `.` before at most nine fraction digits.
fn normalise(local: &str) -> Option<String> {
    let mut out = String::with_capacity(local.len() + 3);
    out.push_str(&local[..10]);
    out.push('T');
    let time = &local[11..];
    match time.len() {
        5 => {
            out.push_str(time);
            out.push_str(":00");
        }
        8 => out.push_str(time),
        n if n > 9 && matches!(time.as_bytes()[8], b'.' | b',') => {
            let digits = &time[9..];
            if !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            out.push_str(&time[..8]);
            out.push('.');
            // chrono reads up to nanoseconds; finer digits cannot matter.
            out.push_str(&digits[..digits.len().min(9)]);
        }
        _ => return None,
    }
    Some(out)
}

/// Formats microseconds since the Unix epoch as Python's
/// `datetime.isoformat()` does for an aware UTC time:
/// `2024-05-01T12:00:00.123456+00:00`. Times after [`MAX_FORMATTED_US`]
/// (a saturated deadline) are written as that time.
pub fn format_iso8601(us: u64) -> String {
    let us = i64::try_from(us.min(MAX_FORMATTED_US)).unwrap_or(i64::MAX);
    let at = Utc
        .timestamp_micros(us)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_as_python_writes_it() {
        let base = 1_714_564_800_000_000; // 2024-05-01T12:00:00Z
        for (text, want) in [
            ("2024-05-01T12:00:00+00:00", base),
            ("2024-05-01T12:00:00", base),
            ("2024-05-01 12:00:00Z", base),
            ("2024-05-01T14:00:00.250000+02:00", base + 250_000),
            ("2024-05-01T11:30:00.5-0030", base + 500_000),
            ("2024-05-01T12:00", base),
            ("2024-05-01T12:00:00.123456789+00:00", base + 123_456),
            ("1969-12-31T23:59:59Z", 0),
        ] {
            assert_eq!(parse_iso8601(text), Some(want), "{text}");
        }
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00",
            "2023-02-29T00:00:00",
            "2024-05-01T24:00:00",
            "2024-05-01T12:00:00+5",
            "2024-05-01T12:00:00.+00:00",
            "yesterday-at-noon",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
        assert_eq!(format_iso8601(base + 7), "2024-05-01T12:00:00.000007+00:00");
        assert_eq!(format_iso8601(0), "1970-01-01T00:00:00.000000+00:00");
    }

    proptest::proptest! {
        #[test]
        fn iso8601_round_trips(us in 0u64..(253_402_300_799 * 1_000_000)) {
            proptest::prop_assert_eq!(parse_iso8601(&format_iso8601(us)), Some(us));
        }
        #[test]
        fn iso8601_round_trips_with_any_offset(
            us in 0u64..(253_402_300_799 * 1_000_000),
            offset_min in -(23 * 60 + 59)..(23 * 60 + 59i32),
        ) {
            // Written with an offset, as a Python client in another zone would.
            let off = FixedOffset::east_opt(offset_min * 60).unwrap();
            let at = Utc.timestamp_micros(i64::try_from(us).unwrap()).unwrap().with_timezone(&off);
            let text = at.format("%Y-%m-%dT%H:%M:%S%.6f%:z").to_string();
            proptest::prop_assert_eq!(parse_iso8601(&text), Some(us), "{}", text);
        }

        #[test]
        fn formatting_never_panics_and_stays_parsable(us in proptest::prelude::any::<u64>()) {
            let text = format_iso8601(us);
            proptest::prop_assert_eq!(parse_iso8601(&text), Some(us.min(MAX_FORMATTED_US)));
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}") {
            let _ = parse_iso8601(&s);
        }
    }

    #[test]
    fn overlong_and_far_times() {
        let long = format!("2024-05-01T12:00:00.{}+00:00", "1".repeat(70_000));
        assert_eq!(parse_iso8601(&long), None);
        assert_eq!(format_iso8601(u64::MAX), "9999-12-31T23:59:59.999999+00:00");
        assert_eq!(
            parse_iso8601("2024-05-01T12:00:00+05:30:15"),
            Some(1_714_564_800_000_000 - (5 * 3600 + 30 * 60 + 15) * 1_000_000)
        );
        assert_eq!(
            parse_iso8601("2024-05-01T12:00:00,5Z"),
            Some(1_714_564_800_500_000)
        );
    }
}
