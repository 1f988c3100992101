//! A heartbeat one thread beats and another reads: how the agent notices a task that has
//! not ended but stopped making progress (a deadlock, a call that never returns), which
//! supervision by join handles alone cannot see.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The time of the last beat, shared between threads.
#[derive(Clone, Debug)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Default for Heartbeat {
    fn default() -> Self {
        let h = Heartbeat(Arc::new(AtomicU64::new(0)));
        h.beat();
        h
    }
}

impl Heartbeat {
    /// Records that the owner is alive now.
    pub fn beat(&self) {
        let ms = base().elapsed().as_millis() as u64;
        self.0.store(ms, Ordering::Relaxed);
    }

    /// How long ago the last beat was.
    pub fn age(&self) -> Duration {
        let now = base().elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_grows_until_the_next_beat() {
        let h = Heartbeat::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.age() >= Duration::from_millis(25));
        h.clone().beat();
        assert!(h.age() < Duration::from_millis(25));
    }
}
