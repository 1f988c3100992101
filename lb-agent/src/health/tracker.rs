//! Rise/fall: turns a backend's probe results into up/down, with the reason kept.

use std::time::Duration;

use tokio::time::Instant;

use super::probe::{Failure, Outcome};

/// A backend's health as probes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Never probed yet: backends start down.
    Unknown,
    Up,
    /// Down; the reason is the failure that took it down (or the latest one while down).
    Down(Failure),
}

/// A change of health, to log and to apply to the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

/// Rise/fall counters and the last result of one backend.
#[derive(Debug, Clone)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    pub health: Health,
    pub successes: u32,
    pub failures: u32,
    pub last: Option<Outcome>,
    pub last_failure: Option<Failure>,
    pub last_change: Option<Instant>,
    /// Until the first transition one success is enough, so a fresh LB serves at once.
    started: bool,
}

impl Tracker {
    /// A tracker going up after `rise` and down after `fall` consecutive results.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            last: None,
            last_failure: None,
            last_change: None,
            started: false,
        }
    }

    /// Records a probe outcome; returns the transition it caused, if any.
    pub fn record(&mut self, now: Instant, outcome: Outcome) -> Option<Transition> {
        let result = outcome.result.clone();
        self.last = Some(outcome);
        let next = match result {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                let needed = if self.started { self.rise } else { 1 };
                if self.health != Health::Up && self.successes >= needed {
                    Some(Health::Up)
                } else {
                    None
                }
            }
            Err(f) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_failure = Some(f.clone());
                match &self.health {
                    Health::Up if self.failures >= self.fall => Some(Health::Down(f)),
                    // Never up yet: a failure settles it as down at once.
                    Health::Unknown => Some(Health::Down(f)),
                    // Already down: follow the reason (not ready -> unreachable moves flows).
                    Health::Down(old) if old.is_not_ready() != f.is_not_ready() => {
                        Some(Health::Down(f))
                    }
                    _ => None,
                }
            }
        };
        let to = next?;
        let from = std::mem::replace(&mut self.health, to.clone());
        self.last_change = Some(now);
        self.started = true;
        Some(Transition { from, to })
    }

    /// How long ago the health last changed.
    pub fn since_change(&self, now: Instant) -> Option<Duration> {
        self.last_change.map(|t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Outcome {
        Outcome {
            result: Ok(()),
            latency: Duration::from_millis(3),
        }
    }
    fn fail(f: Failure) -> Outcome {
        Outcome {
            result: Err(f),
            latency: Duration::from_millis(500),
        }
    }

    /// Feeds results one interval apart on tokio's paused clock.
    async fn step(t: &mut Tracker, o: Outcome) -> Option<Transition> {
        tokio::time::advance(Duration::from_millis(200)).await;
        t.record(Instant::now(), o)
    }

    #[tokio::test(start_paused = true)]
    async fn first_success_brings_a_fresh_backend_up_then_rise_and_fall_apply() {
        let mut t = Tracker::new(2, 2);
        assert_eq!(t.health, Health::Unknown);
        let tr = step(&mut t, ok()).await.expect("up at once");
        assert_eq!((tr.from, tr.to), (Health::Unknown, Health::Up));
        let t0 = t.last_change.unwrap();

        // One failure is not enough with fall = 2.
        assert_eq!(step(&mut t, fail(Failure::Refused)).await, None);
        assert_eq!(t.health, Health::Up);
        let tr = step(&mut t, fail(Failure::Refused)).await.expect("down");
        assert_eq!(tr.to, Health::Down(Failure::Refused));
        assert_eq!(t.last_change.unwrap() - t0, Duration::from_millis(400));
        assert_eq!(t.failures, 2);

        // Now rise = 2 applies.
        assert_eq!(step(&mut t, ok()).await, None);
        assert_eq!(t.successes, 1);
        assert!(step(&mut t, ok()).await.is_some());
        assert_eq!(t.health, Health::Up);
        assert_eq!(t.since_change(Instant::now()), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_resets_the_count() {
        let mut t = Tracker::new(2, 3);
        step(&mut t, ok()).await;
        for _ in 0..5 {
            assert_eq!(step(&mut t, fail(Failure::ConnectTimeout)).await, None);
            assert_eq!(step(&mut t, fail(Failure::ConnectTimeout)).await, None);
            assert_eq!(step(&mut t, ok()).await, None);
        }
        assert_eq!(t.health, Health::Up);
        assert_eq!(t.last_failure, Some(Failure::ConnectTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn first_probe_failing_marks_down_and_then_rise_is_needed() {
        let mut t = Tracker::new(3, 2);
        let tr = step(&mut t, fail(Failure::Status(503))).await.unwrap();
        assert_eq!(tr.to, Health::Down(Failure::Status(503)));
        assert_eq!(step(&mut t, ok()).await, None);
        assert_eq!(step(&mut t, ok()).await, None);
        assert_eq!(step(&mut t, ok()).await.unwrap().to, Health::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn a_down_backend_follows_its_reason_from_not_ready_to_unreachable() {
        let mut t = Tracker::new(2, 2);
        step(&mut t, ok()).await;
        step(&mut t, fail(Failure::Status(503))).await;
        let tr = step(&mut t, fail(Failure::Status(503))).await.unwrap();
        assert!(matches!(tr.to, Health::Down(ref f) if f.is_not_ready()));
        // Same kind of failure: no new transition.
        assert_eq!(step(&mut t, fail(Failure::Status(500))).await, None);
        // The apiserver finished shutting down: unreachable now.
        let tr = step(&mut t, fail(Failure::Refused)).await.unwrap();
        assert_eq!(tr.to, Health::Down(Failure::Refused));
    }
}
