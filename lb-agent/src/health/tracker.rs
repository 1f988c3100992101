//! Rise/fall: turns a backend's probe results into up/down, with the reason kept.
//!
//! `fall` guards every change a failure can make, of state and of reason alike: going
//! down takes `fall` consecutive failures, and so does a down backend's reason changing
//! class. One odd result (a probe that hit a full accept queue, a reset) must not move
//! every watch on an apiserver, which is what turning unreachable does.

use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use tokio::time::Instant;

use super::probe::{Failure, FailureClass, Outcome};

/// A backend's health as probes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Never probed yet: backends start down.
    Unknown,
    Up,
    /// Down; the failure gives the reason and its class what happens to the flows.
    Down(Failure),
}

/// A change of health, to log and to apply to the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

/// Upper bounds (seconds) of the probe-latency histogram's buckets; +Inf follows.
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// How long a backend's probes took, since the agent started: a Prometheus histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub sum_seconds: f64,
    pub count: u64,
    /// Probes per bucket of `LATENCY_BOUNDS` (not cumulative), then the +Inf bucket.
    pub buckets: Vec<u64>,
}

impl LatencyHistogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if self.buckets.is_empty() {
            self.buckets = vec![0; LATENCY_BOUNDS.len() + 1];
        }
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i] += 1;
        self.sum_seconds += s;
        self.count += 1;
    }

    /// (upper bound, probes in that bucket alone), the +Inf bucket last as f64::MAX (how
    /// prometheus-client, which adds them up, marks it).
    pub fn per_bucket(&self) -> Vec<(f64, u64)> {
        LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.buckets.iter().copied().chain(std::iter::repeat(0)))
            .collect()
    }
}

/// What a backend's probes did since the agent started, for the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct ProbeStats {
    pub latency: LatencyHistogram,
    /// Failed probes by `Failure::reason`.
    pub failures: BTreeMap<&'static str, u64>,
    /// Health changes.
    pub transitions: u64,
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
    /// The current run of failures, the latest `fall` of it, oldest first.
    recent: VecDeque<Failure>,
    /// Until the first transition one result is enough, so a fresh LB serves at once.
    started: bool,
    pub stats: ProbeStats,
}

impl Tracker {
    /// A tracker going up after `rise` and down after `fall` consecutive results.
    pub fn new(rise: u32, fall: u32) -> Self {
        let fall = fall.max(1);
        Self {
            rise: rise.max(1),
            fall,
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            last: None,
            last_failure: None,
            last_change: None,
            recent: VecDeque::with_capacity(fall as usize),
            started: false,
            stats: ProbeStats::default(),
        }
    }

    /// A tracker that goes on from `health`, as a previous agent left it (adoption): past
    /// its first transition, so one odd probe does not undo it.
    pub fn carried(rise: u32, fall: u32, health: Health) -> Self {
        Self {
            health,
            started: true,
            ..Self::new(rise, fall)
        }
    }

    /// New rise/fall thresholds (a reload); the health and the current run are kept.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
        while self.recent.len() > self.fall as usize {
            self.recent.pop_front();
        }
    }

    /// Records a probe outcome; returns the transition it caused, if any.
    pub fn record(&mut self, now: Instant, outcome: Outcome) -> Option<Transition> {
        let result = outcome.result.clone();
        self.stats.latency.observe(outcome.latency);
        if let Err(f) = &result {
            *self.stats.failures.entry(f.reason()).or_default() += 1;
        }
        self.last = Some(outcome);
        let next = match result {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                self.recent.clear();
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
                if self.recent.len() == self.fall as usize {
                    self.recent.pop_front();
                }
                self.recent.push_back(f.clone());
                match &self.health {
                    // Never up: no flows to protect, so the first failure settles it.
                    Health::Unknown => Some(Health::Down(f)),
                    Health::Up if self.failures >= self.fall => Some(Health::Down(self.verdict())),
                    Health::Down(old) => match self.run_class() {
                        Some(c) if c != old.class() => Some(Health::Down(f)),
                        _ => None,
                    },
                    Health::Up => None,
                }
            }
        };
        let to = next?;
        self.stats.transitions += 1;
        let from = std::mem::replace(&mut self.health, to.clone());
        self.last_change = Some(now);
        self.started = true;
        Some(Transition { from, to })
    }

    /// The class shared by the latest `fall` failures, if they are that many and agree.
    fn run_class(&self) -> Option<FailureClass> {
        if self.recent.len() < self.fall as usize {
            return None;
        }
        let class = self.recent.back()?.class();
        self.recent
            .iter()
            .all(|f| f.class() == class)
            .then_some(class)
    }

    /// The reason to go down with: the latest failures' class when they agree, else not
    /// ready, the class that keeps flows (a backend that is only sometimes reachable is
    /// most likely overloaded, and moving its flows would add to the load).
    fn verdict(&self) -> Failure {
        let class = self.run_class().unwrap_or(FailureClass::NotReady);
        let latest = self.recent.back().cloned().expect("called after a failure");
        self.recent
            .iter()
            .rev()
            .find(|f| f.class() == class)
            .cloned()
            .unwrap_or_else(|| Failure::Mixed(Box::new(latest)))
    }

    /// How long ago the health last changed.
    pub fn since_change(&self, now: Instant) -> Option<Duration> {
        self.last_change.map(|t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe::Waiting;
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
    /// An apiserver that accepts the connection and answers /readyz too late.
    fn slow() -> Failure {
        Failure::TimeoutAfterConnect(Waiting::Answer("/readyz".into()))
    }
    fn untrusted() -> Failure {
        Failure::CertNotTrusted("UnknownIssuer".into())
    }

    /// Feeds results one interval apart on tokio's paused clock.
    async fn step(t: &mut Tracker, o: Outcome) -> Option<Transition> {
        tokio::time::advance(Duration::from_millis(200)).await;
        t.record(Instant::now(), o)
    }

    /// A tracker that has been up, so rise and fall apply.
    async fn up(rise: u32, fall: u32) -> Tracker {
        let mut t = Tracker::new(rise, fall);
        step(&mut t, ok()).await.expect("up at once");
        t
    }

    /// Feeds `fs` and returns the health after the last one.
    async fn feed(t: &mut Tracker, fs: &[Failure]) -> Health {
        for f in fs {
            step(t, fail(f.clone())).await;
        }
        t.health.clone()
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
    async fn fall_3_two_timeouts_after_connect_then_a_success_change_nothing() {
        let mut t = up(2, 3).await;
        for _ in 0..5 {
            assert_eq!(step(&mut t, fail(slow())).await, None);
            assert_eq!(step(&mut t, fail(slow())).await, None);
            assert_eq!(step(&mut t, ok()).await, None);
        }
        assert_eq!(t.health, Health::Up);
        assert_eq!(t.last_failure, Some(slow()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_never_probed_backend_settles_on_its_first_result() {
        // Even with fall = 3: it has no flows to protect.
        let mut t = Tracker::new(3, 3);
        let tr = step(&mut t, fail(Failure::Status(503))).await.unwrap();
        assert_eq!(tr.to, Health::Down(Failure::Status(503)));
        assert_eq!(step(&mut t, ok()).await, None);
        assert_eq!(step(&mut t, ok()).await, None);
        assert_eq!(step(&mut t, ok()).await.unwrap().to, Health::Up);

        let mut t = Tracker::new(3, 3);
        let tr = step(&mut t, fail(Failure::Refused)).await.unwrap();
        assert_eq!(tr.to, Health::Down(Failure::Refused));
    }

    #[tokio::test(start_paused = true)]
    async fn going_down_is_unreachable_only_when_all_fall_failures_were() {
        let mut t = up(2, 3).await;
        let all = [Failure::Refused, Failure::ConnectTimeout, Failure::Refused];
        assert_eq!(feed(&mut t, &all).await, Health::Down(Failure::Refused));

        // One timeout after connect among them: down as not ready, with that reason.
        let mut t = up(2, 3).await;
        let mixed = [Failure::Refused, slow(), Failure::Refused];
        assert_eq!(feed(&mut t, &mixed).await, Health::Down(slow()));
    }

    #[tokio::test(start_paused = true)]
    async fn going_down_is_lb_side_only_when_all_fall_failures_were() {
        let mut t = up(2, 2).await;
        let all = [untrusted(), Failure::Status(401)];
        assert_eq!(feed(&mut t, &all).await, Health::Down(Failure::Status(401)));
        assert_eq!(t.health, Health::Down(Failure::Status(401)));

        let mut t = up(2, 2).await;
        assert_eq!(
            feed(&mut t, &[untrusted(), Failure::Status(503)]).await,
            Health::Down(Failure::Status(503))
        );

        // No failure of the not ready class among them: the reason says so.
        let mut t = up(2, 2).await;
        let h = feed(&mut t, &[untrusted(), Failure::Refused]).await;
        assert_eq!(h, Health::Down(Failure::Mixed(Box::new(Failure::Refused))));
        let Health::Down(f) = h else { unreachable!() };
        assert_eq!(f.class(), FailureClass::NotReady);
    }

    #[tokio::test(start_paused = true)]
    async fn a_not_ready_backend_does_not_turn_unreachable_on_one_failure() {
        let mut t = up(2, 2).await;
        let down = Health::Down(Failure::Status(503));
        assert_eq!(
            feed(&mut t, &[Failure::Status(503), Failure::Status(503)]).await,
            down
        );
        assert_eq!(step(&mut t, fail(Failure::Refused)).await, None);
        // Same class again: no transition, and the run of refusals starts over.
        assert_eq!(step(&mut t, fail(Failure::Status(500))).await, None);
        assert_eq!(step(&mut t, fail(Failure::Refused)).await, None);
        assert_eq!(t.health, down);
        // The apiserver finished shutting down: `fall` refusals in a row.
        let tr = step(&mut t, fail(Failure::Refused)).await.unwrap();
        assert_eq!(tr.to, Health::Down(Failure::Refused));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_backend_turns_not_ready_only_after_fall_failures() {
        let mut t = up(2, 3).await;
        assert_eq!(
            feed(
                &mut t,
                &[Failure::Refused, Failure::Refused, Failure::Refused]
            )
            .await,
            Health::Down(Failure::Refused)
        );
        // It listens again but is slow: two slow answers are not enough with fall = 3.
        assert_eq!(step(&mut t, fail(slow())).await, None);
        assert_eq!(step(&mut t, fail(slow())).await, None);
        let tr = step(&mut t, fail(Failure::Status(503))).await.unwrap();
        assert_eq!(tr.from, Health::Down(Failure::Refused));
        assert_eq!(tr.to, Health::Down(Failure::Status(503)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_lb_side_reason_changes_only_after_fall_failures_of_another_class() {
        let mut t = up(2, 2).await;
        assert_eq!(
            feed(&mut t, &[untrusted(), untrusted()]).await,
            Health::Down(untrusted())
        );
        assert_eq!(step(&mut t, fail(Failure::Refused)).await, None);
        assert_eq!(step(&mut t, fail(untrusted())).await, None);
        assert_eq!(step(&mut t, fail(slow())).await, None);
        assert_eq!(
            step(&mut t, fail(slow())).await.unwrap().to,
            Health::Down(slow())
        );
    }
}
