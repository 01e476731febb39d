//! Lock-free latency histograms, shared by the relay, the workers and the API's `/metrics`.
//!
//! Buckets grow by 10 % from 100 µs to about two minutes, so a quantile read from them is within ±5 % of the
//! true value — precise enough for p50/p99 reporting without keeping every sample.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lower bound of the first bucket, in seconds.
const FIRST_BOUND_SECONDS: f64 = 0.000_1;
const GROWTH: f64 = 1.1;
const BUCKETS: usize = 150;

#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Σ of observations in microseconds.
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

fn upper_bound(index: usize) -> f64 {
    FIRST_BOUND_SECONDS * GROWTH.powi(index as i32)
}

impl Histogram {
    /// Records one observation (negative values count as zero).
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        let index = if seconds <= FIRST_BOUND_SECONDS {
            0
        } else {
            ((seconds / FIRST_BOUND_SECONDS).ln() / GROWTH.ln()).ceil() as usize
        };
        self.counts[index.min(BUCKETS)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in seconds; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, bucket) in self.counts.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(upper_bound(index));
            }
        }
        Some(upper_bound(BUCKETS))
    }

    /// Cumulative counts at the given bounds (seconds), for Prometheus exposition.
    pub fn cumulative(&self, bounds: &[f64]) -> Vec<u64> {
        bounds
            .iter()
            .map(|&bound| {
                self.counts
                    .iter()
                    .enumerate()
                    .take_while(|(index, _)| upper_bound(*index) <= bound * (1.0 + 1e-9))
                    .map(|(_, c)| c.load(Ordering::Relaxed))
                    .sum()
            })
            .collect()
    }

    pub fn reset(&self) {
        for bucket in &self.counts {
            bucket.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.sum_us.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_five_percent() {
        let histogram = Histogram::default();
        for ms in 1..=1000 {
            histogram.observe(ms as f64 / 1000.0);
        }
        let p50 = histogram.quantile(0.5).unwrap();
        let p99 = histogram.quantile(0.99).unwrap();
        assert!((p50 - 0.5).abs() / 0.5 < 0.1, "{p50}");
        assert!((p99 - 0.99).abs() / 0.99 < 0.1, "{p99}");
        assert_eq!(histogram.count(), 1000);
        assert!((histogram.sum_seconds() - 500.5).abs() < 0.01);
    }

    #[test]
    fn empty_and_extreme_values() {
        let histogram = Histogram::default();
        assert_eq!(histogram.quantile(0.5), None);
        histogram.observe(-1.0);
        histogram.observe(1e9);
        assert!(histogram.quantile(0.0).unwrap() <= FIRST_BOUND_SECONDS);
        assert!(histogram.quantile(1.0).unwrap() > 100.0);
        assert_eq!(histogram.cumulative(&[0.001, 1e12]), vec![1, 2]);
    }
}
