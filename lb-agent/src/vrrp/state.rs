//! The VRRP protocol state machine (RFC 5798 §6.4, with keepalived's and RFC 9568's
//! refinements), used for v2 and v3 alike.
//!
//! No I/O and no clock: every input carries the caller's `now`, and the machine answers
//! with `Action`s plus the next `deadline` at which `tick` must be called.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Priority of the address owner, which always wins and always preempts.
pub const PRIORITY_OWNER: u8 = 255;
/// Priority a master sends when it resigns.
pub const PRIORITY_STOP: u8 = 0;
/// Smallest interval the machine works with (one VRRPv3 centisecond).
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Largest interval any version can advertise (VRRPv2's 255 s).
const MAX_INTERVAL: Duration = Duration::from_secs(255);

/// Protocol state of one virtual router instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not started, or shut down.
    Init,
    /// Listening to a master, ready to take over.
    Backup,
    /// Holding the virtual addresses and advertising.
    Master,
    /// Interface down: neither listening nor advertising.
    Fault,
}

/// Configuration of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Virtual router ID (informational: the caller filters adverts by VRID).
    pub vrid: u8,
    /// Effective priority, 1..=255; 255 = address owner.
    pub priority: u8,
    /// Our Advertisement_Interval.
    pub advert_interval: Duration,
    /// Whether a higher-priority Backup takes over from a lower-priority master.
    pub preempt: bool,
    /// How long a lower-priority master must have been heard before we preempt it.
    pub preempt_delay: Duration,
    /// Our primary address: the advert source and the tie-break between equal priorities.
    pub primary: Ipv4Addr,
    /// 2 (RFC 3768: Skew_Time counts in seconds) or 3 (RFC 5798: in advert intervals).
    pub version: u8,
}

/// What the agent must do after an input; the agent adds/removes addresses, sends GARPs and runs notify scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send one advertisement with this priority (0 = resigning).
    SendAdvert {
        /// Priority to put in the advert.
        priority: u8,
    },
    /// We are master now: add the virtual addresses and announce them.
    BecomeMaster,
    /// We are no longer (or not) master: make sure the virtual addresses are gone.
    BecomeBackup,
    /// Still master, but another router believes it is master too (it sent a lower
    /// priority): announce the addresses again, since its gratuitous ARPs may have moved
    /// clients to it (keepalived's garp_lower_prio_repeat).
    Garp,
}

/// The last advert we heard from another router while Backup.
#[derive(Debug, Clone, Copy)]
struct Heard {
    addr: Ipv4Addr,
    priority: u8,
    at: Instant,
}

/// One instance's protocol state.
#[derive(Debug, Clone)]
pub struct Machine {
    params: Params,
    state: State,
    master_adver_interval: Duration,
    adver_timer: Option<Instant>,
    master_down_timer: Option<Instant>,
    heard: Option<Heard>,
    /// When we first ignored a lower-priority master's advert in the current run of them;
    /// only tracked when a preempt delay applies.
    preempt_since: Option<Instant>,
}

impl Machine {
    /// A machine in state Init; priority 0 is raised to 1 and the interval clamped to 10 ms..=255 s.
    pub fn new(mut params: Params) -> Self {
        // Priority 0 means "resigning" on the wire and a zero interval would make every
        // timer fire immediately, so neither can be a configuration; the upper bound keeps
        // Instant arithmetic from overflowing.
        params.priority = params.priority.max(1);
        params.advert_interval = params.advert_interval.clamp(MIN_INTERVAL, MAX_INTERVAL);
        Machine {
            master_adver_interval: params.advert_interval,
            params,
            state: State::Init,
            adver_timer: None,
            master_down_timer: None,
            heard: None,
            preempt_since: None,
        }
    }

    /// Current protocol state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The parameters in force (priority reflects `set_priority`).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Our current effective priority.
    pub fn priority(&self) -> u8 {
        self.params.priority
    }

    /// Current master as we know it (ourselves when master).
    pub fn master_addr(&self) -> Option<Ipv4Addr> {
        match self.state {
            State::Master => Some(self.params.primary),
            State::Backup => self.heard.map(|h| h.addr),
            State::Init | State::Fault => None,
        }
    }

    /// Master_Adver_Interval: learned from the master's adverts, or our own when master or none heard.
    pub fn master_adver_interval(&self) -> Duration {
        self.master_adver_interval
    }

    /// Skew_Time: ((256 - priority) * Master_Adver_Interval) / 256 in VRRPv3 (RFC 5798);
    /// (256 - priority) / 256 seconds in VRRPv2 (RFC 3768), whatever the interval, as
    /// keepalived computes it for v2 peers.
    pub fn skew_time(&self) -> Duration {
        let unit = if self.params.version == 2 {
            Duration::from_secs(1)
        } else {
            self.master_adver_interval
        };
        unit * (256 - u32::from(self.params.priority)) / 256
    }

    /// Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        self.master_adver_interval * 3 + self.skew_time()
    }

    /// Leaves Init: the owner becomes Master at once, anyone else Backup with the Master_Down timer set; no-op in other states.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Init {
            return Vec::new();
        }
        if self.is_owner() {
            self.become_master(now)
        } else {
            self.master_adver_interval = self.params.advert_interval;
            self.become_backup(now, None)
        }
    }

    /// Init -> Master at once, without the election: the agent re-executed itself while
    /// master (`lb-agent restart`), so the peer still sees it as master and must go on
    /// hearing adverts before its Master_Down timer runs out.
    pub fn resume_master(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Init {
            return Vec::new();
        }
        self.become_master(now)
    }

    /// The next instant at which `tick` must be called, or None.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Master => self.adver_timer,
            State::Backup => self.master_down_timer,
            State::Init | State::Fault => None,
        }
    }

    /// Runs expired timers: Master sends its periodic advert, Backup takes over when Master_Down expires (unless a preempt delay still holds it back).
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Master => match self.adver_timer {
                Some(t) if now >= t => {
                    // Re-arm from `now`, not from `t`: a late wake-up must not cause a burst.
                    self.adver_timer = Some(now + self.params.advert_interval);
                    vec![self.advert()]
                }
                _ => Vec::new(),
            },
            State::Backup => match self.master_down_timer {
                Some(t) if now >= t => {
                    if let Some(until) = self.preempt_hold(now) {
                        self.master_down_timer = Some(until);
                        return Vec::new();
                    }
                    self.become_master(now)
                }
                _ => Vec::new(),
            },
            State::Init | State::Fault => Vec::new(),
        }
    }

    /// An advert that passed validation, from `src` with `priority` and `interval` (already converted from cs/s).
    pub fn on_advert(
        &mut self,
        now: Instant,
        src: Ipv4Addr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        // Our own adverts come back on multicast; the caller filters them, but a loop
        // here would make us fight ourselves.
        if src == self.params.primary {
            return Vec::new();
        }
        match self.state {
            State::Backup => self.backup_rx(now, src, priority, interval),
            State::Master => self.master_rx(now, src, priority, interval),
            State::Init | State::Fault => Vec::new(),
        }
    }

    /// Our effective priority changed (tracking); 0 is raised to 1. Master re-advertises at once; Backup uses it for the next decision.
    pub fn set_priority(&mut self, now: Instant, priority: u8) -> Vec<Action> {
        let priority = priority.max(1);
        if priority == self.params.priority {
            return Vec::new();
        }
        let accepted_before = self.heard.map(|h| self.accepts(h.priority));
        self.params.priority = priority;
        match self.state {
            State::Master => {
                // Peers must learn the new priority now, not up to an interval later, so a
                // better backup can preempt promptly.
                self.adver_timer = Some(now + self.params.advert_interval);
                vec![self.advert()]
            }
            State::Backup => {
                // We were letting the timer run out to preempt a lower master, but we no
                // longer outrank it: give it the credit its last advert would have earned,
                // so we don't take over just before its next advert arrives.
                if let (Some(h), Some(false)) = (self.heard, accepted_before) {
                    if self.accepts(h.priority) {
                        self.preempt_since = None;
                        self.master_down_timer = Some(h.at + self.master_down_interval());
                    }
                }
                Vec::new()
            }
            State::Init | State::Fault => Vec::new(),
        }
    }

    /// Suspends (false) or restores (true) preemption, e.g. while this router could not
    /// hold its addresses: it should not take the VIP from a working master just to fail
    /// again. Configured preempt = false stays false.
    pub fn set_preempt(&mut self, preempt: bool) {
        self.params.preempt = preempt;
    }

    /// Shutdown: Master resigns (advert with priority 0, then drops the addresses); state becomes Init.
    pub fn shutdown(&mut self, _now: Instant) -> Vec<Action> {
        let was_master = self.state == State::Master;
        self.reset(State::Init);
        if was_master {
            vec![
                Action::SendAdvert {
                    priority: PRIORITY_STOP,
                },
                Action::BecomeBackup,
            ]
        } else {
            Vec::new()
        }
    }

    /// Interface down, or the virtual addresses could not be added: Master resigns (a
    /// priority 0 advert, which may not get out on a dead link, then drops the addresses);
    /// state becomes Fault, where nothing is sent and adverts are ignored.
    pub fn fault(&mut self, _now: Instant) -> Vec<Action> {
        if self.state == State::Fault {
            return Vec::new();
        }
        let was_master = self.state == State::Master;
        self.reset(State::Fault);
        if was_master {
            vec![
                Action::SendAdvert {
                    priority: PRIORITY_STOP,
                },
                Action::BecomeBackup,
            ]
        } else {
            Vec::new()
        }
    }

    /// Interface back up: starts afresh as `start` does; no-op unless in Fault.
    pub fn recover(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Fault {
            return Vec::new();
        }
        self.state = State::Init;
        self.start(now)
    }

    fn is_owner(&self) -> bool {
        self.params.priority == PRIORITY_OWNER
    }

    fn preempts(&self) -> bool {
        // RFC 5798 §6.1: the owner preempts whatever Preempt_Mode says.
        self.params.preempt || self.is_owner()
    }

    /// Whether a Backup accepts an advert of this (non-zero) priority as coming from a legitimate master.
    fn accepts(&self, priority: u8) -> bool {
        // `>=`, not an address tie-break: RFC 5798 §6.4.2 and keepalived let an equal
        // master be, and avoiding a failover when a peer (re)starts is the point.
        !self.preempts() || priority >= self.params.priority
    }

    fn advert(&self) -> Action {
        Action::SendAdvert {
            priority: self.params.priority,
        }
    }

    fn reset(&mut self, state: State) {
        self.state = state;
        self.adver_timer = None;
        self.master_down_timer = None;
        self.heard = None;
        self.preempt_since = None;
        self.master_adver_interval = self.params.advert_interval;
    }

    fn become_master(&mut self, now: Instant) -> Vec<Action> {
        self.reset(State::Master);
        self.adver_timer = Some(now + self.params.advert_interval);
        vec![self.advert(), Action::BecomeMaster]
    }

    fn become_backup(&mut self, now: Instant, heard: Option<Heard>) -> Vec<Action> {
        self.state = State::Backup;
        self.adver_timer = None;
        self.heard = heard;
        self.preempt_since = None;
        self.master_down_timer = Some(now + self.master_down_interval());
        vec![Action::BecomeBackup]
    }

    fn learn_interval(&mut self, interval: Duration) {
        // A zero interval (v3 field 0) would collapse Master_Down_Interval to nothing.
        if !interval.is_zero() {
            self.master_adver_interval = interval.min(MAX_INTERVAL);
        }
    }

    /// If the Master_Down timer expired only because we ignored a live lower-priority master and the preempt delay has not run out, the instant to look again.
    fn preempt_hold(&self, now: Instant) -> Option<Instant> {
        let since = self.preempt_since?;
        let heard = self.heard?;
        // The delay is for preempting a live master, not for replacing a dead one.
        let master_gone = heard.at + self.master_down_interval();
        // An absurdly long delay (overflowing Instant) means never preempt a live master.
        match since.checked_add(self.params.preempt_delay) {
            Some(delay_over) => {
                (now < delay_over && now < master_gone).then(|| delay_over.min(master_gone))
            }
            None => (now < master_gone).then_some(master_gone),
        }
    }

    fn backup_rx(
        &mut self,
        now: Instant,
        src: Ipv4Addr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        let heard = Heard {
            addr: src,
            priority,
            at: now,
        };
        if priority == PRIORITY_STOP {
            // The master is resigning: take over after Skew_Time so the best backup wins
            // without three intervals of silence; never postpone a takeover already due.
            self.heard = None;
            self.preempt_since = None;
            let at = now + self.skew_time();
            self.master_down_timer = Some(self.master_down_timer.map_or(at, |t| t.min(at)));
        } else if self.accepts(priority) {
            self.learn_interval(interval);
            self.heard = Some(heard);
            self.preempt_since = None;
            self.master_down_timer = Some(now + self.master_down_interval());
        } else {
            // A lower master we mean to replace: leave the timer running down so we take
            // over when it expires.
            self.heard = Some(heard);
            if !self.params.preempt_delay.is_zero() && !self.is_owner() {
                self.preempt_since.get_or_insert(now);
            }
        }
        Vec::new()
    }

    fn master_rx(
        &mut self,
        now: Instant,
        src: Ipv4Addr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        let ours = self.params.priority;
        if priority != PRIORITY_STOP
            && (priority > ours || (priority == ours && src > self.params.primary))
        {
            self.learn_interval(interval);
            let heard = Heard {
                addr: src,
                priority,
                at: now,
            };
            // One last advert of ours before stepping down (keepalived's
            // vrrp_higher_prio_send_advert): after a split brain the winner may not have
            // heard us yet, and a lower priority is what makes it announce itself again
            // with gratuitous ARPs, pulling back clients our own ARPs took.
            let mut acts = vec![self.advert()];
            acts.extend(self.become_backup(now, Some(heard)));
            return acts;
        }
        // Priority 0: a resigning backup-to-be wants a prompt advert (RFC 5798 §6.4.3).
        // Lower priority: another router thinks it is master; answering at once (keepalived,
        // RFC 9568) makes it back off now rather than after our next periodic advert, and
        // fresh gratuitous ARPs undo whatever its own announced.
        self.adver_timer = Some(now + self.params.advert_interval);
        if priority == PRIORITY_STOP {
            vec![self.advert()]
        } else {
            vec![self.advert(), Action::Garp]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    const C: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const SEC: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn params(priority: u8, primary: Ipv4Addr) -> Params {
        Params {
            vrid: 51,
            priority,
            advert_interval: SEC,
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary,
            version: 3,
        }
    }

    /// Master_Down_Interval at a 1 s interval: 3 s + (256 - prio)/256 s.
    fn mdi(priority: u8) -> Duration {
        3 * SEC + SEC * (256 - u32::from(priority)) / 256
    }

    fn backup_at(t0: Instant, p: Params) -> Machine {
        let mut m = Machine::new(p);
        assert_eq!(m.start(t0), vec![Action::BecomeBackup]);
        m
    }

    /// A machine that became master at `t0` (started at t0 - Master_Down_Interval).
    fn master_at(t0: Instant, p: Params) -> Machine {
        let start = t0 - mdi(p.priority);
        let mut m = backup_at(start, p);
        let prio = m.priority();
        assert_eq!(
            m.tick(t0),
            vec![Action::SendAdvert { priority: prio }, Action::BecomeMaster]
        );
        m
    }

    /// A base instant far enough from the process start that subtracting is safe.
    fn base() -> Instant {
        Instant::now() + 1000 * SEC
    }

    #[test]
    fn timing_formulas() {
        let m = Machine::new(params(100, A));
        assert_eq!(m.skew_time(), ms(609) + Duration::from_micros(375));
        assert_eq!(
            m.master_down_interval(),
            ms(3609) + Duration::from_micros(375)
        );
        let m = Machine::new(params(255, A));
        assert_eq!(m.skew_time(), SEC / 256);
        let m = Machine::new(Params {
            advert_interval: ms(100),
            ..params(1, A)
        });
        assert_eq!(m.skew_time(), ms(100) * 255 / 256);
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        let t0 = base();
        let mut m = backup_at(
            t0,
            Params {
                advert_interval: Duration::MAX,
                preempt_delay: Duration::MAX,
                ..params(110, A)
            },
        );
        assert_eq!(m.master_adver_interval(), Duration::from_secs(255));
        m.on_advert(t0 + SEC, B, 120, Duration::MAX);
        assert_eq!(m.master_adver_interval(), Duration::from_secs(255));
        // A lower master is never preempted while alive, and replaced once it is silent.
        m.on_advert(t0 + 2 * SEC, B, 100, SEC);
        let gone = t0 + 2 * SEC + m.master_down_interval();
        run_timers(&mut m, gone - Duration::from_nanos(1));
        assert_eq!(m.deadline(), Some(gone));
        assert_eq!(m.tick(gone).len(), 2);
    }

    #[test]
    fn new_sanitises_priority_and_interval() {
        let m = Machine::new(Params {
            advert_interval: Duration::ZERO,
            ..params(0, A)
        });
        assert_eq!(m.priority(), 1);
        assert_eq!(m.master_adver_interval(), ms(10));
        assert_eq!(m.state(), State::Init);
        assert_eq!(m.deadline(), None);
        assert_eq!(m.master_addr(), None);
    }

    #[test]
    fn startup_backup_then_master_after_master_down_interval() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.master_addr(), None);
        let down = t0 + 3 * SEC + ms(609) + Duration::from_micros(375);
        assert_eq!(m.deadline(), Some(down));
        assert_eq!(m.tick(down - Duration::from_nanos(1)), vec![]);
        assert_eq!(m.state(), State::Backup);
        assert_eq!(
            m.tick(down),
            vec![Action::SendAdvert { priority: 100 }, Action::BecomeMaster]
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.master_addr(), Some(A));
        assert_eq!(m.deadline(), Some(down + SEC));
        assert_eq!(m.tick(down + ms(500)), vec![]);
        assert_eq!(
            m.tick(down + SEC),
            vec![Action::SendAdvert { priority: 100 }]
        );
        assert_eq!(m.deadline(), Some(down + 2 * SEC));
        // A late wake-up re-arms from when it happened.
        assert_eq!(
            m.tick(down + 2 * SEC + ms(300)),
            vec![Action::SendAdvert { priority: 100 }]
        );
        assert_eq!(m.deadline(), Some(down + 3 * SEC + ms(300)));
    }

    #[test]
    fn start_is_idempotent() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        assert_eq!(m.start(t0 + SEC), vec![]);
        assert_eq!(m.deadline(), Some(t0 + mdi(100)));
    }

    #[test]
    fn backup_hearing_higher_priority_stays_backup_and_resets_timer() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        for i in 1..=10u32 {
            let t = t0 + SEC * i;
            assert_eq!(m.on_advert(t, B, 110, SEC), vec![]);
            assert_eq!(m.deadline(), Some(t + mdi(100)));
            assert_eq!(m.tick(t), vec![]);
        }
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.master_addr(), Some(B));
    }

    #[test]
    fn backup_learns_master_adver_interval() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        let t = t0 + ms(200);
        m.on_advert(t, B, 110, ms(100));
        assert_eq!(m.master_adver_interval(), ms(100));
        assert_eq!(m.skew_time(), ms(100) * 156 / 256);
        assert_eq!(m.deadline(), Some(t + ms(300) + ms(100) * 156 / 256));
        // A zero interval is not learned.
        m.on_advert(t + ms(100), B, 110, Duration::ZERO);
        assert_eq!(m.master_adver_interval(), ms(100));
        // Becoming master goes back to our own interval.
        let down = m.deadline().unwrap();
        m.tick(down);
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.master_adver_interval(), SEC);
        assert_eq!(m.deadline(), Some(down + SEC));
    }

    #[test]
    fn master_hearing_higher_priority_steps_down() {
        let t0 = base();
        let mut m = master_at(t0, params(100, A));
        let t = t0 + ms(300);
        assert_eq!(
            m.on_advert(t, B, 110, ms(500)),
            vec![Action::SendAdvert { priority: 100 }, Action::BecomeBackup],
            "one last advert of ours, so the winner re-announces itself"
        );
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.master_addr(), Some(B));
        assert_eq!(m.master_adver_interval(), ms(500));
        assert_eq!(m.deadline(), Some(t + 3 * ms(500) + ms(500) * 156 / 256));
        assert_eq!(m.tick(t + SEC), vec![]);
    }

    #[test]
    fn master_hearing_lower_priority_readvertises() {
        let t0 = base();
        let mut m = master_at(t0, params(110, A));
        let t = t0 + ms(300);
        assert_eq!(
            m.on_advert(t, B, 100, SEC),
            vec![Action::SendAdvert { priority: 110 }, Action::Garp],
            "answer at once and announce the addresses again"
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.deadline(), Some(t + SEC));
        // A resigning peer only wants the prompt advert.
        assert_eq!(
            m.on_advert(t + ms(10), B, 0, SEC),
            vec![Action::SendAdvert { priority: 110 }]
        );
    }

    #[test]
    fn v2_skew_time_counts_in_seconds_whatever_the_interval() {
        // RFC 3768 §6.1: Skew_Time = (256 - Priority) / 256 seconds.
        let v2 = |interval| {
            Machine::new(Params {
                version: 2,
                advert_interval: interval,
                ..params(100, A)
            })
        };
        let m = v2(3 * SEC);
        assert_eq!(m.skew_time(), SEC * 156 / 256);
        assert_eq!(m.master_down_interval(), 9 * SEC + SEC * 156 / 256);
        // v3 scales the skew with the interval.
        let m = Machine::new(Params {
            advert_interval: 3 * SEC,
            ..params(100, A)
        });
        assert_eq!(m.skew_time(), 3 * SEC * 156 / 256);
    }

    #[test]
    fn master_equal_priority_tie_break_by_address() {
        let t0 = base();
        // The peer's address is higher: it wins.
        let mut m = master_at(t0, params(100, A));
        assert!(B > A);
        assert_eq!(
            m.on_advert(t0 + ms(1), B, 100, SEC),
            vec![Action::SendAdvert { priority: 100 }, Action::BecomeBackup]
        );
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.master_addr(), Some(B));
        // The peer's address is lower: we win and tell it so at once.
        let mut m = master_at(t0, params(100, A));
        assert!(C < A);
        assert_eq!(
            m.on_advert(t0 + ms(1), C, 100, SEC),
            vec![Action::SendAdvert { priority: 100 }, Action::Garp]
        );
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn two_equal_masters_converge_on_the_higher_address() {
        let t0 = base();
        let mut a = master_at(t0, params(100, A));
        let mut b = master_at(t0, params(100, B));
        // Each hears the other's advert from the same instant.
        assert_eq!(
            a.on_advert(t0, B, 100, SEC),
            vec![Action::SendAdvert { priority: 100 }, Action::BecomeBackup]
        );
        assert_eq!(
            b.on_advert(t0, A, 100, SEC),
            vec![Action::SendAdvert { priority: 100 }, Action::Garp]
        );
        assert_eq!((a.state(), b.state()), (State::Backup, State::Master));
    }

    #[test]
    fn backup_equal_priority_accepts_either_address() {
        // RFC 5798 §6.4.2: a Backup only preempts a strictly lower priority; the address
        // tie-break is for two masters.
        let t0 = base();
        for src in [B, C] {
            let mut m = backup_at(t0, params(100, A));
            for i in 1..=10u32 {
                m.on_advert(t0 + SEC * i, src, 100, SEC);
            }
            assert_eq!(m.deadline(), Some(t0 + SEC * 10 + mdi(100)));
            assert_eq!(m.tick(t0 + SEC * 11), vec![]);
            assert_eq!(m.state(), State::Backup);
            assert_eq!(m.master_addr(), Some(src));
        }
    }

    #[test]
    fn priority_zero_lets_backup_take_over_after_skew_time() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        m.on_advert(t0 + SEC, B, 110, SEC);
        let t = t0 + ms(1500);
        assert_eq!(m.on_advert(t, B, 0, SEC), vec![]);
        let skew = ms(609) + Duration::from_micros(375);
        assert_eq!(m.deadline(), Some(t + skew));
        assert_eq!(m.master_addr(), None);
        assert_eq!(m.tick(t + skew - Duration::from_nanos(1)), vec![]);
        assert_eq!(
            m.tick(t + skew),
            vec![Action::SendAdvert { priority: 100 }, Action::BecomeMaster]
        );
    }

    #[test]
    fn priority_zero_never_postpones_a_due_takeover() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        // Long silence: the timer is due in 100 ms, sooner than Skew_Time.
        let t = t0 + mdi(100) - ms(100);
        m.on_advert(t, B, 0, SEC);
        assert_eq!(m.deadline(), Some(t0 + mdi(100)));
    }

    #[test]
    fn master_hearing_priority_zero_advertises_at_once() {
        let t0 = base();
        let mut m = master_at(t0, params(100, A));
        let t = t0 + ms(400);
        assert_eq!(
            m.on_advert(t, B, 0, SEC),
            vec![Action::SendAdvert { priority: 100 }]
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.deadline(), Some(t + SEC));
    }

    #[test]
    fn preempt_takes_over_from_lower_master_at_master_down_expiry() {
        let t0 = base();
        let mut m = backup_at(t0, params(110, A));
        let down = t0 + mdi(110);
        let mut t = t0 + ms(100);
        while t < down {
            assert_eq!(m.on_advert(t, B, 100, SEC), vec![]);
            assert_eq!(m.master_addr(), Some(B));
            assert_eq!(
                m.deadline(),
                Some(down),
                "lower adverts must not reset the timer"
            );
            assert_eq!(m.tick(t), vec![]);
            t += SEC;
        }
        assert_eq!(
            m.tick(down),
            vec![Action::SendAdvert { priority: 110 }, Action::BecomeMaster]
        );
    }

    #[test]
    fn no_preempt_stays_backup_under_lower_master() {
        let t0 = base();
        let mut m = backup_at(
            t0,
            Params {
                preempt: false,
                ..params(110, A)
            },
        );
        for i in 1..=30u32 {
            let t = t0 + SEC * i;
            assert_eq!(m.on_advert(t, B, 100, SEC), vec![]);
            assert_eq!(m.tick(t), vec![]);
            assert_eq!(m.deadline(), Some(t + mdi(110)));
        }
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.master_addr(), Some(B));
        // If that master dies, it still takes over.
        let last = t0 + SEC * 30;
        assert_eq!(m.tick(last + mdi(110)).len(), 2);
        assert_eq!(m.state(), State::Master);
    }

    /// Runs every timer due up to `until`, asserting none of them acts.
    fn run_timers(m: &mut Machine, until: Instant) {
        while let Some(d) = m.deadline().filter(|d| *d <= until) {
            assert_eq!(m.tick(d), vec![], "acted at a timer");
        }
    }

    fn delayed(priority: u8, delay: Duration) -> Params {
        Params {
            preempt_delay: delay,
            ..params(priority, A)
        }
    }

    #[test]
    fn preempt_delay_postpones_takeover_of_a_live_lower_master() {
        let t0 = base();
        let mut m = backup_at(t0, delayed(110, 10 * SEC));
        let first = t0 + ms(100);
        let take_over = first + 10 * SEC;
        let mut t = first;
        while t < take_over {
            run_timers(&mut m, t);
            assert_eq!(m.on_advert(t, B, 100, SEC), vec![]);
            t += SEC;
        }
        run_timers(&mut m, take_over - Duration::from_nanos(1));
        // Master_Down expired long ago; the hold is what keeps us backup.
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.deadline(), Some(take_over));
        assert_eq!(
            m.tick(take_over),
            vec![Action::SendAdvert { priority: 110 }, Action::BecomeMaster]
        );
    }

    #[test]
    fn preempt_delay_does_not_apply_when_the_master_goes_silent() {
        let t0 = base();
        let mut m = backup_at(t0, delayed(110, 60 * SEC));
        let first = t0 + ms(100);
        let last = first + 5 * SEC;
        let mut t = first;
        while t <= last {
            run_timers(&mut m, t);
            m.on_advert(t, B, 100, SEC);
            t += SEC;
        }
        // Master_Down expired at t0 + mdi, but the lower master was alive: held since.
        assert!(m.deadline().unwrap() > t0 + mdi(110));
        // Once it has been silent for Master_Down_Interval we take over, delay or not.
        run_timers(&mut m, last + mdi(110) - Duration::from_nanos(1));
        assert_eq!(m.deadline(), Some(last + mdi(110)));
        assert_eq!(m.tick(last + mdi(110)).len(), 2);
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn preempt_delay_restarts_after_a_higher_master() {
        let t0 = base();
        let mut m = backup_at(t0, delayed(110, 5 * SEC));
        m.on_advert(t0 + SEC, B, 100, SEC);
        // A better master shows up: no preemption wanted any more.
        m.on_advert(t0 + 2 * SEC, C, 120, SEC);
        assert_eq!(m.master_addr(), Some(C));
        // It goes away and a lower master appears; the delay counts from this new sighting.
        let again = t0 + 3 * SEC;
        let mut t = again;
        while t < again + 5 * SEC {
            run_timers(&mut m, t);
            m.on_advert(t, B, 100, SEC);
            t += SEC;
        }
        run_timers(&mut m, again + 5 * SEC - Duration::from_nanos(1));
        assert_eq!(m.deadline(), Some(again + 5 * SEC));
        assert_eq!(m.tick(again + 5 * SEC).len(), 2);
    }

    #[test]
    fn owner_starts_as_master() {
        let t0 = base();
        let mut m = Machine::new(params(255, A));
        assert_eq!(
            m.start(t0),
            vec![Action::SendAdvert { priority: 255 }, Action::BecomeMaster]
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.master_addr(), Some(A));
        assert_eq!(m.deadline(), Some(t0 + SEC));
        // Even with preempt off.
        let mut m = Machine::new(Params {
            preempt: false,
            ..params(255, A)
        });
        assert_eq!(m.start(t0).len(), 2);
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn owner_always_preempts_without_delay() {
        let t0 = base();
        // A non-owner backup with preempt off and a long delay becomes owner by tracking.
        let mut m = backup_at(
            t0,
            Params {
                preempt: false,
                preempt_delay: 60 * SEC,
                ..params(200, A)
            },
        );
        m.on_advert(t0 + ms(100), B, 250, SEC);
        let reset = t0 + ms(100);
        assert_eq!(m.set_priority(reset, 255), vec![]);
        let mut t = reset + SEC;
        while t < reset + mdi(200) {
            m.on_advert(t, B, 250, SEC);
            assert_eq!(
                m.deadline(),
                Some(reset + mdi(200)),
                "the owner ignores lower masters"
            );
            t += SEC;
        }
        assert_eq!(
            m.tick(reset + mdi(200)),
            vec![Action::SendAdvert { priority: 255 }, Action::BecomeMaster]
        );
    }

    #[test]
    fn owner_master_ignores_lower_and_readvertises() {
        let t0 = base();
        let mut m = Machine::new(params(255, A));
        m.start(t0);
        assert_eq!(
            m.on_advert(t0 + ms(5), B, 254, SEC),
            vec![Action::SendAdvert { priority: 255 }, Action::Garp]
        );
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn set_priority_as_master_advertises_at_once() {
        let t0 = base();
        let mut m = master_at(t0, params(110, A));
        let t = t0 + ms(250);
        assert_eq!(
            m.set_priority(t, 90),
            vec![Action::SendAdvert { priority: 90 }]
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.priority(), 90);
        assert_eq!(m.deadline(), Some(t + SEC));
        assert_eq!(m.tick(t + SEC), vec![Action::SendAdvert { priority: 90 }]);
        // Unchanged priority: nothing to say.
        assert_eq!(m.set_priority(t + 2 * SEC, 90), vec![]);
        // Zero is not a priority one can hold.
        assert_eq!(
            m.set_priority(t + 2 * SEC, 0),
            vec![Action::SendAdvert { priority: 1 }]
        );
        // Now outranked: the next higher advert makes us step down.
        assert_eq!(
            m.on_advert(t + 2 * SEC, B, 100, SEC),
            vec![Action::SendAdvert { priority: 1 }, Action::BecomeBackup]
        );
    }

    #[test]
    fn set_priority_as_backup_changes_preemption() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        m.on_advert(t0 + SEC, B, 105, SEC);
        assert_eq!(m.deadline(), Some(t0 + SEC + mdi(100)));
        // Raised above the master: its next adverts are ignored and we take over.
        assert_eq!(m.set_priority(t0 + ms(1500), 110), vec![]);
        m.on_advert(t0 + 2 * SEC, B, 105, SEC);
        assert_eq!(m.deadline(), Some(t0 + SEC + mdi(100)));
        assert_eq!(m.tick(t0 + SEC + mdi(100)).len(), 2);
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn set_priority_drop_while_preempting_gives_master_credit() {
        let t0 = base();
        let mut m = backup_at(t0, params(110, A));
        let heard = t0 + 3 * SEC;
        m.on_advert(heard, B, 100, SEC);
        // The timer from startup would fire at t0 + mdi(110), just before B's next advert.
        assert_eq!(m.deadline(), Some(t0 + mdi(110)));
        assert_eq!(m.set_priority(heard + ms(100), 90), vec![]);
        assert_eq!(m.deadline(), Some(heard + mdi(90)));
        assert_eq!(m.tick(t0 + mdi(110)), vec![]);
        assert_eq!(m.state(), State::Backup);
    }

    #[test]
    fn shutdown_as_master_resigns() {
        let t0 = base();
        let mut m = master_at(t0, params(110, A));
        assert_eq!(
            m.shutdown(t0 + ms(10)),
            vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup]
        );
        assert_eq!(m.state(), State::Init);
        assert_eq!(m.deadline(), None);
        assert_eq!(m.master_addr(), None);
        assert_eq!(m.tick(t0 + 10 * SEC), vec![]);
        assert_eq!(m.on_advert(t0 + 10 * SEC, B, 200, SEC), vec![]);
        // It can be started again.
        assert_eq!(m.start(t0 + 20 * SEC), vec![Action::BecomeBackup]);
    }

    #[test]
    fn shutdown_as_backup_is_silent() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        assert_eq!(m.shutdown(t0 + SEC), vec![]);
        assert_eq!(m.state(), State::Init);
        assert_eq!(m.deadline(), None);
    }

    #[test]
    fn fault_and_recover() {
        let t0 = base();
        let mut m = master_at(t0, params(110, A));
        assert_eq!(
            m.fault(t0 + ms(10)),
            vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup],
            "a master that faults resigns first"
        );
        assert_eq!(m.state(), State::Fault);
        assert_eq!(m.deadline(), None);
        assert_eq!(m.master_addr(), None);
        assert_eq!(m.fault(t0 + ms(20)), vec![]);
        assert_eq!(m.tick(t0 + 10 * SEC), vec![]);
        assert_eq!(m.on_advert(t0 + 10 * SEC, B, 100, SEC), vec![]);
        assert_eq!(m.set_priority(t0 + 10 * SEC, 120), vec![]);
        // Shutting down from Fault lands in Init, where recover has nothing to do.
        assert_eq!(m.shutdown(t0 + 10 * SEC), vec![]);
        assert_eq!(m.state(), State::Init);
        assert_eq!(m.recover(t0 + 11 * SEC), vec![]);
        m.fault(t0 + 11 * SEC);
        let t = t0 + 12 * SEC;
        assert_eq!(m.recover(t), vec![Action::BecomeBackup]);
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.deadline(), Some(t + mdi(120)));

        // As backup: nothing to give up.
        assert_eq!(m.fault(t + SEC), vec![]);
        assert_eq!(m.state(), State::Fault);

        // The owner recovers straight to master.
        let mut o = Machine::new(params(255, A));
        o.start(t0);
        o.fault(t0 + SEC);
        assert_eq!(
            o.recover(t0 + 2 * SEC),
            vec![Action::SendAdvert { priority: 255 }, Action::BecomeMaster]
        );
    }

    #[test]
    fn own_adverts_are_ignored() {
        let t0 = base();
        let mut m = backup_at(t0, params(100, A));
        assert_eq!(m.on_advert(t0 + SEC, A, 200, SEC), vec![]);
        assert_eq!(m.deadline(), Some(t0 + mdi(100)));
        assert_eq!(m.master_addr(), None);
        let mut m = master_at(t0, params(100, A));
        assert_eq!(m.on_advert(t0 + ms(1), A, 200, SEC), vec![]);
        assert_eq!(m.state(), State::Master);
    }

    // ---- two machines on one link ----

    struct Node {
        m: Machine,
        alive: bool,
        last_sent: Option<Instant>,
        became_master: Option<Instant>,
    }

    struct Link {
        nodes: Vec<Node>,
        now: Instant,
    }

    impl Link {
        fn new(now: Instant, ps: Vec<Params>) -> Self {
            let nodes = ps
                .into_iter()
                .map(|p| Node {
                    m: Machine::new(p),
                    alive: false,
                    last_sent: None,
                    became_master: None,
                })
                .collect();
            Link { nodes, now }
        }

        fn start(&mut self, i: usize) {
            self.nodes[i].alive = true;
            let actions = self.nodes[i].m.start(self.now);
            self.deliver(actions.into_iter().map(|a| (i, a)).collect());
        }

        fn kill(&mut self, i: usize) {
            self.nodes[i].alive = false;
        }

        fn replace(&mut self, i: usize, p: Params) {
            self.nodes[i].m = Machine::new(p);
            self.nodes[i].became_master = None;
            self.start(i);
        }

        /// Hands every advert to every other live node at the same instant, following replies.
        fn deliver(&mut self, mut queue: VecDeque<(usize, Action)>) {
            let mut budget = 1000;
            while let Some((i, a)) = queue.pop_front() {
                budget -= 1;
                assert!(budget > 0, "advert storm");
                match a {
                    Action::SendAdvert { priority } => {
                        self.nodes[i].last_sent = Some(self.now);
                        let src = self.nodes[i].m.params().primary;
                        let interval = self.nodes[i].m.params().advert_interval;
                        for j in 0..self.nodes.len() {
                            if j != i && self.nodes[j].alive {
                                for r in
                                    self.nodes[j].m.on_advert(self.now, src, priority, interval)
                                {
                                    queue.push_back((j, r));
                                }
                            }
                        }
                    }
                    Action::BecomeMaster => self.nodes[i].became_master = Some(self.now),
                    Action::BecomeBackup | Action::Garp => {}
                }
            }
        }

        /// Advances to the earliest deadline of a live node and runs every timer due then.
        fn step(&mut self) {
            let next = self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .filter_map(|n| n.m.deadline())
                .min()
                .expect("some live node has a timer");
            assert!(next >= self.now, "time went backwards");
            self.now = next;
            let mut queue = VecDeque::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive && self.nodes[i].m.deadline().is_some_and(|d| d <= next) {
                    for a in self.nodes[i].m.tick(next) {
                        queue.push_back((i, a));
                    }
                }
            }
            self.deliver(queue);
        }

        fn masters(&self) -> Vec<usize> {
            (0..self.nodes.len())
                .filter(|&i| self.nodes[i].alive && self.nodes[i].m.state() == State::Master)
                .collect()
        }

        /// Steps until `until`, checking the invariant after every step.
        fn run_until(&mut self, until: Instant, mut invariant: impl FnMut(&Link)) {
            while self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .filter_map(|n| n.m.deadline())
                .min()
                .is_some_and(|d| d <= until)
            {
                self.step();
                invariant(self);
            }
            self.now = until;
        }
    }

    #[test]
    fn two_machines_elect_fail_over_and_preempt_back() {
        const NODE_A: usize = 0;
        const NODE_B: usize = 1;
        let t0 = base();
        let pa = params(110, A);
        let mut link = Link::new(t0, vec![pa.clone(), params(100, B)]);
        link.start(NODE_A);
        link.start(NODE_B);

        // Both start as backups; A's shorter skew makes it master first.
        let elected = t0 + mdi(110);
        link.run_until(elected, |l| {
            if l.now < elected {
                assert!(l.masters().is_empty());
            }
        });
        assert_eq!(link.masters(), vec![NODE_A]);
        assert_eq!(link.nodes[NODE_A].became_master, Some(elected));

        // Steady state: exactly one master, always A.
        link.run_until(t0 + 60 * SEC, |l| assert_eq!(l.masters(), vec![NODE_A]));
        assert_eq!(link.nodes[NODE_B].m.state(), State::Backup);
        assert_eq!(link.nodes[NODE_B].m.master_addr(), Some(A));

        // A dies silently.
        link.kill(NODE_A);
        let last_a = link.nodes[NODE_A].last_sent.unwrap();
        link.run_until(last_a + 10 * SEC, |l| assert!(l.masters().len() <= 1));
        assert_eq!(link.masters(), vec![NODE_B]);
        let took_over = link.nodes[NODE_B].became_master.unwrap();
        assert!(took_over <= last_a + 3 * SEC + link.nodes[NODE_B].m.skew_time());
        assert_eq!(took_over, last_a + mdi(100));

        // A comes back (fresh process) with preempt on and takes over from B.
        let back = link.now + ms(123);
        link.now = back;
        link.replace(
            NODE_A,
            Params {
                preempt: true,
                ..pa
            },
        );
        assert_eq!(link.nodes[NODE_A].m.state(), State::Backup);
        let preempted = back + mdi(110);
        link.run_until(back + 60 * SEC, |l| {
            if l.now < preempted {
                assert_eq!(l.masters(), vec![NODE_B]);
            } else {
                assert_eq!(l.masters(), vec![NODE_A]);
            }
        });
        assert_eq!(link.nodes[NODE_A].became_master, Some(preempted));
        assert_eq!(link.nodes[NODE_B].m.state(), State::Backup);
        assert_eq!(link.nodes[NODE_B].m.master_addr(), Some(A));
    }

    #[test]
    fn two_machines_graceful_handover_takes_skew_time() {
        let t0 = base();
        let mut link = Link::new(t0, vec![params(110, A), params(100, B)]);
        link.start(0);
        link.start(1);
        link.run_until(t0 + 20 * SEC, |_| {});
        assert_eq!(link.masters(), vec![0]);
        // A shuts down cleanly: its priority-0 advert reaches B.
        let bye = link.now;
        let actions = link.nodes[0].m.shutdown(bye);
        link.deliver(actions.into_iter().map(|a| (0, a)).collect());
        link.kill(0);
        link.run_until(bye + 5 * SEC, |l| assert!(l.masters().len() <= 1));
        assert_eq!(
            link.nodes[1].became_master,
            Some(bye + link.nodes[1].m.skew_time())
        );
    }
}
