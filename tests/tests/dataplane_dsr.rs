//! Data plane tests of the DSR modes: crafted frames through BPF_PROG_TEST_RUN (see
//! dataplane.rs for the fixture).

use std::net::Ipv4Addr;

use lb_common::{reason, state};
use lb_tests::{
    fixture::{Fixture, Options, BACKENDS, CLIENT, CLIENT_MAC, LB_MAC, VIP, XDP_DROP, XDP_TX},
    packet::{self, checksum, Frame, TcpFlags},
};

fn fixture(tag: &str, mode: &'static str) -> Option<Fixture> {
    Fixture::with(
        tag,
        Options {
            mode,
            ..Default::default()
        },
    )
}

fn tcp(sport: u16, flags: u8) -> Frame {
    Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, sport, VIP, 6443, flags)
}

/// Checks a dsr-l2 frame: the input with only the MACs changed; returns the backend's index.
fn assert_l2(f: &Fixture, verdict: u32, out: &[u8], input: &[u8]) -> usize {
    assert_eq!(verdict, XDP_TX, "counters: {}", f.counters());
    assert_eq!(out.len(), input.len());
    assert_eq!(&out[12..], &input[12..], "only the MACs change");
    assert_eq!(&out[6..12], &LB_MAC);
    BACKENDS
        .iter()
        .position(|(_, m)| m[..] == out[0..6])
        .expect("destination MAC is a backend's")
}

#[test]
fn dsr_l2_rewrites_only_the_macs_and_keeps_a_flow_on_its_backend() {
    let Some(mut f) = fixture("dsrl2", "dsr-l2") else {
        return;
    };
    let syn = tcp(40000, TcpFlags::SYN).bytes();
    let (v, out) = f.run(&syn);
    let b = assert_l2(&f, v, &out, &syn);
    assert_eq!(f.vip_stats().new_flows, 1);
    assert_eq!(f.writer.maps.dsr_flows.iter().count(), 1, "one DSR entry");

    // The connection's backend is drained and out of the Maglev table: its packets still go
    // there (the flow), a new connection does not.
    f.writer
        .set_state(&mut f.vips[0], b, state::DRAIN)
        .expect("drain");
    let ack = tcp(40000, TcpFlags::ACK)
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .bytes();
    let (v, out) = f.run(&ack);
    assert_eq!(
        assert_l2(&f, v, &out, &ack),
        b,
        "the flow keeps its backend"
    );
    for port in 40001..40040 {
        let s = tcp(port, TcpFlags::SYN).bytes();
        let (v, out) = f.run(&s);
        assert_ne!(
            assert_l2(&f, v, &out, &s),
            b,
            "no new flow to a drained backend"
        );
    }
}

#[test]
fn dsr_packets_without_a_flow_go_where_maglev_sends_their_syn() {
    let Some(mut f) = fixture("dsradopt", "dsr-l2") else {
        return;
    };
    // Where each connection's SYN went, as on the LB that served it.
    let mut picked = Vec::new();
    for port in 41000..41020 {
        let s = tcp(port, TcpFlags::SYN).bytes();
        let (v, out) = f.run(&s);
        picked.push(assert_l2(&f, v, &out, &s));
    }
    // This LB lost its flows (a backup that took over): their next packets go to the same
    // backends, are counted as adopted, and make entries again.
    let keys: Vec<_> = f
        .writer
        .maps
        .dsr_flows
        .keys()
        .filter_map(Result::ok)
        .collect();
    for k in &keys {
        f.writer.maps.dsr_flows.remove(k).expect("remove");
    }
    for (i, port) in (41000..41020).enumerate() {
        let a = tcp(port, TcpFlags::ACK).payload(b"x").bytes();
        let (v, out) = f.run(&a);
        assert_eq!(assert_l2(&f, v, &out, &a), picked[i], "port {port}");
    }
    assert_eq!(f.reason(reason::DSR_ADOPTED), 20);
    assert_eq!(f.writer.maps.dsr_flows.iter().count(), 20);

    // A RST without a flow goes on and leaves nothing behind.
    let r = tcp(42000, TcpFlags::RST).bytes();
    let (v, out) = f.run(&r);
    assert_l2(&f, v, &out, &r);
    assert_eq!(f.writer.maps.dsr_flows.iter().count(), 20);
}

#[test]
fn dsr_ipip_encapsulates_towards_the_backend_with_a_per_flow_source() {
    let Some(f) = fixture("dsripip", "dsr-ipip") else {
        return;
    };
    let mut sources = std::collections::BTreeSet::new();
    for port in 43000..43016 {
        let inner = tcp(port, TcpFlags::SYN).mss(1460).bytes();
        let (v, out) = f.run(&inner);
        assert_eq!(v, XDP_TX, "counters: {}", f.counters());
        assert_eq!(out.len(), inner.len() + 20, "one outer header");
        assert_eq!(&out[6..12], &LB_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        let outer = &out[14..34];
        assert_eq!(outer[0], 0x45);
        assert_eq!(outer[9], 4, "protocol IPIP");
        assert_eq!(checksum(outer, 0), 0, "outer checksum valid");
        assert_eq!(
            u16::from_be_bytes([outer[2], outer[3]]) as usize,
            inner.len() - 14 + 20
        );
        assert_eq!(outer[6] & 0x40, inner[14 + 6] & 0x40, "DF copied");
        let src = Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15]);
        let dst = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
        assert_eq!((src.octets()[0], src.octets()[1]), (172, 16), "{src}");
        sources.insert(src);
        let b = BACKENDS
            .iter()
            .position(|(a, _)| *a == dst)
            .expect("outer destination is a backend");
        assert_eq!(&out[0..6], &BACKENDS[b].1, "next hop is the backend");
        assert_eq!(&out[34..], &inner[14..], "the client's packet, untouched");
    }
    assert!(
        sources.len() >= 12,
        "outer sources vary per flow: {sources:?}"
    );
}

#[test]
fn dsr_ipip_answers_fragmentation_needed_for_what_the_outer_header_makes_too_big() {
    let Some(f) = fixture("dsrbig", "dsr-ipip") else {
        return;
    };
    let syn = tcp(44000, TcpFlags::SYN).bytes();
    let (v, _) = f.run(&syn);
    assert_eq!(v, XDP_TX);
    // 1500 bytes of IP with DF: 1520 with the outer header on a 1500-byte link.
    let big = tcp(44000, TcpFlags::ACK).payload(&[7u8; 1460]).bytes();
    assert_eq!(big.len(), 14 + 1500);
    let (v, out) = f.run(&big);
    assert_eq!(v, XDP_TX, "counters: {}", f.counters());
    let icmp = packet::parse_icmp(&out).expect("an ICMP error");
    assert_eq!((icmp.icmp_type, icmp.code), (3, 4), "fragmentation needed");
    assert_eq!(icmp.mtu, Some(1480), "the link's MTU less the outer header");
    assert_eq!((icmp.src, icmp.dst), (VIP, CLIENT));
    assert_eq!(f.reason(reason::ICMP_FRAG_NEEDED_SENT), 1);
    // One that fits goes through.
    let fits = tcp(44000, TcpFlags::ACK).payload(&[7u8; 1440]).bytes();
    let (v, out) = f.run(&fits);
    assert_eq!(v, XDP_TX);
    assert_eq!(out.len(), fits.len() + 20);
}

#[test]
fn dsr_to_a_dead_backend_resets_the_client() {
    let Some(mut f) = fixture("dsrdead", "dsr-l2") else {
        return;
    };
    let syn = tcp(45000, TcpFlags::SYN).bytes();
    let (v, out) = f.run(&syn);
    let b = assert_l2(&f, v, &out, &syn);
    f.writer
        .set_state(&mut f.vips[0], b, state::DOWN)
        .expect("down");
    let ack = tcp(45000, TcpFlags::ACK).payload(b"x").bytes();
    let (v, out) = f.run(&ack);
    assert_eq!(v, XDP_TX);
    let p = packet::parse(&out).expect("a RST");
    assert_eq!(p.flags & TcpFlags::RST, TcpFlags::RST);
    assert_eq!((p.src, p.dst), (VIP, CLIENT));
    assert_eq!(f.reason(reason::RST_BACKEND_DOWN), 1);
    let _ = XDP_DROP;
}
