//! The VIP-path probe for DSR backends. The https probe reaches a backend at its own
//! address, which says nothing about whether it accepts packets for the VIP: a backend that
//! lost its VIP on lo (or its ipip decapsulation) after a reboot passes it and blackholes
//! every connection sent to it. This probe sends the backend, from the LB host, the SYN the
//! data plane would forward (dsr-l2: only the destination MAC is the backend's; dsr-ipip:
//! inside an outer IPv4 header to the backend) and waits for its answer from VIP:port.

use std::{
    fmt, io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use futures_util::TryStreamExt;
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute},
    AddressFamily,
};
use rtnetlink::RouteMessageBuilder;
use tokio::{io::unix::AsyncFd, time::Instant};

use crate::{
    config::Mode,
    netlink::NetlinkError,
    sock::{self, socket},
};

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// The probe SYN's TTL. A backend without the VIP that forwards packets (ip_forward=1)
/// would send the SYN on towards the VIP, maybe to this LB, whose data plane could pass it
/// to another backend whose SYN-ACK would then pass the probe: with TTL 1 such a backend
/// drops it (and says so with ICMP time exceeded) while local delivery is unaffected.
const INNER_TTL: u8 = 1;
/// The outer header's TTL, as the data plane's (lb-ebpf/src/dsr.rs).
const OUTER_TTL: u8 = 64;
/// The MSS the SYN offers: a plain Ethernet one, as most clients send.
const SYN_MSS: u16 = 1460;

/// How the data plane hands a DSR VIP's packets to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DsrMode {
    /// The packet unchanged but for the destination MAC (`mode = "dsr-l2"`).
    L2,
    /// The packet inside an outer IPv4 header to the backend (`mode = "dsr-ipip"`).
    Ipip,
}

impl DsrMode {
    /// The DSR mode of a VIP's configured mode; None for nat.
    pub fn of(mode: Mode) -> Option<Self> {
        match mode {
            Mode::Nat | Mode::Socket => None,
            Mode::DsrL2 => Some(DsrMode::L2),
            Mode::DsrIpip => Some(DsrMode::Ipip),
        }
    }

    /// The name the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            DsrMode::L2 => "dsr-l2",
            DsrMode::Ipip => "dsr-ipip",
        }
    }
}

impl fmt::Display for DsrMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One backend's VIP path as seen from the LB host: what `probe` sends, where, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPath {
    /// The LB interface the SYN leaves through (names it in errors).
    pub ifname: String,
    /// Its ifindex.
    pub ifindex: u32,
    /// Its MAC: the frame's source.
    pub lb_mac: [u8; 6],
    /// The LB's own address on it: the SYN's source, where the backend answers.
    pub lb_addr: Ipv4Addr,
    /// How the data plane forwards to the backend.
    pub mode: DsrMode,
    /// The VIP, the SYN's destination.
    pub vip: Ipv4Addr,
    /// The VIP's port.
    pub port: u16,
    /// The backend's own address (dsr-ipip's outer destination).
    pub backend: Ipv4Addr,
    /// The frame's destination: the backend's MAC for dsr-l2, the next hop's for dsr-ipip
    /// (`next_hop_mac` finds it).
    pub next_hop_mac: [u8; 6],
    /// dsr-ipip's outer source; the LB's own address is a good one.
    pub ipip_source: Ipv4Addr,
    /// How long to wait for the backend's answer.
    pub timeout: Duration,
}

/// What a probe is about, as every error names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The backend's own address.
    pub backend: Ipv4Addr,
    /// The VIP probed.
    pub vip: Ipv4Addr,
    /// The VIP's port.
    pub port: u16,
    /// The LB interface the probe left through.
    pub ifname: String,
    /// How the probe reached the backend.
    pub mode: DsrMode,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {} for VIP {}:{} ({} via {})",
            self.backend, self.vip, self.port, self.mode, self.ifname
        )
    }
}

/// Why the backend does not take connections for the VIP, or why the probe could not run.
#[derive(Debug, thiserror::Error)]
pub enum VipPathError {
    /// A RST from VIP:port: the backend holds the VIP, nothing listens on the port.
    #[error("{at}: the backend holds the VIP but refused port {} (RST): nothing listens on {}:{}", .at.port, .at.vip, .at.port)]
    Refused { at: Subject },
    /// No answer in time: the backend drops packets for the VIP.
    #[error("{at}: no answer from {}:{} within {timeout:?}: the backend does not accept traffic for the VIP (it has probably lost its DSR setup: run `lb-agent backend-setup --mode {} --vip {}` on it)", .at.vip, .at.port, .at.mode, .at.vip)]
    NoAnswer { at: Subject, timeout: Duration },
    /// An ICMP error about the probe SYN (`what` says which and what it means).
    #[error("{at}: {from} answered with ICMP {what}")]
    Icmp {
        at: Subject,
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        what: String,
    },
    /// A socket operation failed (privileges, the LB address not on this host...).
    #[error("{at}: {op}: {source}")]
    Io {
        at: Subject,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Why `next_hop_mac` found no MAC to send a backend's probe to.
#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    /// The route or neighbour lookup itself failed (no route: ENETUNREACH).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The kernel routes the backend through another interface than the probe's.
    #[error("backend {backend}: the route to it leaves through ifindex {oif:?}, not {ifname} (ifindex {ifindex})")]
    OtherInterface {
        backend: Ipv4Addr,
        ifname: String,
        ifindex: u32,
        oif: Option<u32>,
    },
    /// dsr-l2 keeps the IP destination (the VIP), so the backend must be on the LB's segment.
    #[error("backend {backend} is reached through gateway {gateway}, not on {ifname}'s segment: dsr-l2 needs backends on the LB's segment (dsr-ipip does not)")]
    NotOnLink {
        backend: Ipv4Addr,
        gateway: Ipv4Addr,
        ifname: String,
    },
    /// The kernel's neighbour table has no usable MAC for the next hop.
    #[error("no MAC known for {addr} on {ifname} (neighbour entry: {state}): the kernel has not resolved it; send it a packet or check that it is up")]
    NoNeighbour {
        addr: Ipv4Addr,
        ifname: String,
        state: String,
    },
}

fn netlink_error(op: String, e: rtnetlink::Error) -> NetlinkError {
    let source = match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    };
    NetlinkError { op, source }
}

/// Aborts the netlink connection's task however the lookup ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The MAC a probe of `backend` goes to out of `ifindex`, from the kernel's route and
/// neighbour tables: the backend's own for dsr-l2, the route's next hop's for dsr-ipip.
/// Must run inside a tokio runtime (it drives a netlink socket of its own).
pub async fn next_hop_mac(
    ifindex: u32,
    ifname: &str,
    mode: DsrMode,
    backend: Ipv4Addr,
) -> Result<[u8; 6], NextHopError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetlinkError {
        op: "open rtnetlink".into(),
        source,
    })?;
    let _conn = AbortOnDrop(tokio::spawn(conn));

    // A request with a destination is a lookup (`ip route get`), not a dump.
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(backend, 32)
        .build();
    let op = || format!("route to backend {backend}");
    let route = handle
        .route()
        .get(route)
        .execute()
        .try_next()
        .await
        .map_err(|e| netlink_error(op(), e))?
        .ok_or_else(|| NetlinkError {
            op: op(),
            source: io::Error::from_raw_os_error(libc::ENETUNREACH),
        })?;
    let (mut oif, mut gateway) = (None, None);
    for a in &route.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            _ => {}
        }
    }
    if oif != Some(ifindex) {
        return Err(NextHopError::OtherInterface {
            backend,
            ifname: ifname.into(),
            ifindex,
            oif,
        });
    }
    let hop = match (mode, gateway) {
        (DsrMode::L2, Some(gateway)) => {
            return Err(NextHopError::NotOnLink {
                backend,
                gateway,
                ifname: ifname.into(),
            })
        }
        (_, g) => g.unwrap_or(backend),
    };

    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("list neighbours".into(), e))?;
    let mut state = "none".to_string();
    for n in neighbours.iter().filter(|n| n.header.ifindex == ifindex) {
        let dst = n.attributes.iter().any(|a| {
            matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == hop)
        });
        if !dst {
            continue;
        }
        state = format!("{:?}", n.header.state).to_lowercase();
        // A stale entry's MAC is still the best guess (the kernel itself sends to it while
        // it re-checks); incomplete and failed ones have none.
        let usable = matches!(
            n.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(m);
                Some(mac)
            }
            _ => None,
        });
        if let (true, Some(mac)) = (usable, mac) {
            return Ok(mac);
        }
    }
    Err(NextHopError::NoNeighbour {
        addr: hop,
        ifname: ifname.into(),
        state,
    })
}

/// Sends `p`'s backend the SYN the data plane would forward and waits for its answer from
/// VIP:port: Ok(round trip) on a SYN-ACK (which is then reset), an error otherwise. Needs
/// CAP_NET_RAW and a tokio runtime; opens its own sockets, so probes may run side by side.
pub async fn probe(p: &VipPath) -> Result<Duration, VipPathError> {
    let at = p.subject();
    let fail = |op: &'static str| {
        let at = at.clone();
        move |source| VipPathError::Io { at, op, source }
    };
    // A TCP socket bound to LB_ADDR:0 takes an ephemeral port no other socket (and no
    // concurrent probe) holds while it lives, so answers can be told apart by port. It
    // never listens: the kernel answers the SYN-ACK with a RST of its own, which is fine
    // (the backend's half-open connection ends all the sooner).
    let (_reserved, sport) = reserve_port(p.lb_addr).map_err(fail("reserve a source port"))?;
    let isn = random_u32().map_err(fail("getrandom"))?;
    let expect = Expect {
        lb_addr: p.lb_addr,
        vip: p.vip,
        port: p.port,
        sport,
        isn,
        ipip: (p.mode == DsrMode::Ipip).then_some((p.ipip_source, p.backend)),
    };
    // Opened before the SYN leaves, so the answer cannot beat it.
    let rx = Receiver::open(&expect).map_err(fail("open the receiving packet socket"))?;
    let tx = Sender::open(p.ifindex, p.next_hop_mac).map_err(fail("open a packet socket"))?;
    let syn = p.frame(&tcp_segment(
        p.lb_addr,
        p.vip,
        sport,
        p.port,
        isn,
        0,
        TCP_SYN,
        Some(SYN_MSS),
    ));
    let start = Instant::now();
    tx.send(&syn).map_err(fail("send the SYN"))?;
    let answer = match tokio::time::timeout_at(start + p.timeout, rx.answer(&expect)).await {
        Ok(a) => a.map_err(fail("receive"))?,
        Err(_) => {
            return Err(VipPathError::NoAnswer {
                at,
                timeout: p.timeout,
            })
        }
    };
    let elapsed = start.elapsed();
    match answer {
        Answer::SynAck => {
            // The kernel's own RST may not come: it drops the SYN-ACK as a martian when
            // this host holds the VIP (a VRRP master), and a firewall may drop either.
            let rst = p.frame(&tcp_segment(
                p.lb_addr,
                p.vip,
                sport,
                p.port,
                isn.wrapping_add(1),
                0,
                TCP_RST,
                None,
            ));
            tx.send(&rst).map_err(fail("send the RST"))?;
            Ok(elapsed)
        }
        Answer::Rst => Err(VipPathError::Refused { at }),
        Answer::Icmp {
            from,
            icmp_type,
            code,
        } => Err(VipPathError::Icmp {
            at,
            from,
            icmp_type,
            code,
            what: icmp_text(icmp_type, code, p.mode),
        }),
    }
}

impl VipPath {
    /// What errors about this path name.
    pub fn subject(&self) -> Subject {
        Subject {
            backend: self.backend,
            vip: self.vip,
            port: self.port,
            ifname: self.ifname.clone(),
            mode: self.mode,
        }
    }

    /// The Ethernet frame carrying `tcp` from LB_ADDR to the VIP as the data plane would
    /// send it to the backend.
    fn frame(&self, tcp: &[u8]) -> Vec<u8> {
        let outer = self.mode == DsrMode::Ipip;
        let mut f = Vec::with_capacity(ETH_LEN + 2 * IP_LEN + tcp.len());
        f.extend_from_slice(&self.next_hop_mac);
        f.extend_from_slice(&self.lb_mac);
        f.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
        if outer {
            f.extend_from_slice(&ipv4_header(
                self.ipip_source,
                self.backend,
                IPPROTO_IPIP,
                IP_LEN + tcp.len(),
                OUTER_TTL,
            ));
        }
        f.extend_from_slice(&ipv4_header(
            self.lb_addr,
            self.vip,
            IPPROTO_TCP,
            tcp.len(),
            INNER_TTL,
        ));
        f.extend_from_slice(tcp);
        f
    }
}

/// What the ICMP error means for the probe.
fn icmp_text(icmp_type: u8, code: u8, mode: DsrMode) -> String {
    match (icmp_type, code) {
        (11, _) => "time exceeded: the host forwarded the packet for the VIP instead of \
                    accepting it, so it does not hold the VIP (run `lb-agent backend-setup` \
                    on the backend)"
            .into(),
        (3, 2) if mode == DsrMode::Ipip => "protocol unreachable: the backend does not \
                                            decapsulate IPv4-in-IPv4 (no ipip device or TC \
                                            decapsulator: run `lb-agent backend-setup \
                                            --mode dsr-ipip` on it)"
            .into(),
        (3, c) => {
            let name = match c {
                0 => "network unreachable",
                1 => "host unreachable",
                2 => "protocol unreachable",
                3 => "port unreachable",
                4 => "fragmentation needed",
                9 | 10 | 13 => "administratively prohibited",
                _ => "",
            };
            format!("destination unreachable (code {c}{}{name})", {
                if name.is_empty() {
                    ""
                } else {
                    ": "
                }
            })
        }
        (t, c) => format!("type {t} code {c}"),
    }
}

/// The internet checksum (RFC 1071) of `data` added to the partial sum `sum`.
fn checksum(data: &[u8], sum: u32) -> u16 {
    let mut s = sum as u64;
    for c in data.chunks(2) {
        s += u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]) as u64;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The partial sum of the TCP/UDP pseudo-header.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let word = |a: Ipv4Addr, i: usize| u16::from_be_bytes([a.octets()[i], a.octets()[i + 1]]);
    word(src, 0) as u32
        + word(src, 2) as u32
        + word(dst, 0) as u32
        + word(dst, 2) as u32
        + proto as u32
        + len as u32
}

/// An option-less IPv4 header with DF set and its checksum.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: usize, ttl: u8) -> [u8; 20] {
    let mut h = [0u8; IP_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IP_LEN + payload) as u16).to_be_bytes());
    h[6] = 0x40;
    h[8] = ttl;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// A TCP header (with an MSS option if given), checksummed for `src` -> `dst`.
#[allow(clippy::too_many_arguments)]
fn tcp_segment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    mss: Option<u16>,
) -> Vec<u8> {
    let len = if mss.is_some() { 24 } else { 20 };
    let mut t = vec![0u8; len];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((len / 4) as u8) << 4;
    t[13] = flags;
    // A SYN's window is not scaled; a RST's does not matter.
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    if let Some(mss) = mss {
        t[20..22].copy_from_slice(&[2, 4]);
        t[22..24].copy_from_slice(&mss.to_be_bytes());
    }
    let c = checksum(&t, pseudo_sum(src, dst, IPPROTO_TCP, len));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// What a probe waits for, from what it sent.
#[derive(Debug, Clone, Copy)]
struct Expect {
    lb_addr: Ipv4Addr,
    vip: Ipv4Addr,
    port: u16,
    sport: u16,
    isn: u32,
    /// dsr-ipip's outer (source, destination), which an ICMP error may quote.
    ipip: Option<(Ipv4Addr, Ipv4Addr)>,
}

/// The backend's answer to the probe SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    SynAck,
    Rst,
    Icmp {
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
    },
}

fn addr_at(b: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3])
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The header length of the IPv4 packet `b`, if it holds a whole header and `min` more bytes.
fn ip_hlen(b: &[u8], min: usize) -> Option<usize> {
    let hlen = ((*b.first()? & 0x0f) as usize) * 4;
    (b[0] >> 4 == 4 && hlen >= IP_LEN && b.len() >= hlen + min).then_some(hlen)
}

/// Sorts an IPv4 packet received on the LB host: the answer to the probe `e` describes, or
/// None for anything else.
fn classify(pkt: &[u8], e: &Expect) -> Option<Answer> {
    let hlen = ip_hlen(pkt, 8)?;
    if addr_at(pkt, 16) != e.lb_addr || u16_at(pkt, 6) & 0x3fff != 0 {
        return None;
    }
    match pkt[9] {
        IPPROTO_TCP => {
            let t = &pkt[hlen..];
            if t.len() < 20
                || addr_at(pkt, 12) != e.vip
                || u16_at(t, 0) != e.port
                || u16_at(t, 2) != e.sport
            {
                return None;
            }
            // Only an answer to this SYN acknowledges its ISN: a late answer to an earlier
            // probe that had the same port does not.
            let flags = t[13];
            if flags & TCP_ACK == 0 || u32_at(t, 8) != e.isn.wrapping_add(1) {
                return None;
            }
            if flags & TCP_RST != 0 {
                Some(Answer::Rst)
            } else if flags & (TCP_SYN | TCP_FIN) == TCP_SYN {
                Some(Answer::SynAck)
            } else {
                None
            }
        }
        IPPROTO_ICMP => {
            let icmp = &pkt[hlen..];
            if !matches!(icmp[0], 3 | 11) {
                return None;
            }
            // The quoted packet: ours, or for dsr-ipip the outer one around ours.
            let mut q = &icmp[8..];
            let mut qh = ip_hlen(q, 0)?;
            if let Some((outer_src, outer_dst)) = e.ipip {
                if q[9] == IPPROTO_IPIP
                    && addr_at(q, 12) == outer_src
                    && addr_at(q, 16) == outer_dst
                {
                    q = &q[qh..];
                    qh = ip_hlen(q, 0)?;
                }
            }
            // RFC 792 quotes at least 8 bytes past the header: ports and sequence number.
            let ours = q.len() >= qh + 8
                && q[9] == IPPROTO_TCP
                && addr_at(q, 12) == e.lb_addr
                && addr_at(q, 16) == e.vip
                && u16_at(q, qh) == e.sport
                && u16_at(q, qh + 2) == e.port
                && u32_at(q, qh + 4) == e.isn;
            ours.then_some(Answer::Icmp {
                from: addr_at(pkt, 12),
                icmp_type: icmp[0],
                code: icmp[1],
            })
        }
        _ => None,
    }
}

fn random_u32() -> io::Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: b is valid for its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes(b))
}

fn check(rc: i32) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A TCP socket bound to `addr` and a free ephemeral port, and that port.
fn reserve_port(addr: Ipv4Addr) -> io::Result<(OwnedFd, u16)> {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    let mut sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: sa is a valid sockaddr_in of `len` bytes for both calls.
    unsafe {
        check(libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            len,
        ))?;
        check(libc::getsockname(
            fd.as_raw_fd(),
            &mut sa as *mut _ as *mut libc::sockaddr,
            &mut len,
        ))?;
    }
    Ok((fd, u16::from_be(sa.sin_port)))
}

/// A send-only AF_PACKET socket: frames go out of one interface as they are.
struct Sender {
    fd: OwnedFd,
    sa: libc::sockaddr_ll,
}

impl Sender {
    fn open(ifindex: u32, dst_mac: [u8; 6]) -> io::Result<Self> {
        // Protocol 0: send only, nothing queues up to be read.
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, 0)?;
        let sa = crate::sock::packet_addr(ifindex, Some(dst_mac));
        Ok(Self { fd, sa })
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame and sa outlive the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &self.sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The receiving side: an AF_PACKET socket whose filter passes only the probe's possible
/// answers, so other traffic neither queues up nor wakes it. A packet socket rather than a
/// raw IP one because the latter sees packets only after the kernel routed them, and the
/// kernel drops the backend's answer (source: the VIP) as a martian when this host holds
/// the VIP itself, as the VRRP master does.
struct Receiver {
    fd: AsyncFd<OwnedFd>,
}

/// A classic BPF instruction.
fn insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The socket filter for `e`'s answers, run on the IPv4 packet (SOCK_DGRAM strips the link
/// header): TCP from VIP:port to LB_ADDR:sport, and ICMP to LB_ADDR (`classify` decides if
/// it is about the probe; ICMP errors are few).
fn filter(e: &Expect) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET, BPF_W,
    };
    const ACCEPT: u8 = 14;
    const DROP: u8 = 15;
    // Jump offsets count from the next instruction.
    let to = |target: u8, at: u8| target - at - 1;
    vec![
        /* 0 */ insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, 16),
        /* 1 */ insn(BPF_JMP | BPF_JEQ | BPF_K, 0, to(DROP, 1), e.lb_addr.into()),
        /* 2 */ insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 9),
        /* 3 */
        insn(
            BPF_JMP | BPF_JEQ | BPF_K,
            to(ACCEPT, 3),
            0,
            IPPROTO_ICMP as u32,
        ),
        /* 4 */
        insn(
            BPF_JMP | BPF_JEQ | BPF_K,
            0,
            to(DROP, 4),
            IPPROTO_TCP as u32,
        ),
        /* 5 */ insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, 12),
        /* 6 */ insn(BPF_JMP | BPF_JEQ | BPF_K, 0, to(DROP, 6), e.vip.into()),
        /* 7 */ insn(BPF_LD | BPF_H | BPF_ABS, 0, 0, 6),
        /* 8 */ insn(BPF_JMP | BPF_JSET | BPF_K, to(DROP, 8), 0, 0x1fff),
        /* 9 */ insn(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),
        /* 10 */ insn(BPF_LD | BPF_H | BPF_IND, 0, 0, 0),
        /* 11 */ insn(BPF_JMP | BPF_JEQ | BPF_K, 0, to(DROP, 11), e.port as u32),
        /* 12 */ insn(BPF_LD | BPF_H | BPF_IND, 0, 0, 2),
        /* 13 */ insn(BPF_JMP | BPF_JEQ | BPF_K, 0, to(DROP, 13), e.sport as u32),
        /* 14 */ insn(BPF_RET | BPF_K, 0, 0, 0xffff),
        /* 15 */ insn(BPF_RET | BPF_K, 0, 0, 0),
    ]
}

impl Receiver {
    /// Opens the socket; must be called inside a tokio runtime.
    fn open(e: &Expect) -> io::Result<Self> {
        // Protocol 0 until the filter is on: a socket bound to a protocol from the start
        // would queue unfiltered packets in between.
        let fd = socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0)?;
        let prog = filter(e);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: fprog and the program it points to outlive the call (the kernel copies).
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                &fprog as *const _ as *const libc::c_void,
                size_of::<libc::sock_fprog>() as u32,
            )
        })?;
        // Every interface: with dsr-ipip the answer need not come back the way the SYN left.
        let sa = crate::sock::packet_addr(0, None);
        // SAFETY: sa is a valid sockaddr_ll.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        })?;
        // SAFETY: `fd` is an owned, open socket that the AsyncFd owns from now on.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Reads packets until one is the answer `e` describes.
    async fn answer(&self, e: &Expect) -> io::Result<Answer> {
        // Room for what matters: an ICMP error quoting both headers of a dsr-ipip SYN.
        let mut buf = [0u8; 256];
        loop {
            let mut guard = self.fd.readable().await?;
            while let Some(n) = sock::recv_now(self.fd.get_ref(), &mut buf)? {
                if let Some(a) = classify(&buf[..n], e) {
                    return Ok(a);
                }
            }
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);

    fn path(mode: DsrMode) -> VipPath {
        VipPath {
            ifname: "eth0".into(),
            ifindex: 2,
            lb_mac: [2, 0, 0, 0, 0, 2],
            lb_addr: LB,
            mode,
            vip: VIP,
            port: 6443,
            backend: BACKEND,
            next_hop_mac: [2, 0, 0, 0, 0, 11],
            ipip_source: LB,
            timeout: Duration::from_millis(300),
        }
    }

    fn expect(ipip: bool) -> Expect {
        Expect {
            lb_addr: LB,
            vip: VIP,
            port: 6443,
            sport: 40000,
            isn: 0x1000_0000,
            ipip: ipip.then_some((LB, BACKEND)),
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ip_checksum_matches_a_known_header() {
        // The classic example (Wikipedia, "Internet checksum"): 0xb861.
        let h = hex("4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7");
        assert_eq!(checksum(&h, 0), 0xb861);
        let mut whole = h.clone();
        whole[10..12].copy_from_slice(&[0xb8, 0x61]);
        assert_eq!(checksum(&whole, 0), 0, "a checksummed header sums to zero");
        // Odd lengths pad with a zero byte.
        assert_eq!(checksum(&[0x12, 0x34, 0x56], 0), !0x6834);
    }

    #[test]
    fn tcp_checksum_matches_a_captured_syn() {
        // A SYN Linux sent from 10.0.0.1:55306 to 10.0.0.2:80, captured with tcpdump -xx
        // on the receiving veth (transmit checksum offload off on the sender): 0xc60f.
        let ip = hex("4500 003c 0a74 4000 4006 1c46 0a00 0001 0a00 0002");
        assert_eq!(checksum(&ip, 0), 0, "the captured IP header checks");
        let mut zeroed = ip.clone();
        zeroed[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(checksum(&zeroed, 0), 0x1c46);
        let tcp = hex("d80a 0050 520c 6021 0000 0000 a002 faf0 c60f 0000 \
             0204 05b4 0402 080a 11ce d6a3 0000 0000 0103 030a");
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let pseudo = pseudo_sum(src, dst, IPPROTO_TCP, tcp.len());
        assert_eq!(checksum(&tcp, pseudo), 0);
        let mut zeroed = tcp.clone();
        zeroed[16..18].copy_from_slice(&[0, 0]);
        assert_eq!(checksum(&zeroed, pseudo), 0xc60f);
    }

    #[test]
    fn built_headers_check() {
        let h = ipv4_header(LB, VIP, IPPROTO_TCP, 24, INNER_TTL);
        assert_eq!(checksum(&h, 0), 0);
        assert_eq!(u16_at(&h, 2), 44);
        assert_eq!((h[6], h[8], h[9]), (0x40, 1, 6), "DF, TTL 1, TCP");
        let t = tcp_segment(LB, VIP, 40000, 6443, 7, 0, TCP_SYN, Some(1460));
        assert_eq!(t.len(), 24);
        assert_eq!(checksum(&t, pseudo_sum(LB, VIP, IPPROTO_TCP, t.len())), 0);
        assert_eq!((t[12], t[13]), (0x60, TCP_SYN));
        assert_eq!(&t[20..24], &[2, 4, 0x05, 0xb4], "MSS 1460");
        let r = tcp_segment(LB, VIP, 40000, 6443, 8, 0, TCP_RST, None);
        assert_eq!(r.len(), 20);
        assert_eq!(checksum(&r, pseudo_sum(LB, VIP, IPPROTO_TCP, r.len())), 0);
    }

    #[test]
    fn dsr_l2_frames_keep_the_vip_and_go_to_the_backend_mac() {
        let p = path(DsrMode::L2);
        let tcp = tcp_segment(LB, VIP, 40000, 6443, 7, 0, TCP_SYN, Some(1460));
        let f = p.frame(&tcp);
        assert_eq!(&f[0..6], &p.next_hop_mac);
        assert_eq!(&f[6..12], &p.lb_mac);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[ETH_LEN..];
        assert_eq!((addr_at(ip, 12), addr_at(ip, 16), ip[9]), (LB, VIP, 6));
        assert_eq!(&ip[IP_LEN..], &tcp[..]);
        assert_eq!(f.len(), ETH_LEN + IP_LEN + 24);
    }

    #[test]
    fn dsr_ipip_frames_wrap_the_same_packet_for_the_backend() {
        let p = path(DsrMode::Ipip);
        let tcp = tcp_segment(LB, VIP, 40000, 6443, 7, 0, TCP_SYN, Some(1460));
        let f = p.frame(&tcp);
        let outer = &f[ETH_LEN..];
        assert_eq!(checksum(&outer[..IP_LEN], 0), 0);
        assert_eq!((addr_at(outer, 12), addr_at(outer, 16)), (LB, BACKEND));
        assert_eq!((outer[8], outer[9]), (OUTER_TTL, IPPROTO_IPIP));
        assert_eq!(u16_at(outer, 2) as usize, 2 * IP_LEN + 24);
        let l2 = path(DsrMode::L2).frame(&tcp);
        assert_eq!(&outer[IP_LEN..], &l2[ETH_LEN..], "the same inner packet");
    }

    /// The backend's answer: an IPv4 packet from VIP:6443 to LB:sport.
    fn answer(flags: u8, ack: u32, sport: u16) -> Vec<u8> {
        let mut t = tcp_segment(VIP, LB, 6443, sport, 99, ack, flags, None);
        t[13] = flags;
        let mut p = ipv4_header(VIP, LB, IPPROTO_TCP, t.len(), 64).to_vec();
        p.extend_from_slice(&t);
        p
    }

    #[test]
    fn answers_are_matched_by_port_and_sequence() {
        let e = expect(false);
        let ok = e.isn.wrapping_add(1);
        assert_eq!(
            classify(&answer(TCP_SYN | TCP_ACK, ok, 40000), &e),
            Some(Answer::SynAck)
        );
        assert_eq!(
            classify(&answer(TCP_RST | TCP_ACK, ok, 40000), &e),
            Some(Answer::Rst)
        );
        assert_eq!(classify(&answer(TCP_SYN | TCP_ACK, ok, 40001), &e), None);
        assert_eq!(
            classify(&answer(TCP_SYN | TCP_ACK, ok + 1, 40000), &e),
            None
        );
        assert_eq!(
            classify(&answer(TCP_RST, 0, 40000), &e),
            None,
            "a RST without ACK answers nothing of ours"
        );
        let mut other = answer(TCP_SYN | TCP_ACK, ok, 40000);
        other[12..16].copy_from_slice(&BACKEND.octets());
        assert_eq!(classify(&other, &e), None, "not from the VIP");
        assert_eq!(classify(&other[..30], &e), None, "truncated");
    }

    /// An ICMP error from `from` quoting `quoted`.
    fn icmp(from: Ipv4Addr, t: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
        let mut body = vec![t, code, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(quoted);
        let c = checksum(&body, 0);
        body[2..4].copy_from_slice(&c.to_be_bytes());
        let mut p = ipv4_header(from, LB, IPPROTO_ICMP, body.len(), 64).to_vec();
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn icmp_errors_about_the_syn_are_answers() {
        let e = expect(true);
        let syn = tcp_segment(LB, VIP, 40000, 6443, e.isn, 0, TCP_SYN, Some(1460));
        let mut p = path(DsrMode::Ipip);
        let f = p.frame(&syn);
        // Protocol unreachable quotes the outer packet.
        let got = classify(&icmp(BACKEND, 3, 2, &f[ETH_LEN..]), &e);
        assert_eq!(
            got,
            Some(Answer::Icmp {
                from: BACKEND,
                icmp_type: 3,
                code: 2
            })
        );
        // Time exceeded quotes the inner one (8 bytes of TCP are enough).
        p.mode = DsrMode::L2;
        let inner = &p.frame(&syn)[ETH_LEN..ETH_LEN + IP_LEN + 8];
        assert!(matches!(
            classify(&icmp(BACKEND, 11, 0, inner), &e),
            Some(Answer::Icmp { icmp_type: 11, .. })
        ));
        let other = tcp_segment(LB, VIP, 40001, 6443, e.isn, 0, TCP_SYN, None);
        let mut q = ipv4_header(LB, VIP, IPPROTO_TCP, 20, 1).to_vec();
        q.extend_from_slice(&other);
        assert_eq!(
            classify(&icmp(BACKEND, 11, 0, &q), &e),
            None,
            "another probe's"
        );
        assert_eq!(
            classify(&icmp(BACKEND, 0, 0, inner), &e),
            None,
            "an echo reply"
        );
    }

    #[test]
    fn the_filter_jumps_stay_inside_the_program() {
        let prog = filter(&expect(false));
        assert_eq!(prog.len(), 16);
        for (i, ins) in prog.iter().enumerate() {
            if ins.code & 0x07 == libc::BPF_JMP as u16 {
                assert!(i + 1 + (ins.jt.max(ins.jf) as usize) < prog.len());
            }
        }
        assert_eq!(prog[1].k, u32::from(LB));
        assert_eq!(prog[13].k, 40000);
    }

    #[test]
    fn errors_name_backend_vip_interface_and_what_to_do() {
        let at = path(DsrMode::L2).subject();
        let e = VipPathError::NoAnswer {
            at: at.clone(),
            timeout: Duration::from_millis(300),
        };
        let s = e.to_string();
        for want in [
            "198.18.0.11",
            "198.18.0.100:6443",
            "eth0",
            "backend-setup",
            "dsr-l2",
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
        let s = VipPathError::Refused { at }.to_string();
        assert!(s.contains("refused port 6443") && s.contains("eth0"), "{s}");
        assert!(icmp_text(3, 2, DsrMode::Ipip).contains("decapsulate"));
        assert_eq!(
            icmp_text(3, 1, DsrMode::L2),
            "destination unreachable (code 1: host unreachable)"
        );
    }
}
