//! The VIP-path probe (lb_agent::health::vip_path) between two namespaces joined by a
//! veth: an LB side and a DSR backend, set up right, without its VIP, without a listener,
//! forwarding instead of accepting, and without ipip decapsulation.
//!
//! A dsr-ipip backend that answers is not covered: this kernel has no ipip device
//! (CONFIG_NET_IPIP is off) and the TC decapsulator lives on another branch.

use std::{future::Future, net::Ipv4Addr, net::TcpListener, net::UdpSocket, time::Duration};

use lb_agent::health::vip_path::{self, DsrMode, NextHopError, VipPath, VipPathError};
use lb_tests::{
    netns::{require_root, unique_id, Netns},
    vrrp_lab::poll_until,
};

const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PORT: u16 = 6443;
const TIMEOUT: Duration = Duration::from_millis(300);

/// Two namespaces and the veth between them; both go when it drops.
struct Pair {
    // Dropped before `lb`: deleting either namespace removes the veth.
    backend: Netns,
    lb: Netns,
    lb_if: String,
    backend_if: String,
}

impl Pair {
    fn new() -> Self {
        let id = unique_id();
        let lb = Netns::new(&format!("vpl{id}"));
        let backend = Netns::new(&format!("vpb{id}"));
        let (lb_if, backend_if) = (format!("vpl{id}"), format!("vpb{id}"));
        lb.sh(&format!(
            "ip link add {lb_if} type veth peer name {backend_if} netns {}",
            backend.name
        ));
        lb.sh(&format!(
            "ip addr add {LB}/24 dev {lb_if} && ip link set {lb_if} up"
        ));
        // Receive checksum offload off: the backend's kernel checks the probe's checksums
        // rather than trusting the veth.
        backend.sh(&format!(
            "ip addr add {BACKEND}/24 dev {backend_if} && ip link set {backend_if} up && \
             ethtool -K {backend_if} rx off >/dev/null"
        ));
        Self {
            backend,
            lb,
            lb_if,
            backend_if,
        }
    }

    /// The backend as `lb-agent backend-setup --mode dsr-l2` leaves it: VIP on lo, ARP for
    /// it neither answered nor used as a source.
    fn vip_on_lo(&self) {
        self.backend.sh(&format!(
            "ip addr add {VIP}/32 dev lo && sysctl -qw net.ipv4.conf.all.arp_ignore=1 \
             net.ipv4.conf.all.arp_announce=2"
        ));
    }

    /// A listener on 0.0.0.0:PORT in the backend; it never accepts (the kernel answers
    /// SYNs by itself), and closes when dropped.
    fn listen(&self) -> TcpListener {
        let _in = self.backend.enter();
        TcpListener::bind(("0.0.0.0", PORT)).expect("listen in the backend")
    }

    fn mac(ns: &Netns, dev: &str) -> [u8; 6] {
        let s = ns.sh(&format!("cat /sys/class/net/{dev}/address"));
        let b: Vec<u8> = s
            .trim()
            .split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect();
        b.try_into().expect("a 6-byte MAC")
    }

    /// Runs `f` on a fresh runtime in the LB's namespace.
    fn in_lb<T>(&self, f: impl Future<Output = T>) -> T {
        let _in = self.lb.enter();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// The next hop's MAC as the agent would find it: after the kernel resolved it.
    fn resolved_mac(&self, mode: DsrMode) -> [u8; 6] {
        let ifindex = self.lb.ifindex(&self.lb_if);
        let mut mac = None;
        let found = poll_until(Duration::from_secs(3), || {
            {
                let _in = self.lb.enter();
                // Any packet makes the kernel resolve the address.
                let s = UdpSocket::bind((LB, 0)).unwrap();
                let _ = s.send_to(b"x", (BACKEND, 9));
            }
            mac = self
                .in_lb(vip_path::next_hop_mac(ifindex, &self.lb_if, mode, BACKEND))
                .ok();
            mac.is_some()
        });
        assert!(found.is_some(), "the backend's MAC never resolved");
        mac.unwrap()
    }

    fn path(&self, mode: DsrMode) -> VipPath {
        VipPath {
            ifname: self.lb_if.clone(),
            ifindex: self.lb.ifindex(&self.lb_if),
            lb_mac: Self::mac(&self.lb, &self.lb_if),
            lb_addr: LB,
            mode,
            vip: VIP,
            port: PORT,
            backend: BACKEND,
            next_hop_mac: self.resolved_mac(mode),
            ipip_source: LB,
            timeout: TIMEOUT,
        }
    }

    fn probe(&self, p: &VipPath) -> Result<Duration, VipPathError> {
        let r = self.in_lb(vip_path::probe(p));
        match &r {
            Ok(rtt) => eprintln!("probe ok in {rtt:?}"),
            Err(e) => eprintln!("probe failed: {e}"),
        }
        r
    }
}

#[test]
fn next_hop_mac_is_the_resolved_backend_mac_and_unknown_says_so() {
    if !require_root("next_hop_mac_is_the_resolved_backend_mac_and_unknown_says_so") {
        return;
    }
    let pair = Pair::new();
    let ifindex = pair.lb.ifindex(&pair.lb_if);
    let e = pair
        .in_lb(vip_path::next_hop_mac(
            ifindex,
            &pair.lb_if,
            DsrMode::L2,
            BACKEND,
        ))
        .expect_err("nothing resolved the backend yet");
    assert!(matches!(e, NextHopError::NoNeighbour { .. }), "{e}");
    let s = e.to_string();
    assert!(s.contains("198.18.0.11") && s.contains(&pair.lb_if), "{s}");

    let mac = pair.resolved_mac(DsrMode::L2);
    assert_eq!(mac, Pair::mac(&pair.backend, &pair.backend_if));

    // A backend behind a router is no dsr-l2 backend.
    pair.lb
        .sh(&format!("ip route add 203.0.113.0/24 via {BACKEND}"));
    let far = Ipv4Addr::new(203, 0, 113, 5);
    let e = pair
        .in_lb(vip_path::next_hop_mac(
            ifindex,
            &pair.lb_if,
            DsrMode::L2,
            far,
        ))
        .expect_err("not on the segment");
    assert!(matches!(e, NextHopError::NotOnLink { .. }), "{e}");
    // dsr-ipip goes to the router's MAC.
    let mac = pair
        .in_lb(vip_path::next_hop_mac(
            ifindex,
            &pair.lb_if,
            DsrMode::Ipip,
            far,
        ))
        .expect("the gateway is resolved");
    assert_eq!(mac, Pair::mac(&pair.backend, &pair.backend_if));
}

#[test]
fn dsr_l2_backend_with_the_vip_answers_and_is_reset() {
    if !require_root("dsr_l2_backend_with_the_vip_answers_and_is_reset") {
        return;
    }
    let pair = Pair::new();
    pair.vip_on_lo();
    let _listener = pair.listen();
    // The LB's kernel answers the SYN-ACK with a RST of its own; drop those so that the
    // backend's half-open connection can only end by the probe's RST.
    pair.lb.sh("nft add table inet vp && \
         nft add chain inet vp out '{ type filter hook output priority 0; }' && \
         nft add rule inet vp out tcp flags rst drop");
    let p = pair.path(DsrMode::L2);
    for _ in 0..3 {
        let rtt = pair.probe(&p).expect("the backend accepts the VIP");
        assert!(rtt < TIMEOUT);
    }
    let half_open = pair.backend.sh("ss -Htn state syn-recv");
    assert_eq!(half_open.trim(), "", "the probe reset its connections");

    // The VRRP master holds the VIP itself: the answer from the VIP still counts.
    pair.lb
        .sh(&format!("ip addr add {VIP}/32 dev {}", pair.lb_if));
    pair.probe(&p)
        .expect("the answer is seen even though this host holds the VIP");
}

#[test]
fn dsr_l2_backend_without_the_vip_does_not_answer() {
    if !require_root("dsr_l2_backend_without_the_vip_does_not_answer") {
        return;
    }
    let pair = Pair::new();
    let _listener = pair.listen();
    let p = pair.path(DsrMode::L2);
    let start = std::time::Instant::now();
    let e = pair.probe(&p).expect_err("no VIP, no answer");
    assert!(start.elapsed() < TIMEOUT + Duration::from_millis(200));
    assert!(matches!(e, VipPathError::NoAnswer { .. }), "{e}");
    let s = e.to_string();
    for want in [
        "198.18.0.11",
        "198.18.0.100:6443",
        pair.lb_if.as_str(),
        "backend-setup",
    ] {
        assert!(s.contains(want), "{want} in {s}");
    }
}

#[test]
fn dsr_l2_backend_that_forwards_the_vip_is_told_apart() {
    if !require_root("dsr_l2_backend_that_forwards_the_vip_is_told_apart") {
        return;
    }
    let pair = Pair::new();
    // Forwarding on and no VIP: the SYN would go on to whoever has the VIP; its TTL of 1
    // ends it at the backend.
    pair.backend.sh("sysctl -qw net.ipv4.ip_forward=1");
    let p = pair.path(DsrMode::L2);
    let e = pair.probe(&p).expect_err("forwarded, not accepted");
    match &e {
        VipPathError::Icmp {
            from, icmp_type, ..
        } => assert_eq!((*from, *icmp_type), (BACKEND, 11), "{e}"),
        other => panic!("want ICMP time exceeded, got: {other}"),
    }
    assert!(e.to_string().contains("does not hold the VIP"), "{e}");
}

#[test]
fn dsr_l2_backend_with_the_vip_but_no_listener_refuses_the_port() {
    if !require_root("dsr_l2_backend_with_the_vip_but_no_listener_refuses_the_port") {
        return;
    }
    let pair = Pair::new();
    pair.vip_on_lo();
    let p = pair.path(DsrMode::L2);
    let e = pair.probe(&p).expect_err("nothing listens");
    assert!(matches!(e, VipPathError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("refused port 6443"), "{e}");
}

#[test]
fn dsr_ipip_backend_without_decapsulation_fails() {
    if !require_root("dsr_ipip_backend_without_decapsulation_fails") {
        return;
    }
    let pair = Pair::new();
    pair.vip_on_lo();
    let _listener = pair.listen();
    let p = pair.path(DsrMode::Ipip);
    // The VIP on lo is not enough: the backend gets IPv4-in-IPv4 it cannot open.
    let e = pair.probe(&p).expect_err("no ipip decapsulation here");
    eprintln!("{e:?}");
    match &e {
        VipPathError::Icmp { from, .. } => assert_eq!(*from, BACKEND),
        VipPathError::NoAnswer { .. } => {}
        other => panic!("want no answer or an ICMP error: {other}"),
    }
}
