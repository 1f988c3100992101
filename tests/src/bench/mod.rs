//! `cargo xtask bench`: the microbenchmark of the XDP program (BPF_PROG_TEST_RUN), the
//! end-to-end comparison in the lab (direct, lb, HAProxy, nftables), failover (lb against
//! keepalived + HAProxy), the health probes' cost, memory, and the report
//! (docs/benchmarks.md, target/bench/results.json).

pub mod e2e;
pub mod failover;
pub mod load;
pub mod micro;
pub mod parse;
pub mod probe;
pub mod report;
pub mod socket;
pub mod stats;
