//! What an attempt's result means: whether to retry, when, and what happens to the
//! destination. Pure functions of the answer, the policy and the clock, so that schedules,
//! jitter, `Retry-After`, 410 and the FAILED state are tested without waiting.

use std::time::Duration;

use crate::config::RetryPolicy;
use crate::store::{AttemptNext, DestinationHealth, DestinationState};

/// The longest `Retry-After` honoured; a longer one is capped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How one attempt ended, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// 2xx.
    Success,
    /// Network error, timeout, 3xx, 408, 429 or 5xx: worth another try, not before
    /// `retry_after` if the destination said so.
    Transient { retry_after: Option<Duration> },
    /// 410 Gone: the destination asks never to be called again.
    Gone,
    /// Any other 4xx.
    ClientError,
}

impl AttemptResult {
    /// Classifies an HTTP status (`None`: no answer at all).
    pub fn from_status(status: Option<u16>, retry_after: Option<Duration>) -> Self {
        match status {
            None => AttemptResult::Transient { retry_after: None },
            Some(200..=299) => AttemptResult::Success,
            Some(410) => AttemptResult::Gone,
            Some(code @ (408 | 429 | 503)) => AttemptResult::Transient {
                retry_after: if code == 408 { None } else { retry_after },
            },
            Some(400..=499) => AttemptResult::ClientError,
            Some(_) => AttemptResult::Transient { retry_after: None },
        }
    }
}

/// Parses a `Retry-After` header, in either of its forms (RFC 9110): seconds, or an HTTP
/// date, which is read against `now_ms` (a date passed means now). Anything else: `None`.
pub fn parse_retry_after(value: Option<&str>, now_ms: u64) -> Option<Duration> {
    let value = value?.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            let now = std::time::UNIX_EPOCH + Duration::from_millis(now_ms);
            at.duration_since(now).unwrap_or_default()
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The decision after an attempt: what happens to the delivery and the destination's new
/// state. `attempts_made` counts this attempt; `random` is uniform in [0, 1).
pub fn decide(
    policy: &RetryPolicy,
    result: AttemptResult,
    attempts_made: u32,
    now_ms: u64,
    random: f64,
    mut state: DestinationState,
    error: Option<String>,
) -> (AttemptNext, DestinationState) {
    if result == AttemptResult::Success {
        state.consecutive_failures = 0;
        // A destination held (FAILED, DISABLED: paused or gone) stays so until a restart,
        // and keeps the reason why: an attempt on its way when it was held may still succeed.
        if state.state == DestinationHealth::Active {
            state.last_error = None;
        }
        return (AttemptNext::Delivered, state);
    }
    state.consecutive_failures = state.consecutive_failures.saturating_add(1);
    state.last_error = error;
    if result == AttemptResult::Gone {
        if state.state != DestinationHealth::Disabled {
            state.since = now_ms;
        }
        state.state = DestinationHealth::Disabled;
        return (AttemptNext::Hold, state);
    }
    if state.consecutive_failures >= policy.failure_threshold
        && state.state == DestinationHealth::Active
    {
        state.state = DestinationHealth::Failed;
        state.since = now_ms;
    }
    let retryable = match result {
        AttemptResult::Transient { .. } => true,
        AttemptResult::ClientError => policy.retry_client_errors,
        _ => false,
    };
    let next = match policy.retry_schedule.get(attempts_made as usize) {
        Some(wait) if retryable => {
            let jittered = wait.mul_f64(1.0 + policy.jitter * random.clamp(0.0, 1.0));
            let retry_after = match result {
                AttemptResult::Transient { retry_after } => retry_after.unwrap_or_default(),
                _ => Duration::ZERO,
            };
            let delay = jittered.max(retry_after);
            AttemptNext::RetryAt(now_ms + delay.as_millis() as u64)
        }
        _ => AttemptNext::Failed,
    };
    // A FAILED destination keeps what it was sent: nothing is given up while it is down.
    if state.state != DestinationHealth::Active && next != AttemptNext::Delivered {
        return (
            match next {
                AttemptNext::RetryAt(at) => AttemptNext::RetryAt(at),
                _ if retryable => AttemptNext::Hold,
                other => other,
            },
            state,
        );
    }
    (next, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active() -> DestinationState {
        DestinationState {
            name: "d".into(),
            state: DestinationHealth::Active,
            consecutive_failures: 0,
            last_error: None,
            epoch: 0,
            since: 0,
        }
    }

    const T0: u64 = 1_000_000;

    #[test]
    fn default_schedule_with_jitter_bounds() {
        let policy = RetryPolicy::default();
        let expected = [5u64, 300, 1800, 7200, 18000, 36000, 36000];
        for (i, secs) in expected.iter().enumerate() {
            let attempts_made = i as u32 + 1;
            for random in [0.0, 0.5, 0.999] {
                let (next, _) = decide(
                    &policy,
                    AttemptResult::Transient { retry_after: None },
                    attempts_made,
                    T0,
                    random,
                    active(),
                    None,
                );
                let AttemptNext::RetryAt(at) = next else {
                    panic!("attempt {attempts_made}: {next:?}")
                };
                let delay = at - T0;
                assert!(delay >= secs * 1000, "attempt {attempts_made}: {delay}");
                assert!(
                    delay <= (*secs as f64 * 1000.0 * 1.2) as u64,
                    "attempt {attempts_made}: {delay}"
                );
            }
        }
        let (next, _) = decide(
            &policy,
            AttemptResult::Transient { retry_after: None },
            8,
            T0,
            0.5,
            active(),
            None,
        );
        assert_eq!(next, AttemptNext::Failed, "8 attempts, then give up");
    }

    #[test]
    fn retry_after_is_honoured_when_longer() {
        let policy = RetryPolicy::default();
        let result = AttemptResult::from_status(Some(429), parse_retry_after(Some("120"), T0));
        let (next, _) = decide(&policy, result, 1, T0, 0.0, active(), None);
        assert_eq!(next, AttemptNext::RetryAt(T0 + 120_000));
        let result = AttemptResult::from_status(Some(503), parse_retry_after(Some("1"), T0));
        let (next, _) = decide(&policy, result, 1, T0, 0.0, active(), None);
        assert_eq!(
            next,
            AttemptNext::RetryAt(T0 + 5_000),
            "the schedule wins when longer"
        );
        assert_eq!(
            parse_retry_after(Some("999999999"), T0),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after(Some("soon"), T0), None);
        assert_eq!(parse_retry_after(Some("-5"), T0), None);
    }

    #[test]
    fn retry_after_may_be_an_http_date() {
        // Wed, 21 Oct 2015 07:28:00 GMT
        let at = 1_445_412_480_000;
        let date = Some("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(
            parse_retry_after(date, at - 90_000),
            Some(Duration::from_secs(90))
        );
        // (Milliseconds into the second before it: what is left of it.)
        assert_eq!(
            parse_retry_after(date, at - 1_500),
            Some(Duration::from_millis(1_500))
        );
        assert_eq!(parse_retry_after(date, at + 5_000), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(date, at - 30 * 86_400_000),
            Some(MAX_RETRY_AFTER)
        );
        let result = AttemptResult::from_status(Some(429), parse_retry_after(date, at - 120_000));
        let (next, _) = decide(
            &RetryPolicy::default(),
            result,
            1,
            at - 120_000,
            0.0,
            active(),
            None,
        );
        assert_eq!(next, AttemptNext::RetryAt(at));
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(
            AttemptResult::from_status(Some(204), None),
            AttemptResult::Success
        );
        assert_eq!(
            AttemptResult::from_status(Some(301), None),
            AttemptResult::Transient { retry_after: None }
        );
        assert_eq!(
            AttemptResult::from_status(Some(500), None),
            AttemptResult::Transient { retry_after: None }
        );
        assert_eq!(
            AttemptResult::from_status(None, None),
            AttemptResult::Transient { retry_after: None }
        );
        assert_eq!(
            AttemptResult::from_status(Some(404), None),
            AttemptResult::ClientError
        );
        assert_eq!(
            AttemptResult::from_status(Some(410), None),
            AttemptResult::Gone
        );
    }

    #[test]
    fn gone_disables_and_holds() {
        let (next, state) = decide(
            &RetryPolicy::default(),
            AttemptResult::Gone,
            1,
            T0,
            0.0,
            active(),
            Some("410".into()),
        );
        assert_eq!(next, AttemptNext::Hold);
        assert_eq!(state.since, T0);
        assert_eq!(state.state, DestinationHealth::Disabled);
    }

    #[test]
    fn client_errors_fail_unless_configured() {
        let mut policy = RetryPolicy::default();
        let (next, _) = decide(
            &policy,
            AttemptResult::ClientError,
            1,
            T0,
            0.0,
            active(),
            None,
        );
        assert_eq!(next, AttemptNext::Failed);
        policy.retry_client_errors = true;
        let (next, _) = decide(
            &policy,
            AttemptResult::ClientError,
            1,
            T0,
            0.0,
            active(),
            None,
        );
        assert!(matches!(next, AttemptNext::RetryAt(_)));
    }

    #[test]
    fn failed_after_threshold_and_success_resets() {
        let policy = RetryPolicy::default();
        let mut state = active();
        for i in 1..=5 {
            let (_, s) = decide(
                &policy,
                AttemptResult::Transient { retry_after: None },
                1,
                T0 + i,
                0.0,
                state,
                Some("503".into()),
            );
            state = s;
            let (expected, since) = if i < 5 {
                (DestinationHealth::Active, 0)
            } else {
                (DestinationHealth::Failed, T0 + 5)
            };
            assert_eq!(state.state, expected, "after {i} failures");
            assert_eq!(state.since, since, "when it became FAILED, after {i}");
        }
        // An exhausted delivery of a FAILED destination is held, not given up.
        let (next, after) = decide(
            &policy,
            AttemptResult::Transient { retry_after: None },
            8,
            T0 + 60_000,
            0.0,
            state.clone(),
            None,
        );
        assert_eq!(next, AttemptNext::Hold);
        assert_eq!(
            after.since,
            T0 + 5,
            "FAILED since the fifth, however many follow"
        );
        let (next, ok) = decide(&policy, AttemptResult::Success, 1, T0, 0.0, state, None);
        assert_eq!(next, AttemptNext::Delivered);
        assert_eq!(ok.consecutive_failures, 0);
        // Still held until a restart, with the reason it is (a late attempt succeeded).
        assert_eq!(ok.state, DestinationHealth::Failed);
        assert_eq!(ok.last_error.as_deref(), Some("503"));
    }
}
