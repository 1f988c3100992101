//! VRRP (v2 RFC 3768 / v3 RFC 5798) so the VIP moves to the standby LB when the master
//! fails. `packet` and `state` are pure; this module owns the sockets, the timers, the
//! virtual addresses (rtnetlink), gratuitous ARPs and the notify command.

pub mod packet;
pub mod state;

use std::{
    collections::BTreeMap,
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::watch,
    time::{sleep_until, Instant},
};

use crate::{config::VrrpConfig, netlink};
use packet::{Advert, Expect, Version, VRRP_MCAST, VRRP_PROTO, VRRP_TTL};
use state::{Action, Machine, Params, State};

/// What `lb-agent status` shows of VRRP.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VrrpStatus {
    /// "master", "backup", "init" or "fault".
    pub state: String,
    pub version: u8,
    pub virtual_router_id: u8,
    pub base_priority: u8,
    pub effective_priority: u8,
    /// The current master's address, as far as we know.
    pub master: Option<String>,
    pub advert_interval_ms: u64,
    pub addresses: Vec<String>,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Rejected packets by reason.
    pub bad_packets: BTreeMap<String, u64>,
    /// "backup -> master" and when (Unix time, with milliseconds).
    pub last_transition: Option<String>,
    pub last_transition_unix: Option<f64>,
}

/// Shared between the VRRP task and the control socket.
pub type Shared = Arc<Mutex<VrrpStatus>>;

fn state_word(s: State) -> &'static str {
    match s {
        State::Init => "init",
        State::Backup => "backup",
        State::Master => "master",
        State::Fault => "fault",
    }
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: `v` is a valid T for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            v as *const T as *const libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn raw_socket(ifname: &str) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); ownership passes to OwnedFd at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            VRRP_PROTO as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: the name buffer outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr() as *const libc::c_void,
            name.as_bytes_with_nul().len() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn mreqn(group: Ipv4Addr, ifindex: u32) -> libc::ip_mreqn {
    libc::ip_mreqn {
        imr_multiaddr: libc::in_addr {
            s_addr: u32::from(group).to_be(),
        },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: ifindex as i32,
    }
}

/// The VRRP instance: sockets, machine, addresses.
struct Instance {
    cfg: VrrpConfig,
    ifname: String,
    ifindex: u32,
    mac: [u8; 6],
    primary: Ipv4Addr,
    version: Version,
    expect: Expect,
    /// Receiving socket (its readiness is awaited by `run`).
    recv: OwnedFd,
    send: OwnedFd,
    machine: Machine,
    status: Shared,
    /// When the second round of gratuitous ARPs is due.
    garp_again: Option<Instant>,
}

impl Instance {
    fn new(cfg: VrrpConfig, ifindex: u32, primary: Ipv4Addr, status: Shared) -> io::Result<Self> {
        let ifname = cfg.interface.clone();
        let (mac, _) = netlink::link_info(&ifname)?;
        let version = if cfg.version == 2 {
            Version::V2
        } else {
            Version::V3
        };
        let multicast = cfg.unicast_peers.is_empty();

        // Receiving: unbound (a bound raw socket only sees packets for its address, and
        // multicast adverts are for 224.0.0.18).
        let recv = raw_socket(&ifname)?;
        if multicast {
            setsockopt(
                recv.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_ADD_MEMBERSHIP,
                &mreqn(VRRP_MCAST, ifindex),
            )?;
        }
        // Sending: bound to our address, TTL 255 (receivers check it), no loop back.
        let send = raw_socket(&ifname)?;
        let fd = send.as_raw_fd();
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &(VRRP_TTL as i32))?;
        setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_TTL,
            &(VRRP_TTL as i32),
        )?;
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, &0i32)?;
        setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &mreqn(Ipv4Addr::UNSPECIFIED, ifindex),
        )?;
        // Internetwork control, as keepalived sends.
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TOS, &0xc0i32)?;
        let sa = sockaddr(primary);
        // SAFETY: sa is a valid sockaddr_in.
        let rc = unsafe {
            libc::bind(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }

        let machine = Machine::new(Params {
            vrid: cfg.virtual_router_id,
            priority: cfg.priority,
            advert_interval: cfg.advert_interval,
            preempt: cfg.preempt,
            preempt_delay: cfg.preempt_delay,
            primary,
        });
        let expect = Expect {
            version,
            vrid: cfg.virtual_router_id,
            interval: version.interval_field(cfg.advert_interval),
            auth_pass: cfg.auth_pass.as_deref().map(packet::pass_bytes),
            multicast,
        };
        {
            let mut st = status.lock().unwrap();
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
        }
        Ok(Self {
            cfg,
            ifname,
            ifindex,
            mac,
            primary,
            version,
            expect,
            recv,
            send,
            machine,
            status,
            garp_again: None,
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
        let ad = Advert {
            version: self.version,
            vrid: self.cfg.virtual_router_id,
            priority,
            interval: self.version.interval_field(self.cfg.advert_interval),
            addresses: self.cfg.virtual_addresses.iter().map(|(a, _)| *a).collect(),
            auth_pass: self.expect.auth_pass,
        };
        let dsts: Vec<Ipv4Addr> = if self.cfg.unicast_peers.is_empty() {
            vec![VRRP_MCAST]
        } else {
            self.cfg.unicast_peers.clone()
        };
        for dst in dsts {
            let payload = ad.encode(self.primary, dst);
            let sa = sockaddr(dst);
            // SAFETY: payload and sa outlive the call.
            let rc = unsafe {
                libc::sendto(
                    self.send.as_raw_fd(),
                    payload.as_ptr() as *const libc::c_void,
                    payload.len(),
                    0,
                    &sa as *const _ as *const libc::sockaddr,
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if rc < 0 {
                log::warn!(
                    "VRRP: sending an advert to {dst}: {}",
                    io::Error::last_os_error()
                );
            } else {
                self.status.lock().unwrap().adverts_sent += 1;
            }
        }
    }

    fn garps(&self) {
        for (addr, _) in &self.cfg.virtual_addresses {
            for _ in 0..self.cfg.garp_count {
                if let Err(e) = netlink::send_garp(self.ifindex, self.mac, *addr) {
                    log::warn!("VRRP: gratuitous ARP for {addr} on {}: {e}", self.ifname);
                    break;
                }
            }
        }
    }

    fn add_addresses(&self) {
        for (addr, prefix) in &self.cfg.virtual_addresses {
            if let Err(e) = netlink::add_addr(self.ifindex, *addr, *prefix) {
                log::error!("VRRP: adding {addr}/{prefix} to {}: {e}", self.ifname);
            }
        }
    }

    /// Removes the virtual addresses (also the stale ones a crashed agent left).
    fn remove_addresses(&self) {
        let present = netlink::list_addrs(self.ifindex).unwrap_or_default();
        for (addr, prefix) in &self.cfg.virtual_addresses {
            for (a, p) in &present {
                if a == addr {
                    if let Err(e) = netlink::del_addr(self.ifindex, *a, *p) {
                        log::error!("VRRP: removing {a}/{p} from {}: {e}", self.ifname);
                    }
                }
            }
            let _ = prefix;
        }
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
        log::info!(
            "VRRP VRID {}: {} -> {} (priority {}, master {})",
            self.cfg.virtual_router_id,
            state_word(from),
            state_word(to),
            self.machine.priority(),
            self.machine
                .master_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "unknown".into())
        );
        {
            let mut st = self.status.lock().unwrap();
            st.last_transition = Some(format!("{} -> {}", state_word(from), state_word(to)));
            st.last_transition_unix = Some((now * 1000.0).round() / 1000.0);
        }
        if let Some(cmd) = &self.cfg.notify {
            let cmd = cmd.clone();
            let word = state_word(to);
            tokio::spawn(async move {
                match tokio::process::Command::new(&cmd).arg(word).status().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => log::warn!("VRRP notify {} {word}: {s}", cmd.display()),
                    Err(e) => log::warn!("VRRP notify {} {word}: {e}", cmd.display()),
                }
            });
        }
    }

    fn perform(&mut self, actions: Vec<Action>, from: State) {
        for a in actions {
            match a {
                Action::SendAdvert { priority } => self.send_advert(priority),
                Action::BecomeMaster => {
                    self.add_addresses();
                    self.garps();
                    // Repeated a few seconds later, as keepalived does, for switches and
                    // hosts that missed the first round.
                    self.garp_again = Some(Instant::now() + Duration::from_secs(5));
                }
                Action::BecomeBackup => {
                    self.garp_again = None;
                    self.remove_addresses();
                }
            }
        }
        self.transition(from);
        let mut st = self.status.lock().unwrap();
        st.state = state_word(self.machine.state()).into();
        st.effective_priority = self.machine.priority();
        st.master = self.machine.master_addr().map(|a| a.to_string());
    }

    /// Reads every queued packet and feeds the valid adverts to the machine.
    fn drain_socket(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.recv.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            let pkt = &buf[..n as usize];
            let ip = match packet::parse_ipv4(pkt) {
                Ok(ip) => ip,
                Err(e) => {
                    self.bump(e.reason());
                    continue;
                }
            };
            if ip.src == self.primary {
                continue;
            }
            if !self.expect.multicast && !self.cfg.unicast_peers.contains(&ip.src) {
                self.bump("unknown_peer");
                continue;
            }
            let (ad, _form) = match Advert::decode(ip.payload(pkt), ip.src, ip.dst) {
                Ok(a) => a,
                Err(e) => {
                    self.bump(e.reason());
                    continue;
                }
            };
            if let Err(reason) = packet::check(&ad, ip.ttl, &self.expect) {
                if reason != "other_vrid" {
                    self.bump(reason);
                }
                continue;
            }
            self.status.lock().unwrap().adverts_received += 1;
            let from = self.machine.state();
            let acts = self.machine.on_advert(
                Instant::now().into_std(),
                ip.src,
                ad.priority,
                ad.interval_duration(),
            );
            self.perform(acts, from);
        }
    }
}

/// Runs VRRP until `shutdown` turns true; then resigns (priority 0) and removes the
/// addresses. `penalty` is how much tracking lowers the priority right now.
pub async fn run(
    cfg: VrrpConfig,
    ifindex: u32,
    primary: Ipv4Addr,
    status: Shared,
    mut penalty: watch::Receiver<u8>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let base = cfg.priority;
    let mut inst = Instance::new(cfg, ifindex, primary, status)?;
    let dup = inst.recv.try_clone()?;
    // SAFETY: `dup` is an owned duplicate of the receive socket, open for as long as the
    // AsyncFd that now owns it.
    let readable = unsafe { AsyncFd::register(dup) }.map_err(io::Error::from)?;
    // A crashed agent may have left the addresses: nobody holds them before the election.
    inst.remove_addresses();
    let from = inst.machine.state();
    let start = Instant::now().into_std();
    let acts = inst.machine.start(start);
    inst.perform(acts, from);
    let apply_penalty = |inst: &mut Instance, p: u8| {
        let prio = if base == state::PRIORITY_OWNER {
            base
        } else {
            base.saturating_sub(p).max(1)
        };
        if prio != inst.machine.priority() {
            log::info!("VRRP: effective priority {prio} (base {base}, tracking -{p})");
            let from = inst.machine.state();
            let acts = inst.machine.set_priority(Instant::now().into_std(), prio);
            inst.perform(acts, from);
        }
    };
    let p = *penalty.borrow();
    apply_penalty(&mut inst, p);
    let mut link_check = tokio::time::interval(Duration::from_millis(250));
    loop {
        let deadline = inst
            .machine
            .deadline()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let garp_at = inst
            .garp_again
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            r = readable.readable() => {
                let mut guard = r?;
                let res = inst.drain_socket();
                guard.clear_ready();
                if let Err(e) = res {
                    log::warn!("VRRP: receiving: {e}");
                }
            }
            _ = sleep_until(deadline) => {
                let from = inst.machine.state();
                let acts = inst.machine.tick(Instant::now().into_std());
                inst.perform(acts, from);
            }
            _ = sleep_until(garp_at) => {
                inst.garp_again = None;
                if inst.machine.state() == State::Master {
                    inst.garps();
                }
            }
            _ = penalty.changed() => {
                let p = *penalty.borrow();
                apply_penalty(&mut inst, p);
            }
            _ = link_check.tick() => {
                let running = netlink::link_info(&inst.ifname).map(|(_, r)| r).unwrap_or(false);
                let from = inst.machine.state();
                if !running && from != State::Fault {
                    log::warn!("VRRP: interface {} is down: fault", inst.ifname);
                    let acts = inst.machine.fault(Instant::now().into_std());
                    inst.perform(acts, from);
                } else if running && from == State::Fault {
                    log::info!("VRRP: interface {} is up again", inst.ifname);
                    let acts = inst.machine.recover(Instant::now().into_std());
                    inst.perform(acts, from);
                }
            }
        }
    }
    let from = inst.machine.state();
    let acts = inst.machine.shutdown(Instant::now().into_std());
    inst.perform(acts, from);
    // Whatever the state was, nobody should find our addresses after we stop.
    inst.remove_addresses();
    Ok(())
}
