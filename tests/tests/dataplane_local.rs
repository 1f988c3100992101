//! Data plane tests of local backends (lb on the control-plane nodes): crafted frames
//! through BPF_PROG_TEST_RUN (see dataplane.rs for the fixture). A connection Maglev gives to
//! a backend at an address of the LB host passes to the local stack, addressed to the VIP,
//! with only the port changed when the backend's differs.

use lb_common::{reason, state};
use lb_tests::{
    fixture::{BackendSpec, Fixture, Options, BACKENDS, CLIENT, CLIENT_MAC, LB_MAC, VIP, XDP_PASS},
    packet::{self, Frame, TcpFlags},
};

/// A fixture whose first backend listens on `port` and is local, with `others` remote ones.
fn fixture(tag: &str, port: u16, others: usize) -> Option<Fixture> {
    let backends: Vec<BackendSpec> = BACKENDS
        .iter()
        .take(1 + others)
        .enumerate()
        .map(|(i, (a, m))| BackendSpec {
            name: format!("master0{}", i + 1),
            addr: *a,
            port: if i == 0 { port } else { 6443 },
            mac: *m,
        })
        .collect();
    Fixture::with(
        tag,
        Options {
            local: vec![backends[0].addr],
            backends,
            ..Default::default()
        },
    )
}

fn tcp(sport: u16, flags: u8) -> Frame {
    Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, sport, VIP, 6443, flags)
}

/// Checks a frame passed to the local stack: the input but for the destination port.
fn assert_local(f: &Fixture, verdict: u32, out: &[u8], input: &[u8], port: u16) {
    assert_eq!(verdict, XDP_PASS, "counters: {}", f.counters());
    let p = packet::parse(out).expect("an IPv4 TCP frame");
    let i = packet::parse(input).expect("an IPv4 TCP frame");
    assert_eq!(
        (p.src, p.sport, p.dst),
        (i.src, i.sport, i.dst),
        "addressed as it came"
    );
    assert_eq!(p.dport, port);
    assert!(p.tcp_csum_ok && p.ip_csum_ok, "checksums");
    assert_eq!(&out[..12], &input[..12], "MACs untouched");
}

#[test]
fn a_local_backend_on_the_vip_port_gets_the_packets_untouched() {
    let Some(f) = fixture("local", 6443, 0) else {
        return;
    };
    let syn = tcp(40000, TcpFlags::SYN).bytes();
    let (v, out) = f.run(&syn);
    assert_local(&f, v, &out, &syn, 6443);
    assert_eq!(out, syn, "nothing to rewrite");
    assert_eq!(f.reason(reason::LOCAL), 1);
    assert_eq!(f.vip_stats().new_flows, 1);
    assert_eq!(
        f.writer.maps.dsr_flows.iter().count(),
        1,
        "one entry: no reply entry without a port to give back"
    );
    let ack = tcp(40000, TcpFlags::ACK).payload(b"GET /").bytes();
    let (v, out) = f.run(&ack);
    assert_local(&f, v, &out, &ack, 6443);
    assert_eq!(f.reason(reason::LOCAL), 2);
    assert_eq!(f.vip_stats().packets, 2);
}

#[test]
fn a_local_backend_on_another_port_gets_its_port_and_a_reply_entry() {
    let Some(f) = fixture("localport", 7443, 0) else {
        return;
    };
    let syn = tcp(40001, TcpFlags::SYN).mss(1460).bytes();
    let (v, out) = f.run(&syn);
    assert_local(&f, v, &out, &syn, 7443);
    let entries: Vec<_> = f
        .writer
        .maps
        .dsr_flows
        .iter()
        .map(|e| e.expect("entry"))
        .collect();
    assert_eq!(entries.len(), 2, "the connection's and its reply's");
    let reply = entries
        .iter()
        .find(|(k, _)| k.src_addr == u32::from(VIP).to_be())
        .expect("an entry keyed by the reply's tuple");
    assert_eq!(u16::from_be(reply.0.src_port), 7443);
    assert_eq!(
        u16::from_be(reply.1.src_port),
        6443,
        "the port TC gives back"
    );

    // A packet of a connection whose entry was lost is adopted where Maglev sends it.
    let ack = tcp(40002, TcpFlags::ACK).payload(b"x").bytes();
    let (v, out) = f.run(&ack);
    assert_local(&f, v, &out, &ack, 7443);
    assert_eq!(f.reason(reason::LOCAL_ADOPTED), 1);
}

#[test]
fn local_and_remote_backends_share_the_table_and_a_dead_local_one_gets_none() {
    let Some(mut f) = fixture("localmix", 6443, 2) else {
        return;
    };
    let (mut local, mut remote) = (0, 0);
    for port in 41000..41060 {
        let syn = tcp(port, TcpFlags::SYN).bytes();
        let (v, out) = f.run(&syn);
        if v == XDP_PASS {
            assert_local(&f, v, &out, &syn, 6443);
            local += 1;
        } else {
            let p = packet::parse(&out).expect("a frame");
            assert_ne!(p.dst, VIP, "NATed to a remote backend: {}", f.counters());
            remote += 1;
        }
    }
    assert!(local >= 8 && remote >= 24, "local {local}, remote {remote}");
    assert_eq!(f.reason(reason::LOCAL), local);

    // The local apiserver fails its probes: its connections are reset, new ones go elsewhere.
    f.writer
        .set_state(&mut f.vips[0], 0, state::DOWN)
        .expect("down");
    let before = f.reason(reason::LOCAL);
    for port in 42000..42030 {
        let (v, _) = f.run(&tcp(port, TcpFlags::SYN).bytes());
        assert_ne!(v, XDP_PASS, "no new connection to a dead local backend");
    }
    assert_eq!(f.reason(reason::LOCAL), before);
}

/// Not about local backends alone: the verifier's budget is a million processed
/// instructions per program, and lb_xdp once used 99% of it. The new-flow path now runs as
/// its own program (a tail call); this keeps a margin for the next feature visible.
#[test]
fn every_program_leaves_the_verifier_a_margin() {
    let Some(f) = fixture("verifier", 6443, 2) else {
        return;
    };
    let counts = f.verified_instructions();
    for (name, n) in &counts {
        println!("{name}: {n} instructions verified of 1000000");
    }
    for name in [lb_common::PROG_LB, lb_common::PROG_NEW_FLOW] {
        let n = counts
            .iter()
            .find(|(p, _)| p == name)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("{name} is loaded: {counts:?}"));
        assert!(n < 800_000, "{name}: {n} of 1000000: split it further");
    }
}
