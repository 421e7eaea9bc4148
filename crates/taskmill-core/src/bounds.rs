//! Size bounds on everything the worker writes onto a copy of a message
//! (dead letter, retry, deferral): a copy whose header frame exceeds the
//! broker's `frame_max` (131072 bytes by default) is refused and closes the
//! channel, so no input may grow a copy's headers without limit.
//!
//! The worker's own texts (reason details) are cut at [`MAX_DETAIL_BYTES`]
//! with [`TRUNCATED_MARKER`]; headers copied from the original are cut at
//! [`MAX_COPIED_VALUE_BYTES`] each, and all of a copy's headers stay under
//! [`MAX_COPY_HEADER_BYTES`] (the broker adapter drops the largest copied
//! values first and names them in [`H_DROPPED_HEADERS`]).

use std::borrow::Cow;

/// Longest reason or error text written on a copy, in bytes, marker included.
pub const MAX_DETAIL_BYTES: usize = 2048;
/// Longest header value copied from the original message, in bytes (a
/// string is cut with the marker; a longer value of another type is dropped).
pub const MAX_COPIED_VALUE_BYTES: usize = 4096;
/// The most header bytes a copy carries, as AMQP encodes them: an eighth of
/// RabbitMQ's default `frame_max`, leaving room for the other properties.
pub const MAX_COPY_HEADER_BYTES: usize = 16 * 1024;
/// Appended to a text that was cut.
pub const TRUNCATED_MARKER: &str = "… [truncated]";
/// Header on a copy: the names of the copied headers dropped to keep it
/// within [`MAX_COPY_HEADER_BYTES`], comma-separated.
pub const H_DROPPED_HEADERS: &str = "taskmill-dropped-headers";

/// `s` cut to at most `max` bytes, marker included, at a character boundary.
/// Idempotent: a text already within `max` comes back unchanged.
pub fn truncate_text(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let room = max.saturating_sub(TRUNCATED_MARKER.len());
    let mut end = room.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + TRUNCATED_MARKER.len());
    out.push_str(&s[..end]);
    if TRUNCATED_MARKER.len() <= max {
        out.push_str(TRUNCATED_MARKER);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_texts_are_kept_and_long_ones_marked() {
        assert_eq!(truncate_text("boom", 10), "boom");
        let long = "x".repeat(100);
        let cut = truncate_text(&long, 40);
        assert_eq!(cut.len(), 40);
        assert!(cut.ends_with(TRUNCATED_MARKER));
    }

    proptest! {
        #[test]
        fn truncation_is_bounded_and_idempotent(s in "\\PC{0,300}", max in 0usize..200) {
            let once = truncate_text(&s, max);
            prop_assert!(once.len() <= max);
            prop_assert_eq!(truncate_text(&once, max), once.clone());
            if s.len() <= max {
                prop_assert_eq!(once, Cow::Borrowed(s.as_str()));
            }
        }
    }
}
