//! VRRP (v2 RFC 3768 / v3 RFC 5798) so the VIP moves to the standby LB when the master
//! fails.
//!
//! `packet` and `state` are pure. `socket` (adverts), `garp`, `holder` (the virtual
//! addresses, with lifetimes) and `notify` act at the edge. This module runs one instance on a
//! thread of its own with its own single-threaded runtime and netlink socket, optionally at a
//! real-time priority, so advert timing never waits on probes, Maglev rebuilds, map writes or
//! the main runtime's netlink calls.

pub mod garp;
pub mod holder;
pub mod notify;
pub mod packet;
pub mod socket;
pub mod state;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::Ipv4Addr,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{sleep_until, Instant},
};

use crate::{
    config::VrrpConfig,
    heartbeat::Heartbeat,
    netlink::{self, Event, Netlink},
};
use holder::{Command, Holder, Report, Want};
use notify::NotifyState;
use packet::{Advert, Expect, Version, VRRP_MCAST};
use state::{Action, Machine, Params, State};

/// What `lb-agent status` shows of VRRP.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VrrpStatus {
    /// "master", "backup", "init" or "fault".
    pub state: String,
    /// The instance name notify scripts get.
    #[serde(default)]
    pub name: String,
    pub version: u8,
    pub virtual_router_id: u8,
    pub base_priority: u8,
    /// What we advertise: base minus tracking; 0 in the fault state.
    pub effective_priority: u8,
    /// The current master's address, as far as we know.
    pub master: Option<String>,
    pub advert_interval_ms: u64,
    pub addresses: Vec<String>,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Rejected packets by reason.
    pub bad_packets: BTreeMap<String, u64>,
    /// State changes since start.
    #[serde(default)]
    pub transitions: u64,
    /// The longest time between two adverts from the master heard while backup (how
    /// close this host came to a false failover), in milliseconds.
    #[serde(default)]
    pub longest_advert_gap_ms: f64,
    /// "backup -> master" and when (Unix time, with milliseconds).
    pub last_transition: Option<String>,
    pub last_transition_unix: Option<f64>,
    /// Why the instance is in the fault state.
    #[serde(default)]
    pub fault_reason: Option<String>,
    /// SCHED_RR priority of the VRRP thread (0: normal scheduler).
    #[serde(default)]
    pub rt_priority: u8,
}

/// Shared between the VRRP thread and the control socket.
pub type Shared = Arc<Mutex<VrrpStatus>>;

/// The status, also after a thread panicked holding the lock: the failure path must be able
/// to read it.
pub fn lock(status: &Shared) -> MutexGuard<'_, VrrpStatus> {
    status.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What ties the VRRP thread to the rest of the agent.
#[derive(Clone)]
pub struct Links {
    /// What `lb-agent status` shows.
    pub status: Shared,
    /// How much tracking lowers the priority now.
    pub penalty: watch::Receiver<u8>,
    /// Beaten by the VRRP thread; the agent's watchdog reads it.
    pub vrrp_alive: Heartbeat,
    /// Beaten by the keeper; VRRP resigns (fault) when it goes stale, since tracking and the
    /// data plane are then unwatched.
    pub keeper_alive: Heartbeat,
    /// The config, as reloads change it (only what `config::diff` lets change in place).
    pub settings: watch::Receiver<VrrpConfig>,
}

/// The keeper's heartbeat older than this puts the instance in fault.
pub const KEEPER_STALE: Duration = Duration::from_secs(5);
/// How often the instance beats its heartbeat and looks at the keeper's.
const BEAT_EVERY: Duration = Duration::from_millis(250);
/// Bursts of gratuitous ARPs for lower-priority adverts are at least this far apart: a
/// peer that keeps sending them (one-way partition, a firewall dropping VRRP on its side)
/// must not make us flood the segment.
const LOWER_PRIO_GARP_GAP: Duration = Duration::from_secs(1);

/// Errors starting VRRP.
#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("VRRP on {interface}: {what}: {source}")]
    Io {
        interface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn state_word(s: State) -> &'static str {
    match s {
        State::Init => "init",
        State::Backup => "backup",
        State::Master => "master",
        State::Fault => "fault",
    }
}

/// The VRRP thread: `stop` asks it to resign and end; `done` says how it ended.
pub struct VrrpThread {
    stop: watch::Sender<bool>,
    /// Set by `abandon`: end without resigning or releasing the addresses.
    abandon: Arc<AtomicBool>,
    done: Option<oneshot::Receiver<Result<(), String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    resigned: Arc<AtomicBool>,
}

impl VrrpThread {
    /// Starts the instance on its own thread and returns once it runs (or failed to start).
    /// `resume`: start as master at once, without the election (the agent re-executed
    /// itself while master).
    pub async fn spawn(
        cfg: VrrpConfig,
        ifindex: u32,
        primary: Ipv4Addr,
        links: Links,
        resume: bool,
    ) -> Result<Self, VrrpError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let abandon = Arc::new(AtomicBool::new(false));
        let abandon_flag = abandon.clone();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), VrrpError>>();
        let (done_tx, done_rx) = oneshot::channel();
        let resigned = Arc::new(AtomicBool::new(false));
        let flag = resigned.clone();
        let interface = cfg.interface.clone();
        let thread = std::thread::Builder::new()
            .name("lb-vrrp".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(move || {
                    thread_main(
                        cfg,
                        ifindex,
                        primary,
                        links,
                        Control {
                            stop: stop_rx,
                            abandon: abandon_flag,
                            resume,
                        },
                        ready_tx,
                        flag,
                    )
                }));
                let result = match result {
                    Ok(r) => r,
                    Err(p) => Err(format!("panicked: {}", panic_message(&*p))),
                };
                let _ = done_tx.send(result);
            })
            .map_err(|source| VrrpError::Io {
                interface,
                what: "starting the VRRP thread",
                source,
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self {
                stop: stop_tx,
                abandon,
                done: Some(done_rx),
                thread: Some(thread),
                resigned,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let why = match done_rx.await {
                    Ok(Err(e)) => e,
                    _ => "ended before it started".into(),
                };
                let _ = thread.join();
                Err(VrrpError::Other(format!("VRRP thread: {why}")))
            }
        }
    }

    /// How the thread ends; resolves once (later calls never resolve).
    pub fn take_done(&mut self) -> Option<oneshot::Receiver<Result<(), String>>> {
        self.done.take()
    }

    /// Asks the instance to resign (priority 0 if master), remove its addresses and end.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Ends the instance as it is, master or not, without a priority 0 advert and without
    /// removing the addresses: the agent is about to re-execute itself and its successor
    /// resumes within the addresses' lifetime and the peer's Master_Down_Interval.
    pub fn abandon(&self) {
        self.abandon.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
    }

    /// True once the instance went through its orderly resignation; false when it ended any
    /// other way (then the caller must give up the VIP for it).
    pub fn resigned(&self) -> bool {
        self.resigned.load(Ordering::SeqCst)
    }

    /// Waits for the OS thread to exit, at most `timeout`; true when it did.
    pub async fn join(&mut self, timeout: Duration) -> bool {
        let Some(t) = self.thread.take() else {
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        while !t.is_finished() {
            if std::time::Instant::now() > deadline {
                self.thread = Some(t);
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = t.join();
        true
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// SCHED_RR for the calling thread; processes it starts (notify scripts) get the normal
/// scheduler back (SCHED_RESET_ON_FORK).
fn set_rt_priority(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: pid 0 is the calling thread; param is valid for the call.
    let rc =
        unsafe { libc::sched_setscheduler(0, libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, &param) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How the agent steers the thread: stop, and how to start and end.
struct Control {
    stop: watch::Receiver<bool>,
    abandon: Arc<AtomicBool>,
    resume: bool,
}

fn thread_main(
    cfg: VrrpConfig,
    ifindex: u32,
    primary: Ipv4Addr,
    links: Links,
    control: Control,
    ready: oneshot::Sender<Result<(), VrrpError>>,
    resigned: Arc<AtomicBool>,
) -> Result<(), String> {
    let interface = cfg.interface.clone();
    if cfg.rt_priority > 0 {
        if let Err(source) = set_rt_priority(cfg.rt_priority) {
            let hint = if source.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_SYS_NICE or RLIMIT_RTPRIO; or set vrrp.rt_priority = 0)"
            } else {
                ""
            };
            let _ = ready.send(Err(VrrpError::Other(format!(
                "VRRP on {interface}: vrrp.rt_priority = {}: SCHED_RR: {source}{hint}",
                cfg.rt_priority
            ))));
            return Ok(());
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(source) => {
            let _ = ready.send(Err(VrrpError::Io {
                interface,
                what: "starting the VRRP runtime",
                source,
            }));
            return Ok(());
        }
    };
    rt.block_on(async move {
        let parts = match Instance::start(cfg, ifindex, primary, links.status.clone()).await {
            Ok(p) => p,
            Err(e) => {
                let _ = ready.send(Err(e));
                return Ok(());
            }
        };
        let _ = ready.send(Ok(()));
        if parts.run(links, control).await? {
            resigned.store(true, Ordering::SeqCst);
        }
        Ok(())
    })
}

/// At most one log line per (reason, sender) this often: a peer with the wrong password,
/// version or interval otherwise gives a silent dual master, or a flood of lines.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limited logging of rejected adverts.
#[derive(Default)]
struct RejectLog {
    last: HashMap<(&'static str, Ipv4Addr), (Instant, u64)>,
}

impl RejectLog {
    fn note(&mut self, reason: &'static str, src: Ipv4Addr, vrid: u8) {
        let now = Instant::now();
        if self.last.len() > 256 {
            self.last.clear();
        }
        match self.last.get_mut(&(reason, src)) {
            Some((at, suppressed)) if now.duration_since(*at) < REJECT_LOG_EVERY => {
                *suppressed += 1;
            }
            Some((at, suppressed)) => {
                log::warn!(
                    "VRRP VRID {vrid}: rejected a packet from {src}: {reason} ({} more since the last report)",
                    *suppressed
                );
                *at = now;
                *suppressed = 0;
            }
            None => {
                log::warn!(
                    "VRRP VRID {vrid}: rejected a packet from {src}: {reason} (a peer with another version, password, interval or address list does not count as a master: check its config)"
                );
                self.last.insert((reason, src), (now, 0));
            }
        }
    }
}

/// Why the instance is in Fault.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FaultCause {
    LinkDown,
    Addresses(String),
    /// The keeper (tracking, data plane watchdog) stopped beating.
    KeeperStale,
}

impl FaultCause {
    fn words(&self) -> String {
        match self {
            FaultCause::LinkDown => "interface down".into(),
            FaultCause::Addresses(e) => e.clone(),
            FaultCause::KeeperStale => format!(
                "the agent's keeper has not answered for over {}s: tracking and the data plane are unwatched",
                KEEPER_STALE.as_secs()
            ),
        }
    }
}

/// Longest wait before trying the addresses again after they could not be added.
const MAX_FAULT_RETRY: Duration = Duration::from_secs(60);
/// How often the link is read as a backstop for missed netlink events.
const LINK_POLL_EVERY: Duration = Duration::from_secs(2);

/// One VRRP instance: the machine and what it acts on.
struct Instance {
    cfg: VrrpConfig,
    ifindex: u32,
    primary: Ipv4Addr,
    expect: Expect,
    sender: socket::Sender,
    machine: Machine,
    status: Shared,
    base: u8,
    want: watch::Sender<Want>,
    applied: watch::Receiver<u64>,
    holder: mpsc::Sender<Command>,
    last_lower_prio_garp: Option<Instant>,
    notify: Option<mpsc::UnboundedSender<(NotifyState, u8, crate::config::NotifyConfig)>>,
    /// How much tracking lowers the priority now.
    penalty: u8,
    link_usable: bool,
    /// When the last link event was handled: older poll readings must not override it.
    last_link_event: Instant,
    fault: Option<FaultCause>,
    fault_retry: Option<Instant>,
    fault_backoff: Duration,
    /// When preemption, suspended after the addresses could not be held, comes back.
    preempt_back: Option<Instant>,
    rejects: RejectLog,
    /// When the last valid advert was heard while backup.
    last_heard: Option<Instant>,
}

/// A started instance with the tasks and channels its loop selects on.
struct Parts {
    inst: Instance,
    receiver: socket::Receiver,
    events: netlink::Events,
    reports: mpsc::Receiver<Report>,
    links: mpsc::Receiver<(bool, Instant)>,
    holder_task: JoinHandle<()>,
    notify_task: JoinHandle<()>,
    poll_task: JoinHandle<()>,
}

impl Instance {
    async fn start(
        cfg: VrrpConfig,
        ifindex: u32,
        primary: Ipv4Addr,
        status: Shared,
    ) -> Result<Parts, VrrpError> {
        let ifname = cfg.interface.clone();
        let io = |what: &'static str| {
            let interface = ifname.clone();
            move |source: io::Error| VrrpError::Io {
                interface,
                what,
                source,
            }
        };
        let nl = Netlink::connect().map_err(io("opening netlink"))?;
        // Subscribe before reading the link, so no change falls between the two.
        let events = netlink::events().map_err(io("subscribing to link and address events"))?;
        let link = nl
            .link(ifindex)
            .await
            .map_err(|e| io("reading the interface")(e.source))?;
        let mac = link.mac.ok_or_else(|| {
            VrrpError::Other(format!(
                "VRRP on {ifname}: the interface has no MAC address"
            ))
        })?;
        let version = version_of(&cfg);
        let multicast = cfg.unicast_peers.is_empty();
        let receiver = socket::Receiver::open(&ifname, ifindex, multicast)
            .map_err(io("opening the receiving raw socket (CAP_NET_RAW)"))?;
        let sender = socket::Sender::open(&ifname, ifindex, primary)
            .map_err(io("opening the sending raw socket (CAP_NET_RAW)"))?;
        let garp = garp::Garp::open(ifindex, mac)
            .map_err(io("opening the gratuitous ARP socket (CAP_NET_RAW)"))?;

        let (report_tx, reports) = mpsc::channel(16);
        let (holder_tx, holder_rx) = mpsc::channel(64);
        let (want_tx, want_rx) = watch::channel(Want::default());
        let (applied_tx, applied) = watch::channel(0u64);
        let holder = Holder {
            nl: nl.clone(),
            ifindex,
            ifname: ifname.clone(),
            addresses: cfg.virtual_addresses.clone(),
            owner: cfg.priority == state::PRIORITY_OWNER,
            garp,
            garp_count: cfg.garp_count,
            garp_refresh: cfg.garp_refresh,
            reports: report_tx,
        };
        let holder_task = tokio::spawn(holder.run(want_rx, applied_tx, holder_rx));
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let notify_task = tokio::spawn(notify::run(cfg.name.clone(), notify_rx));
        let (link_tx, links) = mpsc::channel(4);
        let poll_task = tokio::spawn(poll_link(nl, ifindex, link.usable(), link_tx));

        let machine = Machine::new(Params {
            vrid: cfg.virtual_router_id,
            priority: cfg.priority,
            advert_interval: cfg.advert_interval,
            preempt: cfg.preempt,
            preempt_delay: cfg.preempt_delay,
            primary,
            version: cfg.version,
        });
        let expect = Expect {
            version,
            vrid: cfg.virtual_router_id,
            interval: version.interval_field(cfg.advert_interval),
            auth_pass: cfg.auth_pass.as_deref().map(packet::pass_bytes),
            multicast,
        };
        {
            let mut st = lock(&status);
            st.name = cfg.name.clone();
            st.version = cfg.version;
            st.virtual_router_id = cfg.virtual_router_id;
            st.base_priority = cfg.priority;
            st.effective_priority = cfg.priority;
            st.advert_interval_ms = cfg.advert_interval.as_millis() as u64;
            st.addresses = cfg
                .virtual_addresses
                .iter()
                .map(|(a, p)| format!("{a}/{p}"))
                .collect();
            st.state = "init".into();
            st.rt_priority = cfg.rt_priority;
        }
        let base = cfg.priority;
        Ok(Parts {
            inst: Instance {
                cfg,
                ifindex,
                primary,
                expect,
                sender,
                machine,
                status,
                base,
                want: want_tx,
                applied,
                holder: holder_tx,
                last_lower_prio_garp: None,
                notify: Some(notify_tx),
                penalty: 0,
                link_usable: link.usable(),
                last_link_event: Instant::now(),
                fault: None,
                fault_retry: None,
                fault_backoff: Duration::from_secs(1),
                preempt_back: None,
                rejects: RejectLog::default(),
                last_heard: None,
            },
            receiver,
            events,
            reports,
            links,
            holder_task,
            notify_task,
            poll_task,
        })
    }

    fn bump(&self, reason: &str) {
        *self
            .status
            .lock()
            .unwrap()
            .bad_packets
            .entry(reason.to_string())
            .or_default() += 1;
    }

    fn send_advert(&self, priority: u8) {
        fail::fail_point!("vrrp-send-advert", |_| ());
        let ad = advert(&self.cfg, priority);
        for dst in destinations(&self.cfg) {
            match self.sender.send(&ad.encode(self.primary, dst), dst) {
                Ok(()) => lock(&self.status).adverts_sent += 1,
                // A resignation on a link that just failed cannot get out; that is expected.
                Err(e) if priority == state::PRIORITY_STOP && !self.link_usable => {
                    log::debug!("VRRP: priority 0 advert to {dst}: {e}")
                }
                Err(e) => log::warn!("VRRP: sending an advert to {dst}: {e}"),
            }
        }
    }

    /// Best effort: losing a side command under pressure is harmless (see `Command`).
    fn command(&self, c: Command) {
        if let Err(e) = self.holder.try_send(c) {
            log::debug!("VRRP: the address holder is busy, skipped: {e}");
        }
    }

    /// Tells the holder to hold or release the addresses; returns the change's number.
    fn set_hold(&self, hold: bool) -> u64 {
        let mut seq = 0;
        self.want.send_modify(|w| {
            w.hold = hold;
            w.seq += 1;
            seq = w.seq;
        });
        seq
    }

    /// Releases the addresses and waits (at most `timeout`) until the holder has.
    async fn release(&mut self, timeout: Duration) -> bool {
        let seq = self.set_hold(false);
        tokio::time::timeout(timeout, self.applied.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn transition(&self, from: State) {
        let to = self.machine.state();
        if from == to {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let master = self
            .machine
            .master_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let fault = match &self.fault {
            Some(f) if to == State::Fault => f.words(),
            _ => String::new(),
        };
        tracing::info!(
            event = "vrrp_state",
            vrid = self.cfg.virtual_router_id,
            from = state_word(from),
            to = state_word(to),
            priority = self.effective_priority(),
            master = %master,
            reason = %fault,
            "VRRP VRID {}: {} -> {} (priority {}, master {master}){}",
            self.cfg.virtual_router_id,
            state_word(from),
            state_word(to),
            self.effective_priority(),
            if fault.is_empty() { String::new() } else { format!(": {fault}") }
        );
        {
            let mut st = lock(&self.status);
            st.transitions += 1;
            st.last_transition = Some(format!("{} -> {}", state_word(from), state_word(to)));
            st.last_transition_unix = Some((now * 1000.0).round() / 1000.0);
        }
        let ns = match to {
            State::Master => NotifyState::Master,
            State::Backup => NotifyState::Backup,
            State::Fault => NotifyState::Fault,
            State::Init => return,
        };
        if let Some(n) = &self.notify {
            let _ = n.send((ns, self.effective_priority(), self.cfg.notify.clone()));
        }
    }

    fn effective_priority(&self) -> u8 {
        if self.machine.state() == State::Fault {
            state::PRIORITY_STOP
        } else {
            self.machine.priority()
        }
    }

    fn perform(&mut self, actions: Vec<Action>, from: State) {
        // Only a change of state gets a span: a master's adverts come every interval.
        let _span = (self.machine.state() != from).then(|| {
            tracing::info_span!(
                "vrrp_transition",
                vrid = self.cfg.virtual_router_id,
                from = state_word(from)
            )
            .entered()
        });
        for a in actions {
            match a {
                Action::SendAdvert { priority } => self.send_advert(priority),
                Action::BecomeMaster => {
                    self.set_hold(true);
                }
                Action::BecomeBackup => {
                    self.set_hold(false);
                }
                Action::Garp => {
                    let now = Instant::now();
                    if self
                        .last_lower_prio_garp
                        .is_none_or(|t| now.duration_since(t) >= LOWER_PRIO_GARP_GAP)
                    {
                        self.last_lower_prio_garp = Some(now);
                        self.command(Command::Garp {
                            count: self.cfg.garp_lower_prio_repeat,
                        });
                    }
                }
            }
        }
        self.transition(from);
        if self.machine.state() != from {
            // Gaps are measured within one stretch as backup.
            self.last_heard = None;
        }
        let mut st = lock(&self.status);
        st.state = state_word(self.machine.state()).into();
        st.effective_priority = self.effective_priority();
        st.master = self.machine.master_addr().map(|a| a.to_string());
        st.fault_reason = match (&self.fault, self.machine.state()) {
            (Some(f), State::Fault) => Some(f.words()),
            _ => None,
        };
    }

    fn now() -> std::time::Instant {
        Instant::now().into_std()
    }

    fn enter_fault(&mut self, cause: FaultCause) {
        self.fault = Some(cause);
        let from = self.machine.state();
        let acts = self.machine.fault(Self::now());
        self.perform(acts, from);
    }

    fn leave_fault(&mut self) {
        self.fault = None;
        self.fault_retry = None;
        let from = self.machine.state();
        let acts = self.machine.recover(Self::now());
        self.perform(acts, from);
    }

    fn link_changed(&mut self, usable: bool) {
        self.last_link_event = Instant::now();
        if usable == self.link_usable {
            return;
        }
        self.link_usable = usable;
        if !usable {
            log::warn!(
                "VRRP: interface {} is down: fault (resigning if master)",
                self.cfg.interface
            );
            self.enter_fault(FaultCause::LinkDown);
        } else {
            log::info!("VRRP: interface {} is up again", self.cfg.interface);
            if self.machine.state() == State::Fault && self.fault != Some(FaultCause::KeeperStale) {
                self.leave_fault();
            }
        }
    }

    fn hold_failed(&mut self, why: String) {
        log::error!(
            "VRRP: cannot hold the virtual addresses: {why}; fault (priority 0), trying again in {}s",
            self.fault_backoff.as_secs()
        );
        self.fault_retry = Some(Instant::now() + self.fault_backoff);
        self.fault_backoff = (self.fault_backoff * 2).min(MAX_FAULT_RETRY);
        // Until the addresses can be held again, don't take the VIP from a working master
        // only to fail and hand it back (a failover, twice, every retry).
        self.machine.set_preempt(false);
        self.enter_fault(FaultCause::Addresses(why));
    }

    fn held(&mut self) {
        self.fault_backoff = Duration::from_secs(1);
        self.preempt_back = None;
        self.machine.set_preempt(self.cfg.preempt);
    }

    /// Follows the keeper's heartbeat: its silence means nothing watches tracking or the data
    /// plane any more, so this LB must not keep the VIP.
    fn check_keeper(&mut self, keeper: &Heartbeat) {
        let stale = keeper.age() > KEEPER_STALE;
        if stale && self.fault != Some(FaultCause::KeeperStale) {
            log::error!(
                "VRRP: the agent's keeper has not beaten for {:.1}s: fault (resigning if master)",
                keeper.age().as_secs_f64()
            );
            self.enter_fault(FaultCause::KeeperStale);
        } else if !stale && self.fault == Some(FaultCause::KeeperStale) {
            log::info!("VRRP: the keeper is back");
            if self.link_usable {
                self.leave_fault();
            } else {
                self.fault = Some(FaultCause::LinkDown);
            }
        }
    }

    /// Takes what a reload changed: base priority, tracking's effect, notify scripts,
    /// gratuitous ARP settings. The rest cannot differ (`config::diff` refuses it).
    fn reconfigure(&mut self, new: VrrpConfig) {
        let garp = (new.garp_count, new.garp_refresh);
        if garp != (self.cfg.garp_count, self.cfg.garp_refresh) {
            self.want.send_modify(|w| w.garp = Some(garp));
        }
        if new.priority != self.base {
            log::info!(
                "VRRP: base priority {} -> {} (reload)",
                self.base,
                new.priority
            );
            self.base = new.priority;
            lock(&self.status).base_priority = new.priority;
        }
        self.cfg = new;
        self.apply_penalty(self.penalty);
    }

    fn apply_penalty(&mut self, p: u8) {
        self.penalty = p;
        let prio = if self.base == state::PRIORITY_OWNER {
            self.base
        } else {
            self.base.saturating_sub(p).max(1)
        };
        if prio != self.machine.priority() {
            log::info!(
                "VRRP: effective priority {prio} (base {}, tracking -{p})",
                self.base
            );
            let from = self.machine.state();
            let acts = self.machine.set_priority(Self::now(), prio);
            self.perform(acts, from);
        }
    }

    /// Feeds one received packet (IP header included) to the machine if it is a valid advert.
    fn on_packet(&mut self, pkt: &[u8]) {
        let ip = match packet::parse_ipv4(pkt) {
            Ok(ip) => ip,
            Err(e) => {
                self.bump(e.reason());
                return;
            }
        };
        if ip.src == self.primary {
            return;
        }
        let vrid = self.cfg.virtual_router_id;
        if !self.expect.multicast && !self.cfg.unicast_peers.contains(&ip.src) {
            self.bump("unknown_peer");
            self.rejects.note("unknown_peer", ip.src, vrid);
            return;
        }
        let (ad, _form) = match Advert::decode(ip.payload(pkt), ip.src, ip.dst) {
            Ok(a) => a,
            Err(e) => {
                self.bump(e.reason());
                self.rejects.note(e.reason(), ip.src, vrid);
                return;
            }
        };
        if let Err(reason) = packet::check(&ad, ip.ttl, &self.expect) {
            // Other VRIDs on the same segment are other routers' business.
            if reason != "other_vrid" {
                self.bump(reason);
                self.rejects.note(reason, ip.src, vrid);
            }
            return;
        }
        let now = Instant::now();
        {
            let mut st = lock(&self.status);
            st.adverts_received += 1;
            if self.machine.state() == State::Backup && ad.priority != state::PRIORITY_STOP {
                if let Some(prev) = self.last_heard {
                    let gap = now.duration_since(prev).as_secs_f64() * 1000.0;
                    if gap > st.longest_advert_gap_ms {
                        st.longest_advert_gap_ms = (gap * 10.0).round() / 10.0;
                    }
                }
                self.last_heard = Some(now);
            } else {
                self.last_heard = None;
            }
        }
        let from = self.machine.state();
        let acts = self
            .machine
            .on_advert(Self::now(), ip.src, ad.priority, ad.interval_duration());
        self.perform(acts, from);
    }
}

impl Parts {
    /// Runs until `stop` turns true, then resigns (priority 0 if master), removes the
    /// addresses and runs the STOP notifications, and says true; abandoned, it ends as it
    /// is and says false. An error means a part of the instance died.
    async fn run(self, links: Links, control: Control) -> Result<bool, String> {
        let Control {
            mut stop,
            abandon,
            resume,
        } = control;
        let Links {
            mut penalty,
            vrrp_alive,
            keeper_alive,
            mut settings,
            ..
        } = links;
        settings.borrow_and_update();
        let mut settings_open = true;
        let Parts {
            mut inst,
            receiver,
            mut events,
            mut reports,
            mut links,
            mut holder_task,
            mut notify_task,
            mut poll_task,
        } = self;
        // A crashed agent may have left the addresses: nobody holds them before the election.
        // Resuming, they are ours, and their lifetime is running out.
        if !resume {
            inst.release(Duration::from_secs(2)).await;
        }

        if inst.link_usable {
            let from = inst.machine.state();
            let acts = if resume {
                log::info!("VRRP: resuming as master (the agent re-executed itself)");
                inst.machine.resume_master(Instance::now())
            } else {
                inst.machine.start(Instance::now())
            };
            inst.perform(acts, from);
        } else {
            log::warn!(
                "VRRP: interface {} is down at start: fault",
                inst.cfg.interface
            );
            inst.enter_fault(FaultCause::LinkDown);
        }
        let p = *penalty.borrow_and_update();
        inst.apply_penalty(p);
        let far = || Instant::now() + Duration::from_secs(3600);
        let mut packets: Vec<Vec<u8>> = Vec::new();
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let mut tracking_open = true;
        let result = loop {
            vrrp_alive.beat();
            fail::fail_point!("vrrp-loop", |_| Err(
                "injected failure (failpoint vrrp-loop)".to_string()
            ));
            let deadline = inst
                .machine
                .deadline()
                .map(Instant::from_std)
                .unwrap_or_else(far);
            let retry = inst.fault_retry;
            tokio::select! {
                biased;
                _ = stop.changed() => break Ok(()),
                r = receiver.recv_all(|p| packets.push(p.to_vec())) => {
                    if let Err(e) = r {
                        log::warn!("VRRP: receiving: {e}");
                    }
                    for p in packets.drain(..) {
                        inst.on_packet(&p);
                    }
                }
                _ = sleep_until(deadline) => {
                    let from = inst.machine.state();
                    let acts = inst.machine.tick(Instance::now());
                    inst.perform(acts, from);
                }
                r = penalty.changed(), if tracking_open => {
                    // The keeper ending is the supervisor's business (it stops us in order);
                    // keep the last penalty until then.
                    if r.is_err() {
                        tracking_open = false;
                        continue;
                    }
                    let p = *penalty.borrow_and_update();
                    inst.apply_penalty(p);
                }
                r = settings.changed(), if settings_open => {
                    if r.is_err() {
                        settings_open = false;
                        continue;
                    }
                    let new = settings.borrow_and_update().clone();
                    inst.reconfigure(new);
                }
                _ = beat.tick() => inst.check_keeper(&keeper_alive),
                ev = events.next() => match ev {
                    None => break Err("the netlink event stream ended".into()),
                    Some(Event::Link { index, link }) if index == inst.ifindex => {
                        inst.link_changed(link.is_some_and(|l| l.usable()));
                    }
                    Some(Event::AddressRemoved(a)) if a.index == inst.ifindex => {
                        inst.command(Command::Removed(a));
                    }
                    Some(_) => {}
                },
                Some((usable, read_at)) = links.recv() => {
                    // A reading taken before the last event is older news than the event.
                    if read_at > inst.last_link_event {
                        inst.link_changed(usable);
                    }
                }
                Some(report) = reports.recv() => match report {
                    Report::HoldFailed(why) => {
                        if inst.machine.state() == State::Master {
                            inst.hold_failed(why);
                        } else {
                            log::warn!("VRRP: {why}");
                        }
                    }
                    Report::Held => inst.held(),
                },
                _ = sleep_until(retry.unwrap_or_else(far)), if retry.is_some() => {
                    inst.fault_retry = None;
                    if inst.link_usable
                        && inst.machine.state() == State::Fault
                        && matches!(inst.fault, Some(FaultCause::Addresses(_)))
                    {
                        log::info!(
                            "VRRP: trying the virtual addresses again, as backup; preempting again in {}s",
                            inst.fault_backoff.as_secs()
                        );
                        // Preempting at once would hand the VIP back and forth on every retry
                        // of a lasting fault; after a quiet spell that doubles each time, it
                        // costs at most one round trip a minute.
                        inst.preempt_back = Some(Instant::now() + inst.fault_backoff);
                        inst.leave_fault();
                    }
                }
                _ = sleep_until(inst.preempt_back.unwrap_or_else(far)), if inst.preempt_back.is_some() => {
                    inst.preempt_back = None;
                    inst.machine.set_preempt(inst.cfg.preempt);
                }
                r = &mut holder_task => break Err(format!("the address holder ended: {}", join_word(r))),
                r = &mut notify_task => break Err(format!("the notify runner ended: {}", join_word(r))),
                r = &mut poll_task => break Err(format!("the link poller ended: {}", join_word(r))),
            }
        };
        // A part died: the supervisor gives up the VIP with sockets of its own.
        result?;
        if abandon.load(Ordering::SeqCst) {
            log::info!(
                "VRRP: handing over to the next agent as {} (no resignation; the addresses stay)",
                state_word(inst.machine.state())
            );
            return Ok(false);
        }
        let from = inst.machine.state();
        let prio = inst.effective_priority();
        let acts = inst.machine.shutdown(Instance::now());
        if from == State::Master {
            log::info!("VRRP: resigning: priority 0 advert, removing the virtual addresses");
        }
        inst.perform(acts, from);
        if !inst.release(Duration::from_secs(2)).await {
            log::warn!(
                "VRRP: removing the virtual addresses took more than 2s; their lifetime ends them"
            );
        }
        if let Some(n) = inst.notify.take() {
            let _ = n.send((NotifyState::Stop, prio, inst.cfg.notify.clone()));
        }
        if tokio::time::timeout(Duration::from_secs(2), &mut notify_task)
            .await
            .is_err()
        {
            log::warn!("VRRP: notify scripts still running at exit");
        }
        st_init(&inst.status);
        Ok(true)
    }
}

fn st_init(status: &Shared) {
    let mut st = lock(status);
    st.state = "init".into();
    st.master = None;
}

fn join_word(r: Result<(), tokio::task::JoinError>) -> String {
    match r {
        Ok(()) => "returned".into(),
        Err(e) if e.is_panic() => format!("panicked: {}", panic_message(&*e.into_panic())),
        Err(e) => e.to_string(),
    }
}

/// Reads the link now and then and reports changes: a backstop for link events lost when
/// the netlink event socket overflows.
async fn poll_link(nl: Netlink, ifindex: u32, mut last: bool, tx: mpsc::Sender<(bool, Instant)>) {
    let mut tick = tokio::time::interval(LINK_POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read_at = Instant::now();
        let usable = match nl.link(ifindex).await {
            Ok(l) => l.usable(),
            Err(e) if e.errno() == Some(libc::ENODEV) => false,
            Err(e) => {
                log::warn!("VRRP: reading link {ifindex}: {e}");
                continue;
            }
        };
        if usable != last {
            last = usable;
            if tx.send((usable, read_at)).await.is_err() {
                return;
            }
        }
    }
}

fn version_of(cfg: &VrrpConfig) -> Version {
    if cfg.version == 2 {
        Version::V2
    } else {
        Version::V3
    }
}

/// The advert `cfg`'s instance sends with `priority`.
fn advert(cfg: &VrrpConfig, priority: u8) -> Advert {
    let version = version_of(cfg);
    Advert {
        version,
        vrid: cfg.virtual_router_id,
        priority,
        interval: version.interval_field(cfg.advert_interval),
        addresses: cfg.virtual_addresses.iter().map(|(a, _)| *a).collect(),
        auth_pass: cfg.auth_pass.as_deref().map(packet::pass_bytes),
    }
}

/// Where adverts go: the unicast peers, or the VRRP multicast group.
fn destinations(cfg: &VrrpConfig) -> Vec<Ipv4Addr> {
    if cfg.unicast_peers.is_empty() {
        vec![VRRP_MCAST]
    } else {
        cfg.unicast_peers.clone()
    }
}

/// Gives up the VIP for an instance whose thread died: a priority 0 advert if it held or may
/// have held the addresses, then the addresses removed. Runs on the caller's runtime with
/// fresh sockets, since the instance's own are gone.
pub async fn resign_after_failure(
    cfg: &VrrpConfig,
    ifindex: u32,
    primary: Ipv4Addr,
    status: &Shared,
    nl: &Netlink,
) {
    let was_master = lock(status).state == "master";
    let present: Vec<_> = match nl.addresses(ifindex).await {
        Ok(a) => a
            .into_iter()
            .filter(|a| cfg.virtual_addresses.iter().any(|(v, _)| *v == a.addr))
            .collect(),
        Err(e) => {
            log::error!("VRRP: listing addresses on {}: {e}", cfg.interface);
            Vec::new()
        }
    };
    let owner = cfg.priority == state::PRIORITY_OWNER;
    if was_master || !present.is_empty() {
        let ad = advert(cfg, state::PRIORITY_STOP);
        match socket::Sender::open(&cfg.interface, ifindex, primary) {
            Ok(s) => {
                for dst in destinations(cfg) {
                    match s.send(&ad.encode(primary, dst), dst) {
                        Ok(()) => log::warn!(
                            "VRRP: sent a priority 0 advert to {dst}: the backup takes over now"
                        ),
                        Err(e) => log::error!("VRRP: priority 0 advert to {dst}: {e}"),
                    }
                }
            }
            Err(e) => log::error!("VRRP: opening a socket for the priority 0 advert: {e}"),
        }
    }
    if !owner {
        for a in present {
            match nl.del_address(ifindex, a.addr, a.prefix).await {
                Ok(()) => log::warn!(
                    "VRRP: removed {}/{} from {}",
                    a.addr,
                    a.prefix,
                    cfg.interface
                ),
                Err(e) => log::error!("VRRP: {e} (its lifetime ends it within 2s)"),
            }
        }
    }
    st_init(status);
}

/// For priority 255: every virtual address must already be the interface's own (permanent)
/// address; returns the first that is not.
/// True when every virtual address of `cfg` is on interface `ifindex` with a lifetime: an
/// agent of this host held them as master until less than a lifetime ago and died without
/// resigning (an orderly end removes them; an operator's or an owner's are permanent).
pub async fn left_by_a_master(
    cfg: &VrrpConfig,
    ifindex: u32,
    nl: &Netlink,
) -> Result<bool, netlink::NetlinkError> {
    let present = nl.addresses(ifindex).await?;
    Ok(!cfg.virtual_addresses.is_empty()
        && cfg
            .virtual_addresses
            .iter()
            .all(|(v, _)| present.iter().any(|a| a.addr == *v && !a.permanent)))
}

pub async fn unowned_address(
    cfg: &VrrpConfig,
    ifindex: u32,
    nl: &Netlink,
) -> Result<Option<(Ipv4Addr, u8)>, netlink::NetlinkError> {
    let present = nl.addresses(ifindex).await?;
    Ok(cfg
        .virtual_addresses
        .iter()
        .find(|(v, _)| !present.iter().any(|a| a.addr == *v && a.permanent))
        .copied())
}
