//! Waiting before trying again. Every reconnect and retry loop of the long-running roles (relay, workers,
//! process manager, sealer, executor) takes its delays from one [`Backoff`]: exponential from a first delay,
//! with jitter (so that processes that lost the same broker or database do not all come back at the same
//! instant), never longer than its cap, and a wait that ends early when the role is asked to stop.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// The delays of one retry loop: `first` doubling up to half of `max`, each plus up to as much again of jitter,
/// so a delay lies in `[base, 2 × base)` and never exceeds `max` (at the cap, between `max / 2` and `max`).
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    delays: ExponentialBackoff,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max, delays: Self::delays(first, max) }
    }

    fn delays(first: Duration, max: Duration) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay((max / 2).max(first))
            .without_max_times()
            .with_jitter()
            .build()
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max.max(self.first))
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = Self::delays(self.first, self.max);
    }

    /// Sleeps for the next delay; true if `cancel` fired first (the caller stops).
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_and_never_exceed_the_cap_and_reset() {
        let (first, max) = (Duration::from_millis(100), Duration::from_millis(1_000));
        let mut backoff = Backoff::new(first, max);
        let bases = [100, 200, 400, 500, 500, 500];
        for base in bases {
            let delay = backoff.next_delay();
            let base = Duration::from_millis(base);
            assert!(delay >= base && delay <= (base * 2).min(max), "{delay:?} for a base of {base:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= first * 2);
    }

    #[tokio::test]
    async fn a_wait_ends_when_cancelled() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600)).wait(&cancel).await);
    }
}
