//! Data plane tests: crafted frames fed to the XDP program through BPF_PROG_TEST_RUN, in a
//! private network namespace whose dummy interface has a route and static neighbours, so
//! the program's FIB lookup succeeds exactly as it would on an LB host.

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    config::{AgentConfig, BackendConfig, Config, Mode, Protocol, VipConfig, XdpModeSetting},
    dataplane::{
        loader::Dataplane,
        pinned::PinnedMaps,
        writer::{self, VipPlan, Writer},
    },
};
use lb_common::{reason, state};
use lb_tests::{
    netns::{self, Netns},
    packet::{self, Frame, Parsed, TcpFlags},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];
const BACKENDS: [(Ipv4Addr, [u8; 6]); 3] = [
    (Ipv4Addr::new(198, 18, 0, 11), [0x02, 0, 0, 0, 0, 0x11]),
    (Ipv4Addr::new(198, 18, 0, 12), [0x02, 0, 0, 0, 0, 0x12]),
    (Ipv4Addr::new(198, 18, 0, 13), [0x02, 0, 0, 0, 0, 0x13]),
];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The program loaded and configured inside a namespace of its own.
struct Fixture {
    ns: Netns,
    dp: Dataplane,
    writer: Writer,
    vips: Vec<VipPlan>,
    ifindex: u32,
}

fn config(pin: &std::path::Path) -> Config {
    Config {
        path: "test.toml".into(),
        agent: AgentConfig {
            interface: "d0".into(),
            xdp_mode: XdpModeSetting::Auto,
            pin_path: pin.to_path_buf(),
            control_socket: "/nonexistent".into(),
        },
        vips: vec![VipConfig {
            name: "kube-apiserver".into(),
            address: VIP,
            port: 6443,
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            snat_address: Some(LB_ADDR),
            snat_ports: (61000, 65535),
            maglev_table_size: 65537,
            backends: BACKENDS
                .iter()
                .enumerate()
                .map(|(i, (a, _))| BackendConfig {
                    name: format!("master0{}", i + 1),
                    address: *a,
                    port: 6443,
                    weight: 100,
                })
                .collect(),
            health: Default::default(),
        }],
    }
}

impl Fixture {
    /// None when the test cannot run here (not root, outside CI).
    fn new(tag: &str) -> Option<Self> {
        if !netns::require_root(tag) {
            return None;
        }
        let ns = Netns::new(&format!("lbt-{tag}-{}", netns::unique_id()));
        ns.sh(&format!(
            "ip link add d0 address {} type veth peer name d1 && ip link set d1 up && ip link set d0 up && \
             ip addr add {LB_ADDR}/24 dev d0 && \
             sysctl -qw net.ipv4.conf.d0.forwarding=1 && \
             ip neigh replace {CLIENT} lladdr {} dev d0 nud permanent",
            packet::mac_str(&LB_MAC),
            packet::mac_str(&CLIENT_MAC)
        ));
        for (a, m) in BACKENDS {
            ns.sh(&format!(
                "ip neigh replace {a} lladdr {} dev d0 nud permanent",
                packet::mac_str(&m)
            ));
        }
        let ifindex = ns.ifindex("d0");
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", ns.name));
        let dp = Dataplane::load(&pin).expect("load the XDP object");
        let mut writer = Writer {
            maps: PinnedMaps::open(&pin).expect("open pins"),
        };
        let mut vips = writer::plan(&config(&pin), LB_ADDR);
        writer.install(&mut vips).expect("install");
        Some(Self {
            ns,
            dp,
            writer,
            vips,
            ifindex,
        })
    }

    /// Runs the program on `frame`; returns the verdict and the frame as it left.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let _in_ns = self.ns.enter();
        let ctx = packet::xdp_md(frame.len() as u32, self.ifindex);
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn reason(&self, r: u32) -> u64 {
        self.writer
            .maps
            .stats_reason
            .get(&r, 0)
            .unwrap()
            .iter()
            .sum()
    }

    fn backend_by_addr(&self, a: Ipv4Addr) -> usize {
        BACKENDS
            .iter()
            .position(|(b, _)| *b == a)
            .expect("a backend")
    }
}

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, sport, VIP, 6443, TcpFlags::SYN)
}

/// Checks the forward rewrite and returns what the backend sees.
fn assert_forwarded(f: &Fixture, verdict: u32, out: &[u8], sport: u16) -> Parsed {
    if verdict != XDP_TX {
        let counts: Vec<String> = (0..reason::COUNT)
            .map(|r| format!("{}={}", reason::NAMES[r as usize], f.reason(r)))
            .collect();
        panic!(
            "verdict {verdict}, not XDP_TX; counters: {}",
            counts.join(" ")
        );
    }
    let p = packet::parse(out).expect("rewritten frame parses");
    assert!(p.ip_csum_ok, "IP checksum valid after rewrite");
    assert!(p.tcp_csum_ok, "TCP checksum valid after rewrite");
    assert_eq!(p.src, LB_ADDR, "source is the SNAT address");
    assert!(
        (61000..=65535).contains(&p.sport),
        "SNAT port {} in range",
        p.sport
    );
    assert_ne!(p.sport, 0);
    let b = f.backend_by_addr(p.dst);
    assert_eq!(p.dport, 6443);
    assert_eq!(p.eth_dst, BACKENDS[b].1, "next hop MAC from the FIB");
    assert_eq!(p.eth_src, LB_MAC);
    let _ = sport;
    p
}

#[test]
fn syn_is_rewritten_to_a_backend_and_the_reply_back_to_the_client() {
    let Some(f) = Fixture::new("dpsyn") else {
        return;
    };
    let (v, out) = f.run(&syn(40000).bytes());
    let fwd = assert_forwarded(&f, v, &out, 40000);

    // The backend's SYN-ACK to SNAT:port becomes VIP:6443 -> client.
    let (bmac, _) = (BACKENDS[f.backend_by_addr(fwd.dst)].1, ());
    let synack = Frame::tcp(
        bmac,
        LB_MAC,
        fwd.dst,
        6443,
        LB_ADDR,
        fwd.sport,
        TcpFlags::SYN | TcpFlags::ACK,
    );
    let (v, out) = f.run(&synack.bytes());
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert!(
        back.ip_csum_ok && back.tcp_csum_ok,
        "checksums valid on the reply"
    );
    assert_eq!((back.src, back.sport), (VIP, 6443));
    assert_eq!((back.dst, back.dport), (CLIENT, 40000));
    assert_eq!(back.eth_dst, CLIENT_MAC);

    // The client's ACK and data keep the backend and SNAT port (flow table).
    for _ in 0..3 {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 6443, TcpFlags::ACK)
            .payload(b"GET /version HTTP/1.1\r\n\r\n");
        let (v, out) = f.run(&ack.bytes());
        let p = assert_forwarded(&f, v, &out, 40000);
        assert_eq!(
            (p.dst, p.sport),
            (fwd.dst, fwd.sport),
            "same backend, same SNAT port"
        );
    }

    // Counters: one new flow, four packets to the backend, one reply.
    let b = f.backend_by_addr(fwd.dst) as u32;
    let vs = f.writer.maps.stats_vip.get(&0, 0).unwrap();
    let sum = |g: fn(&lb_common::TrafficStats) -> u64| vs.iter().map(g).sum::<u64>();
    assert_eq!(sum(|s| s.new_flows), 1);
    assert_eq!(sum(|s| s.packets), 4);
    assert_eq!(sum(|s| s.reply_packets), 1);
    let bs = f.writer.maps.stats_backend.get(&b, 0).unwrap();
    assert_eq!(bs.iter().map(|s| s.new_flows).sum::<u64>(), 1);
    assert_eq!(bs.iter().map(|s| s.packets).sum::<u64>(), 4);
    assert_eq!(f.reason(reason::TX), 5);
    assert_eq!(f.writer.maps.flows.keys().count(), 1);
}

#[test]
fn other_traffic_passes_untouched() {
    let Some(f) = Fixture::new("dppass") else {
        return;
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "other port",
            Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 22, TcpFlags::SYN).bytes(),
            reason::PASS_NOT_OURS,
        ),
        (
            "other address",
            Frame::tcp(
                CLIENT_MAC,
                LB_MAC,
                CLIENT,
                40000,
                LB_ADDR,
                6443,
                TcpFlags::SYN,
            )
            .bytes(),
            reason::PASS_NOT_OURS,
        ),
        (
            "ARP",
            packet::arp_request(CLIENT_MAC, CLIENT, VIP),
            reason::PASS_NOT_IPV4,
        ),
        (
            "IPv6",
            packet::ipv6_frame(CLIENT_MAC, LB_MAC),
            reason::PASS_NOT_IPV4,
        ),
        (
            "ICMP to the VIP",
            packet::icmp_echo(CLIENT_MAC, LB_MAC, CLIENT, VIP),
            reason::PASS_NOT_TCP,
        ),
        (
            "truncated",
            syn(40000).bytes()[..40].to_vec(),
            reason::PASS_TRUNCATED,
        ),
        // BPF_PROG_TEST_RUN takes nothing shorter than an Ethernet header.
        (
            "Ethernet header only",
            syn(40000).bytes()[..14].to_vec(),
            reason::PASS_TRUNCATED,
        ),
    ];
    for (what, frame, r) in cases {
        let before = f.reason(r);
        let (v, out) = f.run(&frame);
        assert_eq!(v, XDP_PASS, "{what}: passed");
        assert_eq!(out, frame, "{what}: untouched");
        assert_eq!(
            f.reason(r),
            before + 1,
            "{what}: counted as {}",
            reason::NAMES[r as usize]
        );
    }
    assert_eq!(f.writer.maps.flows.keys().count(), 0, "no flow created");
}

#[test]
fn rst_without_flow_fragments_and_ip_options() {
    let Some(f) = Fixture::new("dpodd") else {
        return;
    };
    let rst = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40001, VIP, 6443, TcpFlags::RST);
    let (v, _) = f.run(&rst.bytes());
    assert_eq!(v, XDP_DROP, "RST without a flow is dropped");
    assert_eq!(f.reason(reason::DROP_RST_NO_FLOW), 1);
    assert_eq!(f.writer.maps.flows.keys().count(), 0, "RST creates no flow");

    let frag = syn(40002).more_fragments();
    let (v, _) = f.run(&frag.bytes());
    assert_eq!(v, XDP_DROP, "first fragment for a VIP is dropped");
    assert_eq!(f.reason(reason::DROP_FRAGMENT), 1);

    // Options are kept; both checksums stay right.
    let opt = syn(40003).ip_options(&[1, 1, 1, 0]);
    let (v, out) = f.run(&opt.bytes());
    let p = assert_forwarded(&f, v, &out, 40003);
    assert_eq!(p.ihl, 6);
    assert_eq!(f.reason(reason::IP_OPTIONS), 1);

    // One 802.1Q tag: rewritten, tag kept.
    let tagged = syn(40004).vlan(42);
    let (v, out) = f.run(&tagged.bytes());
    let p = assert_forwarded(&f, v, &out, 40004);
    assert_eq!(p.vlan, Some(42));
}

#[test]
fn maglev_spreads_new_flows_and_down_backends_lose_theirs() {
    let Some(mut f) = Fixture::new("dpspread") else {
        return;
    };
    let mut per_backend = [0u32; 3];
    let mut flows = Vec::new();
    for port in 20000..20300u16 {
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        per_backend[f.backend_by_addr(p.dst)] += 1;
        flows.push((port, p.dst));
    }
    for (i, n) in per_backend.iter().enumerate() {
        assert!(
            (60..=140).contains(n),
            "backend {i} got {n} of 300 new flows"
        );
    }

    // Drain master01: its flows stay; new flows avoid it.
    let mut vip = f.vips[0].clone();
    f.writer.set_state(&mut vip, 0, state::DRAIN).unwrap();
    for (port, dst) in flows.iter().take(60) {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, *port, VIP, 6443, TcpFlags::ACK);
        let (v, out) = f.run(&ack.bytes());
        let p = assert_forwarded(&f, v, &out, *port);
        assert_eq!(p.dst, *dst, "a drained backend keeps its flows");
    }
    for port in 30000..30100u16 {
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        assert_ne!(p.dst, BACKENDS[0].0, "no new flow to a drained backend");
    }

    // master01 down: its flows move, the others' stay.
    f.writer.set_state(&mut vip, 0, state::DOWN).unwrap();
    let before = f.reason(reason::FLOW_REPICKED);
    let mut moved = 0;
    for (port, dst) in &flows {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, *port, VIP, 6443, TcpFlags::ACK);
        let (v, out) = f.run(&ack.bytes());
        let p = assert_forwarded(&f, v, &out, *port);
        if *dst == BACKENDS[0].0 {
            assert_ne!(p.dst, BACKENDS[0].0, "a down backend's flow is re-picked");
            moved += 1;
        } else {
            assert_eq!(p.dst, *dst, "flows of healthy backends never move");
        }
    }
    assert_eq!(f.reason(reason::FLOW_REPICKED) - before, moved);
    f.vips[0] = vip;
}
