//! Types, map names and sizes shared by the XDP program (lb-ebpf) and the agent (lb-agent).
//!
//! Everything here crosses the kernel boundary: `#[repr(C)]`, explicit padding, no bool, enum
//! or Option. Addresses and ports in keys and values are kept in network byte order (as they
//! sit in the packet) so the data plane never converts; the agent converts at its edge.
#![no_std]

/// Map names, as the XDP object declares them and as they are pinned under the pin path.
pub mod map {
    /// VipKey -> VipInfo.
    pub const VIPS: &str = "VIPS";
    /// Array of BackendInfo, indexed by global backend index.
    pub const BACKENDS: &str = "BACKENDS";
    /// Array of u32 backend indices: [vip][half][MAX_MAGLEV_SIZE].
    pub const MAGLEV: &str = "MAGLEV";
    /// LRU FlowKey (a packet's tuple as it arrives) -> Flow: established connections, one
    /// entry per direction (client -> VIP and backend -> SNAT address).
    pub const FLOWS: &str = "FLOWS";
    /// LRU FlowKey -> Flow like FLOWS, for connections whose backend has not yet answered
    /// past the handshake: a SYN flood fills this table and never evicts FLOWS.
    pub const HALF_OPEN: &str = "HALF_OPEN";
    /// LRU FlowKey (client -> VIP, as it arrives) -> Flow: connections of DSR VIPs, keeping
    /// each on its backend when the backend set changes. Apart from FLOWS because a DSR LB
    /// never sees the backend's answer: any client packet makes an entry, and a flood of
    /// them must not evict NAT connections.
    pub const DSR_FLOWS: &str = "DSR_FLOWS";
    /// Array of u32 over `addr_filter_index`: `addr_filter::*` bits where a VIP or SNAT
    /// address hashes, so traffic not for lb passes after one array read.
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    /// Hash ifindex -> VlanDev: the VLAN devices on the XDP interface, so a tagged frame
    /// leaves with the tag the FIB's egress device stands for.
    pub const VLAN_DEVS: &str = "VLAN_DEVS";
    /// Per-CPU array of TrafficStats, indexed by VIP index.
    pub const STATS_VIP: &str = "STATS_VIP";
    /// Per-CPU array of TrafficStats, indexed by backend index.
    pub const STATS_BACKEND: &str = "STATS_BACKEND";
    /// Per-CPU array of u64 packet counts, indexed by `reason::*`.
    pub const STATS_REASON: &str = "STATS_REASON";
    /// Array of VipMeta (names for status; never read by the data plane).
    pub const VIP_META: &str = "VIP_META";
    /// Array of BackendMeta (names and weights for status).
    pub const BACKEND_META: &str = "BACKEND_META";
    /// Array with one AgentMeta: how and where the program is attached.
    pub const AGENT_META: &str = "AGENT_META";
    /// LRU hash socket cookie -> SockRevNat: the VIP a socket-mode connect() asked for, so
    /// getpeername() reports it.
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// Program array PROG_LB tail-calls through (`tail::*`). Not in ALL: each loaded object
    /// has its own, pinned at PROGS_PIN while its program is attached.
    pub const PROGS: &str = "PROGS";
    /// Array of u64 per backend: the next SNAT port to try (a ring over the range).
    pub const SNAT_CURSOR: &str = "SNAT_CURSOR";
    /// Per-CPU array of one TickClock: the data plane's cache of the coarse clock. Not
    /// pinned and not in ALL: nothing outside the program reads it, and a new program
    /// starts with an empty cache.
    pub const CLOCK: &str = "CLOCK";
    /// Array of NextHop, indexed by backend index: the next hop towards each backend, so a
    /// new flow (a SYN) and the refresh of an established one copy it instead of asking the
    /// FIB. A cache the data plane fills itself; not pinned, not in ALL.
    pub const NEXT_HOP: &str = "NEXT_HOP";
    /// Ring buffer of DataplaneEvent: the rare events the agent logs (`event::emits`), at
    /// most one per reason per CPU per second. Pinned: a program left running after the
    /// agent ends goes on writing where the next agent reads.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of EventRate, indexed by reason: the events' rate limit. Not pinned.
    pub const EVENT_RATE: &str = "EVENT_RATE";

    /// Every map the agent pins, in the order status reads them.
    pub const ALL: [&str; 17] = [
        VIPS,
        BACKENDS,
        MAGLEV,
        FLOWS,
        HALF_OPEN,
        DSR_FLOWS,
        ADDR_FILTER,
        VLAN_DEVS,
        STATS_VIP,
        STATS_BACKEND,
        STATS_REASON,
        VIP_META,
        BACKEND_META,
        AGENT_META,
        SNAT_CURSOR,
        SOCK_REVNAT,
        EVENTS,
    ];
}

/// Data-plane events: a reason counter that moves is always counted; for the rare reasons
/// that need an operator (no SNAT port, no room in the flow table, no route, a SYN flood, a
/// missing program) the data plane also tells the agent, which logs it.
pub mod event {
    use super::reason;

    /// The reasons that are events.
    pub const REASONS: [u32; 6] = [
        reason::DROP_SNAT_EXHAUSTED,
        reason::DROP_FLOW_INSERT,
        reason::DROP_FIB_UNREACHABLE,
        reason::PASS_FIB_OTHER,
        reason::HALF_OPEN_RECYCLED,
        reason::DROP_TAIL_CALL,
    ];

    const MASK: u64 = {
        let mut m = 0u64;
        let mut i = 0;
        while i < REASONS.len() {
            m |= 1 << REASONS[i];
            i += 1;
        }
        m
    };

    /// True when reason `r` is an event. Constant-folded where `r` is a constant, so the
    /// call sites of other reasons (the healthy fast path) carry no trace of it.
    #[inline(always)]
    pub const fn emits(r: u32) -> bool {
        r < 64 && MASK & (1 << r) != 0
    }

    /// Nanoseconds between two events of one reason on one CPU.
    pub const INTERVAL_NS: u64 = 1_000_000_000;

    /// EVENTS' size in bytes (a power of two, a multiple of the page size).
    pub const RING_BYTES: u32 = 64 * 1024;
}

/// An element of EVENTS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneEvent {
    /// `reason::*`.
    pub reason: u32,
    /// The CPU it happened on.
    pub cpu: u32,
    /// Times it happened on that CPU since the previous event of the reason, unreported
    /// (the rate limit).
    pub suppressed: u64,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
}

/// An element of EVENT_RATE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    /// When the last event of the reason went out on this CPU (0: never).
    pub last_ns: u64,
    /// Occurrences since then.
    pub suppressed: u64,
}

/// Name of the load-balancing XDP program in the object.
pub const PROG_LB: &str = "lb_xdp";
/// Name of the trivial XDP_PASS program (benchmark floor; lab bridge ports need it).
pub const PROG_PASS: &str = "lb_xdp_pass";
/// Name of the TC program that strips dsr-ipip's outer header on backends without an ipip
/// device (`lb-agent backend-setup`).
pub const PROG_TC_DECAP: &str = "lb_tc_decap";
/// Name of the XDP program that handles a client packet without a flow (a SYN picks a
/// backend): PROG_LB tail-calls it through PROGS, so the verifier checks each alone.
pub const PROG_NEW_FLOW: &str = "lb_xdp_new_flow";
/// Name of the TC egress program that gives a local backend's replies the VIP's port back
/// when the VIP's port differs from the backend's (VIP:1644 -> :6443 on this host).
pub const PROG_TC_LOCAL: &str = "lb_tc_local";

/// Name of the cgroup connect4 program of socket-mode VIPs: a connect() to the VIP is
/// made to a backend Maglev picks.
pub const PROG_CONNECT4: &str = "lb_connect4";
/// Name of the cgroup getpeername4 program: a socket connect4 redirected reports the VIP
/// as its peer.
pub const PROG_GETPEERNAME4: &str = "lb_getpeername4";

/// Indices of the programs in the PROGS program array.
pub mod tail {
    /// PROG_NEW_FLOW.
    pub const NEW_FLOW: u32 = 0;
    /// Size of PROGS.
    pub const COUNT: u32 = 1;
}

/// Default directory under bpffs where the maps are pinned.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";
/// Name under the pin path of the XDP program's bpf_link: pinned, it keeps the program
/// attached when the agent's process ends without an orderly stop. Not a map, so not in
/// `map::ALL`.
pub const LINK_PIN: &str = "LINK";
/// Name under the pin path of the program array PROG_LB tail-calls through. Pinned because
/// the kernel empties a program array when no process or pin holds it, which would leave
/// a running program without its tail calls once the agent is gone. Never adopted: each
/// loaded object pins its own, since it holds that object's programs.
pub const PROGS_PIN: &str = "PROGS";
/// Names under the pin path of the cgroup links of the socket-mode hooks: pinned, they stay
/// attached (with the maps as the agent left them) when the agent's process ends.
pub const LINK_CONNECT4_PIN: &str = "LINK_CONNECT4";
pub const LINK_GETPEERNAME4_PIN: &str = "LINK_GETPEERNAME4";
/// Default path of the agent's control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb-agent.sock";
/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/lb/lb.toml";

/// Most VIPs one agent serves.
pub const MAX_VIPS: u32 = 16;
/// Most backends over all VIPs.
pub const MAX_BACKENDS: u32 = 1024;
/// Largest Maglev table (a prime); each VIP has two halves of this many slots.
pub const MAX_MAGLEV_SIZE: u32 = 65537;
/// Default Maglev table size (prime).
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// Default connections the flow table holds (`[agent] max_flows`); FLOWS has twice as many
/// entries, one per direction.
pub const MAX_FLOWS: u32 = 262_144;
/// Entries in HALF_OPEN (two per half-open connection): what a SYN flood can occupy.
pub const MAX_HALF_OPEN: u32 = 65_536;
/// Entries in SOCK_REVNAT: sockets of socket-mode VIPs the hooks remember.
pub const MAX_SOCK_REVNAT: u32 = 65_536;
/// Entries in ADDR_FILTER (a power of two).
pub const ADDR_FILTER_SIZE: u32 = 4096;
/// Most VLAN devices on the XDP interface that VLAN_DEVS describes.
pub const MAX_VLAN_DEVS: u32 = 256;

/// Length of the name fields in VipMeta and BackendMeta.
pub const NAME_LEN: usize = 64;
/// Value in a MAGLEV slot when no backend can take the flow.
pub const NO_BACKEND: u32 = u32::MAX;
/// How many SNAT ports a new flow tries before it is dropped as "SNAT ports exhausted".
pub const SNAT_TRIES: u32 = 8;
/// A closed flow's SNAT port is reused only after this long without packets (ns): longer
/// than TCP's minimum retransmission timeout (200 ms), so a backend whose last FIN or ACK
/// was lost has retransmitted it before its tuple carries a new SYN. It also caps new
/// connections per backend at the SNAT range per this time (4536 ports: 18,000/s); at 1 s
/// the lab's close-mode benchmark ran into that cap (SYNs dropped for want of a port).
pub const SNAT_CLOSED_REUSE_NS: u64 = 250_000_000;
/// A flow idle this long may lose its SNAT port to a new flow (ns).
pub const SNAT_IDLE_REUSE_NS: u64 = 600 * 1_000_000_000;

/// ADDR_FILTER slot of an address (network byte order, as in the packet): a multiplicative
/// hash, so addresses of one subnet spread.
#[inline(always)]
pub const fn addr_filter_index(addr: u32) -> u32 {
    addr.wrapping_mul(0x9e37_79b1) >> (32 - ADDR_FILTER_SIZE.trailing_zeros())
}

/// Bits of an ADDR_FILTER slot.
pub mod addr_filter {
    /// A VIP or SNAT address hashes here.
    pub const LB: u32 = 1;
    /// A DSR VIP's address, or a NAT VIP's with a backend on this host, hashes here: its
    /// packets are looked up in DSR_FLOWS first.
    pub const DSR: u32 = 2;
    /// A VIP's address whose local backend listens on another port hashes here: TC egress
    /// looks replies from it up in DSR_FLOWS.
    pub const LOCAL_PORT: u32 = 4;
}

/// Bits of `BackendInfo::flags`.
pub mod backend_info_flags {
    /// The backend's address is one of this host's: its connections pass to the local
    /// stack instead of being NATed.
    pub const LOCAL: u8 = 1;
}

/// Index of the MAGLEV slot for `vip`, table `half` (0/1) and position `pos`.
#[inline(always)]
pub const fn maglev_index(vip: u32, half: u32, pos: u32) -> u32 {
    (vip * 2 + half) * MAX_MAGLEV_SIZE + pos
}

/// IP protocol numbers we serve.
pub const IPPROTO_TCP: u8 = 6;

/// Forwarding modes (VipInfo.mode).
pub mod mode {
    /// Full NAT: source and destination rewritten both ways.
    pub const NAT: u32 = 0;
    /// Direct server return on the LB's L2 segment: only the destination MAC changes.
    pub const DSR_L2: u32 = 1;
    /// Direct server return through an IPv4-in-IPv4 tunnel to the backend's address.
    pub const DSR_IPIP: u32 = 2;
    /// Node-local: cgroup hooks connect the host's own sockets straight to a backend; the
    /// XDP program ignores the VIP.
    pub const SOCKET: u32 = 3;

    /// The config's name of mode `m`.
    pub const fn name(m: u32) -> &'static str {
        match m {
            NAT => "nat",
            DSR_L2 => "dsr-l2",
            DSR_IPIP => "dsr-ipip",
            SOCKET => "socket",
            _ => "unknown",
        }
    }
}

/// Backend states (BackendInfo.state).
pub mod state {
    /// The slot holds no backend.
    pub const UNUSED: u8 = 0;
    /// In the Maglev table, takes new flows.
    pub const UP: u8 = 1;
    /// Out of the table; its flows are re-picked.
    pub const DOWN: u8 = 2;
    /// Out of the table; its flows stay until they end.
    pub const DRAIN: u8 = 3;
    /// Failing health probes but answering (not ready, e.g. an apiserver shutting down
    /// gracefully): out of the table, flows kept like a drain.
    pub const UNREADY: u8 = 4;

    /// The word status prints for a state.
    pub const fn name(s: u8) -> &'static str {
        match s {
            UP => "up",
            DOWN | UNREADY => "down",
            DRAIN => "drain",
            _ => "unused",
        }
    }
}

/// `BackendMeta::in_use` bits: what the agent knows of a backend beyond its state, kept in
/// the maps so an agent that adopts them (a restart, a crash) knows it too.
pub mod backend_flags {
    /// The slot holds a backend.
    pub const IN_USE: u32 = 1;
    /// Drained by the operator (`lb-agent drain`).
    pub const DRAINED: u32 = 2;
    /// Taken out of the config by a reload, kept until its connections end.
    pub const REMOVED: u32 = 4;
}

/// Flow.flags bits. The data plane only sets them with an atomic or: both directions of a
/// connection run on different CPUs at once.
pub mod flow_flags {
    /// The client sent FIN.
    pub const FIN_CLIENT: u32 = 1;
    /// The backend sent FIN.
    pub const FIN_BACKEND: u32 = 2;
    /// Either side sent RST.
    pub const RST: u32 = 4;
    /// This entry is the backend -> client direction.
    pub const REPLY: u32 = 8;
    /// The backend answered past the handshake (the entry lives in FLOWS).
    pub const ESTABLISHED: u32 = 16;
    /// The next hop cached in the entry is valid.
    pub const NEXT_HOP: u32 = 32;
    /// A DSR_FLOWS entry of a dsr-ipip VIP: `src_addr` is the outer source address.
    pub const IPIP: u32 = 64;
    /// A DSR_FLOWS entry of a dsr-l2 VIP: its backend must be on the LB's segment.
    pub const DSR_L2: u32 = 128;
    /// A DSR_FLOWS entry of a NAT VIP's connection to a backend on this host: its packets
    /// pass to the local stack, only the port rewritten. With REPLY: the entry TC egress
    /// finds a reply under, holding the VIP's port.
    pub const LOCAL: u32 = 256;
}

/// Element of NEXT_HOP: the FIB's answer for packets towards one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The backend's address the answer is for (network byte order): a backend index
    /// reused for another backend never gets the old one's next hop.
    pub addr: u32,
    pub ifindex: u32,
    /// The route's MTU.
    pub mtu: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// When the FIB was asked (coarse clock); 0: never.
    pub refreshed_ns: u64,
}

/// The data plane's per-CPU cache of the coarse clock (map CLOCK): the coarse clock only
/// moves on a tick, when jiffies moves, and jiffies costs one load where the clock is a
/// helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TickClock {
    pub jiffies: u64,
    pub ns: u64,
}

/// XDP attach modes (AgentMeta.xdp_mode).
pub mod xdp_mode {
    /// Not attached.
    pub const NONE: u32 = 0;
    /// Native (driver) mode.
    pub const NATIVE: u32 = 1;
    /// Generic (skb) mode.
    pub const GENERIC: u32 = 2;

    /// The word status prints for a mode.
    pub const fn name(m: u32) -> &'static str {
        match m {
            NATIVE => "native",
            GENERIC => "generic",
            _ => "none",
        }
    }
}

/// Why a packet was passed, dropped or sent: one per-CPU counter each (STATS_REASON).
pub mod reason {
    /// Not IPv4 (ARP, IPv6, LLDP...): passed.
    pub const PASS_NOT_IPV4: u32 = 0;
    /// IPv4 not for a VIP nor a reply to a NAT flow: passed.
    pub const PASS_NOT_OURS: u32 = 1;
    /// Frame too short for the headers it announces: passed untouched.
    pub const PASS_TRUNCATED: u32 = 2;
    /// A first fragment (MF set) for a VIP or of a backend's reply: dropped (see
    /// docs/architecture.md).
    pub const DROP_FRAGMENT: u32 = 3;
    /// VIP packet with IP options: forwarded, options kept (a count, not a drop).
    pub const IP_OPTIONS: u32 = 4;
    /// New flow for a VIP with no backend in its table: dropped.
    pub const DROP_NO_BACKEND: u32 = 5;
    /// No free SNAT port after SNAT_TRIES attempts: dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 6;
    /// RST for a VIP with no flow: dropped, creates nothing.
    pub const DROP_RST_NO_FLOW: u32 = 7;
    /// Rewritten, next hop's MAC unknown: passed to the kernel to resolve it.
    pub const PASS_NO_NEIGH: u32 = 8;
    /// Rewritten, the FIB's egress is not the XDP interface nor a VLAN on it, or a route
    /// the FIB does not resolve: passed to the kernel, which forwards it.
    pub const PASS_FIB_OTHER: u32 = 9;
    /// Rewritten, route is blackhole/unreachable/prohibit: dropped.
    pub const DROP_FIB_UNREACHABLE: u32 = 10;
    /// A flow table insert failed: dropped.
    pub const DROP_FLOW_INSERT: u32 = 11;
    /// Sent back out of the ingress interface (XDP_TX).
    pub const TX: u32 = 12;
    /// Sent back out of the ingress interface with its VLAN tag changed to the egress VLAN.
    pub const TX_VLAN: u32 = 13;
    /// A client packet of a flow whose backend is down: the flow is removed and the client
    /// reset, so it reconnects at once to a live backend.
    pub const RST_BACKEND_DOWN: u32 = 14;
    /// A non-TCP packet for a VIP address and port: passed.
    pub const PASS_NOT_TCP: u32 = 15;
    /// A VIP or reply packet in a frame addressed to another host's MAC: passed.
    pub const PASS_OTHER_HOST: u32 = 16;
    /// A client packet with ACK and no flow (an ACK flood, or a connection of an LB that
    /// failed over): answered with a RST, no state created.
    pub const RST_NO_FLOW: u32 = 17;
    /// A client packet without SYN, ACK or RST and no flow: dropped, no state created.
    pub const DROP_NO_FLOW: u32 = 18;
    /// A later fragment (no TCP header) to a VIP or SNAT address: passed to the kernel.
    pub const PASS_FRAGMENT: u32 = 19;
    /// A half-open flow's SNAT port taken by a new SYN (ports short, a SYN flood).
    pub const HALF_OPEN_RECYCLED: u32 = 20;
    /// A half-open flow moved to FLOWS: its backend answered past the handshake.
    pub const ESTABLISHED: u32 = 21;
    /// Rewritten, the packet is larger than the egress MTU: an ICMP "fragmentation needed"
    /// went back to its sender instead.
    pub const ICMP_FRAG_NEEDED_SENT: u32 = 22;
    /// An ICMP error about a NAT flow, translated and sent on.
    pub const ICMP_TRANSLATED: u32 = 23;
    /// An ICMP message to a VIP or SNAT address that is about no flow: passed.
    pub const PASS_ICMP: u32 = 24;
    /// A SYN or SYN-ACK whose MSS option was lowered to the VIP's `mss_clamp` (a count, not
    /// a drop: a SYN dropped afterwards, e.g. for want of a backend, is counted too).
    pub const MSS_CLAMPED: u32 = 25;
    /// A DSR packet whose backend the FIB reaches through a gateway (dsr-l2 needs the
    /// backend on the LB's segment): dropped.
    pub const DROP_DSR_NOT_ON_LINK: u32 = 26;
    /// A DSR packet whose egress is not the interface it came in on (or a VLAN on it), or
    /// whose encapsulation failed: dropped, as the kernel would deliver it to the VIP
    /// address it holds.
    pub const DROP_DSR_EGRESS: u32 = 27;
    /// A dsr-ipip packet too large for the egress MTU with its outer header, without DF or
    /// with IP options: dropped (otherwise the sender gets "fragmentation needed").
    pub const DROP_DSR_TOO_BIG: u32 = 28;
    /// A client packet of a DSR VIP without a flow that is not a SYN (a connection an LB
    /// that failed over or restarted served): sent to the backend Maglev picks.
    pub const DSR_ADOPTED: u32 = 29;
    /// A DSR packet whose backend's (or gateway's) MAC the FIB does not know: dropped,
    /// since the kernel would deliver it to the VIP address it holds. The health probes
    /// keep the backends' neighbour entries fresh.
    pub const DROP_DSR_NO_NEIGH: u32 = 30;
    /// A packet that needed the new-flow program when PROGS did not hold it: dropped.
    pub const DROP_TAIL_CALL: u32 = 31;
    /// A client packet for a backend on this host: passed to the local stack with the
    /// backend's port.
    pub const LOCAL: u32 = 32;
    /// A local backend's reply given the VIP's port back (TC egress).
    pub const LOCAL_REPLY: u32 = 33;
    /// A client packet without a flow, not a SYN, that Maglev sends to a local backend
    /// (a connection this host served before its flow entry was lost): delivered.
    pub const LOCAL_ADOPTED: u32 = 34;
    /// A connect() to a socket-mode VIP made to a backend.
    pub const SOCK_CONNECT: u32 = 35;
    /// A connect() to a socket-mode VIP without a backend up: failed with ECONNREFUSED.
    pub const SOCK_REFUSED: u32 = 36;
    /// A connect() to a socket-mode VIP from another network namespace than the agent's
    /// (a pod's own loopback): left alone.
    pub const SOCK_OTHER_NETNS: u32 = 37;
    /// Number of reasons.
    pub const COUNT: u32 = 38;

    /// Names as status prints them, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ipv4",
        "pass_not_ours",
        "pass_truncated",
        "drop_fragment",
        "ip_options",
        "drop_no_backend",
        "drop_snat_exhausted",
        "drop_rst_no_flow",
        "pass_no_neigh",
        "pass_fib_other",
        "drop_fib_unreachable",
        "drop_flow_insert",
        "tx",
        "tx_vlan",
        "rst_backend_down",
        "pass_not_tcp",
        "pass_other_host",
        "rst_no_flow",
        "drop_no_flow",
        "pass_fragment",
        "half_open_recycled",
        "established",
        "icmp_frag_needed_sent",
        "icmp_translated",
        "pass_icmp",
        "mss_clamped",
        "drop_dsr_not_on_link",
        "drop_dsr_egress",
        "drop_dsr_too_big",
        "dsr_adopted",
        "drop_dsr_no_neigh",
        "drop_tail_call",
        "local",
        "local_reply",
        "local_adopted",
        "sock_connect",
        "sock_refused",
        "sock_other_netns",
    ];
}

/// Element of SOCK_REVNAT: what a socket-mode connect() asked for and where it went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    /// Network byte order.
    pub vip_addr: u32,
    /// Network byte order.
    pub backend_addr: u32,
    /// Network byte order.
    pub vip_port: u16,
    /// Network byte order.
    pub backend_port: u16,
}

/// Key of VIPS: the VIP as it appears as destination of a client packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of VIPS: how to serve one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into VIP_META, STATS_VIP and MAGLEV.
    pub index: u32,
    /// `mode::*`.
    pub mode: u32,
    /// Source address of packets to backends; network byte order.
    pub snat_addr: u32,
    /// First SNAT port, host byte order.
    pub snat_port_min: u16,
    /// Last SNAT port (inclusive), host byte order.
    pub snat_port_max: u16,
    /// Maglev table size M (prime, <= MAX_MAGLEV_SIZE).
    pub table_size: u32,
    /// Which half of the Maglev double buffer is live (0/1); flipped by rewriting this value.
    pub active_half: u32,
    /// Largest MSS a SYN or SYN-ACK of this VIP may announce, host byte order; 0: no clamp.
    pub mss_clamp: u16,
    pub _pad: u16,
    /// dsr-ipip: the outer source address of a flow is `encap_src | (hash & encap_src_mask)`
    /// (network byte order), so the backend's NIC spreads flows over its queues.
    pub encap_src: u32,
    /// dsr-ipip: the host bits of `encap_src` a flow's hash fills (network byte order).
    pub encap_src_mask: u32,
}

/// Element of BACKENDS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// `state::*`.
    pub state: u8,
    /// `backend_info_flags::*`.
    pub flags: u8,
    /// Index of the VIP this backend serves.
    pub vip: u32,
}

/// A TCP/UDP 5-tuple as seen in a packet (key of FLOWS and HALF_OPEN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network byte order.
    pub src_addr: u32,
    /// Network byte order.
    pub dst_addr: u32,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// A TCP key; addresses and ports in network byte order.
    ///
    /// Built from four words: built field by field, the zero fill of the 3-byte padding
    /// becomes a memset subprogram call in BPF, paid by every packet.
    #[inline(always)]
    pub const fn tcp(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16) -> Self {
        #[repr(C)]
        struct Words {
            src_addr: u32,
            dst_addr: u32,
            src_port: u16,
            dst_port: u16,
            proto: u32,
        }
        let w = Words {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto: u32::from_ne_bytes([IPPROTO_TCP, 0, 0, 0]),
        };
        // SAFETY: same size, both repr(C) with the same offsets, every bit pattern valid.
        unsafe { core::mem::transmute::<Words, FlowKey>(w) }
    }
}

/// Value of FLOWS and HALF_OPEN: the ready-made rewrite for a packet arriving with the
/// key's tuple, and its next hop. The two entries of a connection mirror each other: the
/// key of one is the rewritten tuple of the other, reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// New source address, network byte order.
    pub src_addr: u32,
    /// New destination address, network byte order.
    pub dst_addr: u32,
    /// New source port, network byte order.
    pub src_port: u16,
    /// New destination port, network byte order.
    pub dst_port: u16,
    /// Backend index.
    pub backend: u32,
    /// VIP index.
    pub vip: u32,
    /// `flow_flags::*`, set with atomic or only.
    pub flags: u32,
    /// Added to the TSval (client -> backend) or the TSecr (backend -> client) of the TCP
    /// timestamp option (0: none). See the flow module of lb-ebpf.
    pub ts_delta: u32,
    /// Egress interface of the cached next hop (flag NEXT_HOP).
    pub ifindex: u32,
    /// Next hop's MAC.
    pub dmac: [u8; 6],
    /// Egress interface's MAC.
    pub smac: [u8; 6],
    /// MTU of the cached egress interface: a larger packet gets "fragmentation needed".
    pub mtu: u32,
    /// bpf_ktime_get_coarse_ns of the last packet, refreshed at most every 100 ms.
    pub last_seen_ns: u64,
    /// When the next hop was looked up.
    pub next_hop_ns: u64,
}

impl Flow {
    /// True once both sides sent FIN, or either sent RST.
    #[inline(always)]
    pub const fn closed(flags: u32) -> bool {
        flags & flow_flags::RST != 0
            || flags & (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
                == (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
    }

    /// True when the connection is over at `now` (the coarse monotonic clock, ns): closed
    /// and quiet for SNAT_CLOSED_REUSE_NS, or idle for SNAT_IDLE_REUSE_NS. The data plane
    /// then gives its SNAT port to a new connection; the agent stops counting it.
    #[inline(always)]
    pub const fn over(&self, now: u64) -> bool {
        let idle = now.wrapping_sub(self.last_seen_ns);
        (Self::closed(self.flags) && idle > SNAT_CLOSED_REUSE_NS) || idle > SNAT_IDLE_REUSE_NS
    }

    /// The key of the other direction's entry.
    #[inline(always)]
    pub const fn peer_key(&self) -> FlowKey {
        FlowKey::tcp(self.dst_addr, self.src_addr, self.dst_port, self.src_port)
    }
}

/// Element of VLAN_DEVS: a VLAN device stacked on the XDP interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VlanDev {
    /// Its lower device's ifindex.
    pub parent: u32,
    /// VLAN id, network byte order (as in the tag's TCI, priority bits clear).
    pub vid: u16,
    pub _pad: u16,
}

/// Per-CPU traffic counters of a VIP or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Packets client -> backend.
    pub packets: u64,
    /// Bytes (L3) client -> backend.
    pub bytes: u64,
    /// Flows created (a re-picked flow counts for its new backend).
    pub new_flows: u64,
    /// Packets backend -> client.
    pub reply_packets: u64,
    /// Bytes (L3) backend -> client.
    pub reply_bytes: u64,
}

/// Element of VIP_META: what status shows and the data plane never reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipMeta {
    /// NUL-padded UTF-8 name.
    pub name: [u8; NAME_LEN],
    /// 1 when the slot holds a VIP.
    pub in_use: u32,
    pub _pad: u32,
}

impl Default for VipMeta {
    fn default() -> Self {
        Self {
            name: [0; NAME_LEN],
            in_use: 0,
            _pad: 0,
        }
    }
}

/// Element of BACKEND_META.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendMeta {
    /// NUL-padded UTF-8 name.
    pub name: [u8; NAME_LEN],
    /// Configured weight (0 = drain).
    pub weight: u32,
    /// `backend_flags::*`; 0 when the slot is free.
    pub in_use: u32,
}

impl Default for BackendMeta {
    fn default() -> Self {
        Self {
            name: [0; NAME_LEN],
            weight: 0,
            in_use: 0,
        }
    }
}

/// Version of the pinned maps' layout, written to `AgentMeta::layout_version` when the agent
/// loads the data plane. Bump it with any change a running program and a newer agent would
/// disagree on: a pinned map's key or value type (fields, order, size), its type or size, or
/// the set of pinned maps (`map::ALL`). A change to an unpinned map alone needs no bump. A new
/// agent adopts a running data plane only at the same version: it compares the maps' sizes
/// too, but a field whose meaning changes at the same size only the version tells.
pub const MAP_LAYOUT_VERSION: u32 = 4;

/// The single element of AGENT_META.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentMeta {
    /// `xdp_mode::*`.
    pub xdp_mode: u32,
    /// Interface the program is attached to.
    pub ifindex: u32,
    /// Agent's process id.
    pub pid: u32,
    /// `MAP_LAYOUT_VERSION` of the agent that loaded the pinned maps. Stays at offset 12 in
    /// every layout (it was padding before versioning, so older pins read 0), so any lb-agent
    /// can tell which layout a running data plane has.
    pub layout_version: u32,
    /// Wall-clock start time, Unix seconds.
    pub started_unix: u64,
    /// The interface's MAC: frames for other hosts (flooded by a switch or bridge, or seen
    /// in promiscuous mode) are left to the kernel, which drops them. Zero: no check.
    pub mac: [u8; 6],
    pub _pad2: [u8; 2],
    /// The network namespace whose sockets the socket-mode hooks serve (its cookie): the
    /// agent's. A cgroup holds processes of many namespaces, and a pod's 127.0.0.1 is its
    /// own. Zero: every namespace.
    pub netns_cookie: u64,
}

/// Copies `s` into a NUL-padded name field, truncating at NAME_LEN bytes.
pub fn name_bytes(s: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let b = s.as_bytes();
    let n = if b.len() < NAME_LEN {
        b.len()
    } else {
        NAME_LEN
    };
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// A NUL-padded name from a map, as text (the inverse of `name_bytes`).
#[cfg(feature = "user")]
pub fn name_str(b: &[u8]) -> alloc::string::String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    alloc::string::String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(feature = "user")]
extern crate alloc;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for SockRevNat {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for VlanDev {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for BackendMeta {}
    unsafe impl aya::Pod for AgentMeta {}
    unsafe impl aya::Pod for DataplaneEvent {}
    unsafe impl aya::Pod for EventRate {}
}

// Layouts are part of the kernel ABI between the two sides: pin them.
const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 8);
    assert!(core::mem::size_of::<VipInfo>() == 36);
    assert!(core::mem::size_of::<BackendInfo>() == 12);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<Flow>() == 64);
    assert!(core::mem::size_of::<VlanDev>() == 8);
    assert!(core::mem::size_of::<TrafficStats>() == 40);
    assert!(core::mem::size_of::<VipMeta>() == NAME_LEN + 8);
    assert!(core::mem::size_of::<BackendMeta>() == NAME_LEN + 8);
    assert!(core::mem::size_of::<AgentMeta>() == 40);
    assert!(core::mem::size_of::<DataplaneEvent>() == 24);
    assert!(core::mem::size_of::<EventRate>() == 16);
    // Where every lb-agent looks for the layout version: it must never move.
    assert!(core::mem::offset_of!(AgentMeta, layout_version) == 12);
    assert!(MAX_VIPS * 2 * MAX_MAGLEV_SIZE < u32::MAX);
};
