//! Data plane tests: crafted frames fed to the XDP program through BPF_PROG_TEST_RUN, in a
//! private network namespace whose dummy interface has a route and static neighbours, so
//! the program's FIB lookup succeeds exactly as it would on an LB host.

use lb_common::{reason, state};
use lb_tests::{
    fixture::{
        Fixture, BACKENDS, CLIENT, CLIENT_MAC, LB_ADDR, LB_MAC, VIP, XDP_DROP, XDP_PASS, XDP_TX,
    },
    packet::{self, Frame, Parsed, TcpFlags},
};

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

#[test]
fn frames_for_another_hosts_mac_are_left_to_the_kernel() {
    let Some(mut f) = Fixture::new("dpmac") else {
        return;
    };
    f.writer
        .set_agent_meta(lb_common::AgentMeta {
            mac: LB_MAC,
            ..Default::default()
        })
        .unwrap();
    // A switch flooding a frame meant for the other LB: not ours to balance.
    let other = Frame::tcp(
        CLIENT_MAC,
        [0x02, 0, 0, 0, 0, 0x99],
        CLIENT,
        40000,
        VIP,
        6443,
        TcpFlags::SYN,
    );
    let (v, out) = f.run(&other.bytes());
    assert_eq!(v, XDP_PASS);
    assert_eq!(out, other.bytes(), "untouched");
    assert_eq!(f.reason(reason::PASS_OTHER_HOST), 1);
    assert_eq!(f.writer.maps.flows.keys().count(), 0);
    // Our own MAC still works.
    let (v, _) = f.run(&syn(40000).bytes());
    assert_eq!(v, XDP_TX);
}

/// Milliseconds of CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.
fn monotonic_ms() -> u32 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000) as u32
}

#[test]
fn client_timestamps_reach_the_backend_on_this_hosts_clock_and_come_back_unchanged() {
    let Some(f) = Fixture::new("dpts") else {
        return;
    };
    let client_ts = 3_000_000_000u32;
    let before = monotonic_ms();
    let (v, out) = f.run(&syn(41000).timestamps(client_ts, 0).bytes());
    let after = monotonic_ms();
    let fwd = assert_forwarded(&f, v, &out, 41000);
    let (tsval, tsecr) = fwd.timestamps.expect("timestamp option kept");
    // The program reads the coarse clock, up to a tick behind.
    let before = before.wrapping_sub(20);
    assert!(
        tsval.wrapping_sub(before) <= after.wrapping_sub(before),
        "the backend sees this host's clock ({before}..={after} ms), got {tsval}"
    );
    assert_eq!(tsecr, 0);
    let off = tsval.wrapping_sub(client_ts);

    // SYN-ACK echoing the shifted timestamp: the client gets its own back.
    let bmac = BACKENDS[f.backend_by_addr(fwd.dst)].1;
    let synack = Frame::tcp(
        bmac,
        LB_MAC,
        fwd.dst,
        6443,
        LB_ADDR,
        fwd.sport,
        TcpFlags::SYN | TcpFlags::ACK,
    )
    .timestamps(777, tsval);
    let (v, out) = f.run(&synack.bytes());
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert!(
        back.tcp_csum_ok && back.ip_csum_ok,
        "checksums after the echo is shifted back"
    );
    assert_eq!(
        back.timestamps,
        Some((777, client_ts)),
        "backend's TSval untouched, TSecr restored"
    );

    // Later segments (NOP, NOP, TS) move by the same offset.
    let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41000, VIP, 6443, TcpFlags::ACK)
        .timestamps(client_ts.wrapping_add(5), 777)
        .payload(b"GET / HTTP/1.1\r\n\r\n");
    let (v, out) = f.run(&ack.bytes());
    let p = assert_forwarded(&f, v, &out, 41000);
    assert_eq!(
        p.timestamps,
        Some((client_ts.wrapping_add(5).wrapping_add(off), 777))
    );

    // A timestamp option at an odd offset (one NOP before it): the checksum still holds.
    let odd = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41000, VIP, 6443, TcpFlags::ACK)
        .tcp_options(&[1, 8, 10, 0xb2, 0xd0, 0x5e, 0x0a, 0, 0, 3, 9]);
    let (v, out) = f.run(&odd.bytes());
    let p = assert_forwarded(&f, v, &out, 41000);
    assert_eq!(
        p.timestamps,
        Some((0xb2d0_5e0a_u32.wrapping_add(off), 0x309))
    );

    // No timestamps on the SYN: none added, none shifted.
    let (v, out) = f.run(&syn(41001).bytes());
    let p = assert_forwarded(&f, v, &out, 41001);
    assert_eq!(p.timestamps, None);
}
