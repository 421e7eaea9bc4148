//! Retry policy math: how long to wait before the next attempt.
//!
//! Pure functions of the attempt number and a random number, so the schedule
//! is property-tested without sleeping.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
        Duration::from_secs_f64(secs.max(0.0))
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
        fn backoff_never_shrinks_with_attempts(attempt in 1u32..100) {
            let p = policy(Jitter::None);
            prop_assert!(p.backoff(attempt + 1, 0.0) >= p.backoff(attempt, 0.0));
        }
    }
}
