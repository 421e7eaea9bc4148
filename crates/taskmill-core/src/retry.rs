//! Retry policy math: how long to wait before the next attempt.
//!
//! Pure functions of the attempt number and a random number, so the schedule
//! is property-tested without sleeping.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::MAX_DELAY;

/// How the computed backoff is randomised, to spread retries of many jobs
/// that failed together (a dependency outage) instead of retrying in waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Exactly the exponential backoff.
    None,
    /// Uniform in `[0, backoff]` ("full jitter"): the default.
    Full,
    /// Uniform in `[backoff / 2, backoff]`.
    Equal,
}

impl std::str::FromStr for Jitter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Jitter::None),
            "full" => Ok(Jitter::Full),
            "equal" => Ok(Jitter::Equal),
            other => Err(format!("expected `none`, `full` or `equal`, got `{other}`")),
        }
    }
}

/// The retry policy of a kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Backoff after the first failure, before jitter.
    pub base: Duration,
    /// Growth per further failure.
    pub factor: f64,
    /// Upper bound of the backoff before jitter.
    pub cap: Duration,
    /// Randomisation.
    pub jitter: Jitter,
}

impl RetryPolicy {
    /// Whether a job that failed `attempt` (1-based) may run again.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay before the attempt after failed attempt `attempt` (1-based),
    /// for a uniform random `r` in `[0, 1)`. A handler's `retry_after` hint is
    /// applied by the caller as a lower bound.
    pub fn backoff(&self, attempt: u32, r: f64) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = self.base.as_secs_f64() * self.factor.max(1.0).powi(exp);
        let capped = if raw.is_finite() {
            raw.min(self.cap.as_secs_f64())
        } else {
            self.cap.as_secs_f64()
        };
        let r = r.clamp(0.0, 1.0);
        let secs = match self.jitter {
            Jitter::None => capped,
            Jitter::Full => capped * r,
            Jitter::Equal => capped / 2.0 + capped / 2.0 * r,
        };
        // f64 rounding can land just past the cap (or past Duration::MAX for
        // a cap near it): saturate at the cap.
        Duration::try_from_secs_f64(secs.max(0.0))
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The delay before the next attempt: the backoff, raised to the
    /// handler's `retry_after` hint when there is one, and never beyond
    /// [`MAX_DELAY`], the longest the delay ladder holds a message. Saturates
    /// for any input (`retry_after` of `Duration::MAX` included).
    pub fn next_delay(&self, attempt: u32, r: f64, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(attempt, r);
        retry_after
            .map_or(backoff, |at_least| backoff.max(at_least))
            .min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(60),
            jitter,
        }
    }

    #[test]
    fn exponential_without_jitter() {
        let p = policy(Jitter::None);
        let got: Vec<u64> = (1..=8).map(|a| p.backoff(a, 0.5).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert!(p.allows_retry_after(4));
        assert!(!p.allows_retry_after(5));
        let huge = RetryPolicy {
            cap: Duration::MAX,
            factor: f64::MAX,
            ..p
        };
        assert_eq!(huge.backoff(u32::MAX, 0.5), Duration::MAX);
        assert_eq!(huge.next_delay(3, 0.5, Some(Duration::MAX)), MAX_DELAY);
        assert_eq!(
            p.next_delay(1, 0.5, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }

    proptest! {
        #[test]
        fn jittered_backoff_stays_in_bounds(attempt in 1u32..200, r in 0.0f64..1.0) {
            let none = policy(Jitter::None).backoff(attempt, r);
            let full = policy(Jitter::Full).backoff(attempt, r);
            let equal = policy(Jitter::Equal).backoff(attempt, r);
            prop_assert!(none <= Duration::from_secs(60));
            prop_assert!(full <= none);
            prop_assert!(equal <= none && equal >= none / 2 - Duration::from_nanos(1));
        }

        #[test]
        fn huge_settings_and_hints_saturate(
            attempt in proptest::prelude::any::<u32>(),
            r in proptest::prelude::any::<f64>(),
            base_ms in proptest::prelude::any::<u64>(),
            cap_secs in proptest::prelude::any::<u64>(),
            factor in proptest::prelude::any::<f64>(),
            hint_secs in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let p = RetryPolicy {
                max_attempts: u32::MAX,
                base: Duration::from_millis(base_ms),
                factor,
                cap: Duration::new(cap_secs, 999_999_999),
                jitter: Jitter::Equal,
            };
            let b = p.backoff(attempt, r);
            prop_assert!(b <= p.cap);
            let hint = hint_secs.map(|s| Duration::new(s, 999_999_999));
            let d = p.next_delay(attempt, r, hint);
            prop_assert!(d <= MAX_DELAY);
            if let Some(h) = hint {
                prop_assert!(d >= h.min(MAX_DELAY));
            }
        }

        #[test]
        fn backoff_never_shrinks_with_attempts(attempt in 1u32..100) {
            let p = policy(Jitter::None);
            prop_assert!(p.backoff(attempt + 1, 0.0) >= p.backoff(attempt, 0.0));
        }
    }
}
