//! lb-bench: `cargo xtask bench [--quick]`. The XDP program per packet (BPF_PROG_TEST_RUN),
//! lb against direct, HAProxy and nftables in the lab, failover against keepalived +
//! HAProxy, the socket mode against Kubespray's nginx-proxy, the agent's memory and probing
//! cost; writes docs/benchmarks.md and target/bench/results.json. Needs root.

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use lb_tests::{
    bench::{
        e2e::{self, E2eOptions, Mode},
        failover::{self, FailoverOptions},
        micro::{self, MicroOptions},
        probe::{self, ProbeOptions},
        report::{self, Results},
        socket,
    },
    lab::Lab,
};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "lb's benchmarks (run by `cargo xtask bench`)"
)]
struct Cli {
    /// Shorter runs: everything in under five minutes.
    #[arg(long)]
    quick: bool,
    /// Parts to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The Markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: PathBuf,
    /// The raw results.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Repeat one microbenchmark case for `--seconds`, nothing else, no report: for
    /// `perf record -a -g -- lb-bench --profile syn`.
    #[arg(long, value_enum)]
    profile: Option<micro::ProfileCase>,
    /// How long `--profile` runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Micro,
    E2e,
    Failover,
    Probe,
    Socket,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM end the run at the next step, so the lab's Drop guards clean up;
/// wrk, in the same process group, gets the Ctrl-C too and ends the step at once.
fn catch_signals() -> Result<()> {
    let a = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &a) }.context("sigaction")?;
    }
    Ok(())
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("lb-bench needs root (BPF, XDP, network namespaces): run `cargo xtask bench`");
    }
    catch_signals()?;
    if let Some(case) = cli.profile {
        let ns = micro::profile(case, cli.seconds, &mut |l| println!("{l}"))?;
        println!("median {ns:.1} ns per packet");
        return Ok(());
    }
    let want = |p: Part| cli.only.is_empty() || cli.only.contains(&p);
    let mut r = Results {
        env: report::env(cli.quick),
        ..Default::default()
    };
    let mut log = |l: &str| println!("{l}");
    println!(
        "lb-bench{}: Linux {}, {} x {}",
        if cli.quick { " --quick" } else { "" },
        r.env.kernel,
        r.env.cores,
        r.env.cpu
    );
    if !r.env.other_namespaces.is_empty() {
        println!(
            "note: other labs or tests are running (load {}; {}): figures will be noisy",
            r.env.loadavg,
            r.env.other_namespaces.join(", ")
        );
    }

    if want(Part::Micro) {
        let o = if cli.quick {
            MicroOptions::quick()
        } else {
            MicroOptions::full()
        };
        let m = micro::run(&o, &mut log)?;
        println!(
            "\nXDP program per packet (BPF_PROG_TEST_RUN, repeat {}):",
            o.repeat
        );
        for c in [&m.floor, &m.not_ours, &m.syn, &m.established, &m.reply] {
            println!(
                "  {:<36} {:>8.1} ns  {:>6.2}x floor",
                c.name, c.ns, c.x_floor
            );
        }
        for (i, p) in m.by_backends.iter().chain(&m.by_flows).enumerate() {
            if i == 0 || i == m.by_backends.len() {
                println!(
                    "  by {}:",
                    if i == 0 {
                        "backends"
                    } else {
                        "flows in the table"
                    }
                );
            }
            println!(
                "  {:>4} backends, {:>7} flows: SYN {:>7.1} ns ({:.2}x), established {:>6.1} ns ({:.2}x)",
                p.backends, p.flows, p.syn.ns, p.syn.x_floor, p.established.ns, p.established.x_floor
            );
        }
        println!(
            "  maps: {:.1} MiB at default sizes, {:.0} bytes per flow\n",
            m.maps.total_bytes as f64 / 1048576.0,
            m.maps.bytes_per_flow
        );
        r.micro = Some(m);
    }
    if stopped() {
        bail!("interrupted");
    }

    if want(Part::E2e) || want(Part::Probe) || want(Part::Socket) {
        let lab = Lab::new("bench", 1, 3).context("the lab needs root")?;
        let footprint = lab.footprint();
        if want(Part::E2e) {
            let o = if cli.quick {
                E2eOptions::quick()
            } else {
                E2eOptions::full()
            };
            let e = e2e::run(&lab, &o, &stopped, &mut log)?;
            for mode in Mode::ALL {
                println!("\n{}:\n{}", mode.name(), report::e2e_table(&e, mode));
            }
            println!("{}", report::ratio_table(&e));
            r.e2e = Some(e);
        }

        if want(Part::Socket) {
            let o = socket::options(cli.quick);
            let s = socket::run(&lab, &o, &stopped, &mut log)?;
            for mode in socket::MODES {
                println!(
                    "\nnode-local, {}:\n{}",
                    mode.name(),
                    report::socket_table(&s, mode)
                );
            }
            println!("{}", report::socket_ratio_table(&s));
            println!("{}", report::socket_memory_table(&s));
            r.socket = Some(s);
        }

        if want(Part::Probe) {
            let o = if cli.quick {
                ProbeOptions::quick()
            } else {
                ProbeOptions::full()
            };
            r.probe = probe::run(&lab, &o, &stopped, &mut log)?;
        }
        drop(lab);
        let left = footprint.leftovers();
        if !left.is_empty() {
            bail!("the lab left things behind: {left:?}");
        }
    }

    if stopped() {
        bail!("interrupted");
    }

    if want(Part::Failover) {
        // Its own lab: two LBs sharing the VIP, lb-stub apiservers (HTTPS) behind them.
        let lab = Lab::new("bench-failover", 2, 3).context("the lab needs root")?;
        let footprint = lab.footprint();
        let o = if cli.quick {
            FailoverOptions::quick()
        } else {
            FailoverOptions::full()
        };
        let f = failover::run(&lab, &o, &stopped, &mut log)?;
        println!("\nfailover:\n{}", report::failover_table(&f));
        r.failover = Some(f);
        drop(lab);
        let left = footprint.leftovers();
        if !left.is_empty() {
            bail!("the failover lab left things behind: {left:?}");
        }
    }

    r.targets = report::targets(&r);
    println!("\nWhere lb stands:\n{}", report::targets_table(&r.targets));
    if let Some(d) = cli.json.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&cli.json, serde_json::to_string_pretty(&r)?)
        .with_context(|| format!("writing {}", cli.json.display()))?;
    if let Some(d) = cli.doc.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&cli.doc, report::markdown(&r))
        .with_context(|| format!("writing {}", cli.doc.display()))?;
    println!("wrote {} and {}", cli.doc.display(), cli.json.display());
    Ok(())
}
