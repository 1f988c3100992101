//! The microbenchmark once, small: every case takes the path it names (the harness checks
//! the program's counters), and the figures are there. No timing is asserted.

use lb_tests::{bench::micro, netns};

#[test]
fn microbenchmark_runs_every_case() {
    if !netns::require_root("bench_smoke") {
        return;
    }
    let o = micro::MicroOptions::smoke();
    let m = micro::run(&o, &mut |l| eprintln!("{l}")).expect("microbenchmark");
    for c in [&m.floor, &m.not_ours, &m.syn, &m.established, &m.reply] {
        assert!(c.ns > 0.0, "{}: {} ns", c.name, c.ns);
        assert!(c.packets > 0, "{}", c.name);
        assert!(c.x_floor > 0.0, "{}", c.name);
    }
    assert_eq!(m.floor.x_floor, 1.0);
    assert_eq!(m.by_backends.len(), o.backends.len());
    assert_eq!(m.by_flows.len(), o.flows.len());
    for p in m.by_backends.iter().chain(&m.by_flows) {
        assert!(p.syn.packets >= o.syn_packets, "{p:?}");
        assert!(p.established.ns > 0.0, "{p:?}");
    }
    assert!(m.maps.total_bytes > 0);
    assert!(m.maps.bytes_per_flow > 0.0);
    assert_eq!(m.maps.maps.len(), lb_common::map::ALL.len());
}
