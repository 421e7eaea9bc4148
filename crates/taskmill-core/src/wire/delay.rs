//! The delay ladder: where a job goes to come back after a delay.

use std::time::Duration;

use super::EXCHANGE;

/// Delays live on the broker as a binary ladder of delay queues: level `n`
/// holds messages for `DELAY_TICK × 2^n`. A delay is its number of ticks in
/// binary; the message visits exactly the levels of its set bits (see
/// `docs/protocol.md`, "Delayed jobs").
pub const DELAY_LEVELS: u32 = 25;
/// The delay precision: delays are rounded up to a whole number of ticks.
pub const DELAY_TICK: Duration = Duration::from_millis(100);
/// The longest expressible delay (about 38.8 days).
pub const MAX_DELAY: Duration = Duration::from_millis(100 * ((1u64 << DELAY_LEVELS) - 1));
/// Exchange of delay level `n` (topic).
pub fn delay_exchange(level: u32) -> String {
    format!("{EXCHANGE}.delay.{level}")
}
/// The exchange that takes expired delayed messages to their work queue (topic).
pub const DELAY_DELIVER_EXCHANGE: &str = "taskmill.delay.deliver";

/// Where to publish a job for `queue` so it arrives after `delay`: the
/// exchange and the routing key. A delay under one tick goes straight to the
/// work exchange. Delays above [`MAX_DELAY`] are refused.
pub fn delay_route(queue: &str, delay: Duration) -> Result<(String, String), String> {
    if delay > MAX_DELAY {
        return Err(format!(
            "delay {delay:?} exceeds the maximum of {MAX_DELAY:?}"
        ));
    }
    let tick = DELAY_TICK.as_nanos();
    // In range: `delay` <= MAX_DELAY, whose tick count fits in DELAY_LEVELS bits.
    let ticks = u64::try_from(delay.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX);
    if ticks == 0 {
        return Ok((EXCHANGE.to_string(), queue.to_string()));
    }
    Ok((
        delay_exchange(DELAY_LEVELS - 1),
        delay_routing_key(queue, ticks),
    ))
}

/// `delay` after `now_us` (microseconds since the Unix epoch), saturating at
/// `u64::MAX`: a handler's `retry_after` of years (or `Duration::MAX`) must
/// give a far-off time, never an overflow.
pub fn deadline_us(now_us: u64, delay: Duration) -> u64 {
    now_us.saturating_add(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX))
}

/// The routing key of a message delayed `ticks`: one word per level, most
/// significant first (`1` = wait at that level), then the queue name.
pub fn delay_routing_key(queue: &str, ticks: u64) -> String {
    let mut key = String::with_capacity(2 * DELAY_LEVELS as usize + queue.len());
    for level in (0..DELAY_LEVELS).rev() {
        key.push(if (ticks >> level) & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(queue);
    key
}

/// The binding pattern at delay level `level` selecting messages whose bit
/// for that level is `bit`.
pub fn delay_level_pattern(level: u32, bit: bool) -> String {
    let before = (DELAY_LEVELS - 1 - level) as usize;
    let mut p = "*.".repeat(before);
    p.push(if bit { '1' } else { '0' });
    p.push_str(".#");
    p
}

/// The binding pattern from [`DELAY_DELIVER_EXCHANGE`] to work queue `queue`.
pub fn delay_deliver_pattern(queue: &str) -> String {
    format!("{}{queue}", "*.".repeat(DELAY_LEVELS as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_routes_visit_the_set_bits() {
        let (ex, key) = delay_route("jobs.cpu", Duration::from_millis(1_250)).unwrap();
        assert_eq!(ex, "taskmill.delay.24");
        // 1.25 s = 13 ticks = 0b1101
        let bits: Vec<&str> = key.split('.').take(DELAY_LEVELS as usize).collect();
        assert_eq!(bits[(DELAY_LEVELS - 1) as usize], "1");
        assert_eq!(bits[(DELAY_LEVELS - 2) as usize], "0");
        assert_eq!(bits[(DELAY_LEVELS - 3) as usize], "1");
        assert_eq!(bits[(DELAY_LEVELS - 4) as usize], "1");
        assert!(key.ends_with(".jobs.cpu"));
        assert_eq!(
            delay_route("q", Duration::ZERO).unwrap(),
            ("taskmill".to_string(), "q".to_string())
        );
        assert_eq!(
            delay_route("q", Duration::from_millis(1)).unwrap().1,
            delay_routing_key("q", 1)
        );
        assert!(delay_route("q", MAX_DELAY + DELAY_TICK).is_err());
        assert_eq!(delay_level_pattern(DELAY_LEVELS - 1, true), "1.#");
        assert_eq!(
            delay_level_pattern(0, false),
            format!("{}0.#", "*.".repeat(24))
        );
    }

    proptest::proptest! {
        #[test]
        fn deadlines_saturate(now in proptest::prelude::any::<u64>(), secs in proptest::prelude::any::<u64>(), nanos in 0u32..1_000_000_000) {
            let delay = Duration::new(secs, nanos);
            let at = deadline_us(now, delay);
            proptest::prop_assert!(at >= now);
            let exact = u128::from(now) + delay.as_micros();
            proptest::prop_assert_eq!(u128::from(at), exact.min(u128::from(u64::MAX)));
        }

        #[test]
        fn any_delay_routes_or_is_refused(secs in proptest::prelude::any::<u64>(), nanos in 0u32..1_000_000_000) {
            let delay = Duration::new(secs, nanos);
            proptest::prop_assert_eq!(delay_route("q", delay).is_ok(), delay <= MAX_DELAY);
        }

        #[test]
        fn delay_key_encodes_the_tick_count(ticks in 1u64..(1 << DELAY_LEVELS)) {
            let key = delay_routing_key("q", ticks);
            let mut back = 0u64;
            for (i, w) in key.split('.').take(DELAY_LEVELS as usize).enumerate() {
                let level = DELAY_LEVELS - 1 - i as u32;
                if w == "1" { back |= 1 << level; }
            }
            proptest::prop_assert_eq!(back, ticks);
        }
    }
}
