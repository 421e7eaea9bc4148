//! The size bound on a copy's headers (see [`taskmill_core::bounds`]): the
//! headers a dead-letter, retry or deferred copy takes over from the original
//! message are cut or dropped here, so whatever a producer put in them, the
//! copy's header frame stays far below the broker's `frame_max` and the
//! publish is never refused.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use taskmill_core::HeaderValue;
use taskmill_core::bounds::{
    H_DROPPED_HEADERS, MAX_COPIED_VALUE_BYTES, MAX_COPY_HEADER_BYTES, truncate_text,
};

use crate::convert;

/// Room kept for the headers the worker writes itself (dead-letter reason
/// and detail, retry counters): they are bounded by their own limits, which
/// sum to well under this.
const OWN_HEADERS_RESERVE: usize = 4096;

/// The longest list of dropped header names written in [`H_DROPPED_HEADERS`].
const MAX_DROPPED_NOTE: usize = 1024;

/// The bytes `v` takes in an AMQP field table (type tag included).
pub(crate) fn encoded_len(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(encoded_len).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_len(t.inner()) - 1,
        AMQPValue::Void => 0,
    }
}

/// The bytes a header table takes on the wire (its length prefix included).
pub(crate) fn table_len(t: &BTreeMap<ShortString, AMQPValue>) -> usize {
    4 + t
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + encoded_len(v))
        .sum::<usize>()
}

/// The original's headers as a copy may carry them: a string longer than
/// [`MAX_COPIED_VALUE_BYTES`] is cut with the marker; a longer value of any
/// other type is dropped; then, while the whole is over its share of
/// [`MAX_COPY_HEADER_BYTES`], the largest values are dropped. Dropped names
/// are listed in [`H_DROPPED_HEADERS`].
pub(crate) fn copied_headers(original: Option<&FieldTable>) -> BTreeMap<ShortString, AMQPValue> {
    let mut out = BTreeMap::new();
    let mut dropped: Vec<String> = Vec::new();
    for (k, v) in original.map(|t| t.inner().iter()).into_iter().flatten() {
        if encoded_len(v) <= MAX_COPIED_VALUE_BYTES {
            out.insert(k.clone(), v.clone());
            continue;
        }
        match v {
            AMQPValue::LongString(s) => {
                let text = String::from_utf8_lossy(s.as_bytes());
                let cut = truncate_text(&text, MAX_COPIED_VALUE_BYTES - 5);
                out.insert(k.clone(), long_string(&cut));
            }
            _ => dropped.push(k.as_str().to_string()),
        }
    }
    let budget = MAX_COPY_HEADER_BYTES - OWN_HEADERS_RESERVE - MAX_DROPPED_NOTE;
    while table_len(&out) > budget {
        let Some(largest) = out
            .iter()
            .max_by_key(|(k, v)| (encoded_len(v), std::cmp::Reverse(k.as_str().to_string())))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        out.remove(&largest);
        dropped.push(largest.as_str().to_string());
    }
    if !dropped.is_empty() {
        dropped.sort();
        let note = truncate_text(&dropped.join(","), MAX_DROPPED_NOTE - 40).into_owned();
        out.insert(ShortString::from(H_DROPPED_HEADERS), long_string(&note));
    }
    out
}

/// Sets the worker's own headers over the copied ones; string values are
/// held to [`MAX_COPIED_VALUE_BYTES`] like everything else on a copy.
pub(crate) fn set_own(
    headers: &mut BTreeMap<ShortString, AMQPValue>,
    own: &[(&'static str, HeaderValue)],
) {
    for (k, v) in own {
        let v = match v {
            HeaderValue::Str(s) => long_string(&truncate_text(s, MAX_COPIED_VALUE_BYTES - 5)),
            other => convert::to_amqp(other),
        };
        headers.insert(ShortString::from(*k), v);
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(k), v);
        }
        t
    }

    #[test]
    fn small_headers_are_copied_as_they_are() {
        let t = table(vec![
            ("task", long_string("reports.render")),
            ("retries", AMQPValue::LongLongInt(2)),
            (
                "timelimit",
                AMQPValue::FieldArray(vec![AMQPValue::Void; 2].into()),
            ),
        ]);
        let out = copied_headers(Some(&t));
        assert_eq!(&out, t.inner());
    }

    #[test]
    fn large_values_are_cut_or_dropped_and_named() {
        let big_table = table(vec![("blob", long_string(&"b".repeat(9000)))]);
        let t = table(vec![
            ("eta", long_string(&"9".repeat(70_000))),
            ("bytes", AMQPValue::ByteArray(vec![0u8; 50_000].into())),
            ("stamps", AMQPValue::FieldTable(big_table)),
            ("id", long_string("t-1")),
        ]);
        let out = copied_headers(Some(&t));
        let AMQPValue::LongString(eta) = &out[&ShortString::from("eta")] else {
            panic!("eta is kept as a string");
        };
        assert!(eta.len() <= MAX_COPIED_VALUE_BYTES);
        assert!(String::from_utf8_lossy(eta.as_bytes()).ends_with("[truncated]"));
        assert!(!out.contains_key(&ShortString::from("bytes")));
        assert!(!out.contains_key(&ShortString::from("stamps")));
        let AMQPValue::LongString(note) = &out[&ShortString::from(H_DROPPED_HEADERS)] else {
            panic!("dropped names are noted");
        };
        assert_eq!(note.as_bytes(), b"bytes,stamps");
        assert!(table_len(&out) <= MAX_COPY_HEADER_BYTES);
    }

    #[test]
    fn many_medium_headers_stay_within_the_total() {
        let entries: Vec<(String, AMQPValue)> = (0..100)
            .map(|i| (format!("h{i:03}"), long_string(&"m".repeat(3000))))
            .collect();
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(k), v);
        }
        let mut out = copied_headers(Some(&t));
        set_own(
            &mut out,
            &[("taskmill-dead-error", HeaderValue::Str("e".repeat(100_000)))],
        );
        assert!(
            table_len(&out) <= MAX_COPY_HEADER_BYTES,
            "{}",
            table_len(&out)
        );
        assert!(out.contains_key(&ShortString::from(H_DROPPED_HEADERS)));
    }
}
