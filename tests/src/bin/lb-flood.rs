//! lb-flood: a bounded SYN or ACK flood toward a lab VIP through an AF_PACKET socket;
//! prints one JSON report on stdout. Lab addresses only (198.18.0.0/15).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use clap::{ArgGroup, Parser};
use lb_tests::flood::{self, Mode, Options, Sender};

#[derive(Parser, Debug)]
#[command(
    name = "lb-flood",
    about = "Bounded SYN/ACK flood toward a lab VIP (198.18.0.0/15 only); prints a JSON report",
    group(ArgGroup::new("mode").required(true).args(["syn", "ack"]))
)]
struct Args {
    /// SYNs from random addresses of 198.19.0.0/16 and random ports.
    #[arg(long)]
    syn: bool,
    /// Bare ACKs from --src, random ports, random sequence and acknowledgement numbers.
    #[arg(long, requires = "src")]
    ack: bool,
    /// Interface to send on (run inside the client's namespace).
    #[arg(long)]
    interface: String,
    /// The LB's MAC address.
    #[arg(long, value_parser = flood::parse_mac)]
    dst_mac: [u8; 6],
    /// The sending interface's MAC address.
    #[arg(long, value_parser = flood::parse_mac)]
    src_mac: [u8; 6],
    /// Source address of the ACKs (the client's own).
    #[arg(long, conflicts_with = "syn")]
    src: Option<Ipv4Addr>,
    /// Destination address (must be in 198.18.0.0/15).
    #[arg(long)]
    vip: Ipv4Addr,
    /// Destination port.
    #[arg(long)]
    port: u16,
    /// Packets per second.
    #[arg(long)]
    rate: u64,
    /// Seconds to flood (at most 60).
    #[arg(long)]
    duration: u64,
    /// Stop after this many packets (at most 5,000,000).
    #[arg(long)]
    max_packets: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let o = Options {
        mode: if a.syn { Mode::Syn } else { Mode::Ack },
        src_mac: a.src_mac,
        dst_mac: a.dst_mac,
        src: a.src,
        vip: a.vip,
        port: a.port,
        rate: a.rate,
        duration: Duration::from_secs(a.duration),
        max_packets: a.max_packets,
    };
    // Refuse before opening anything.
    o.validate()?;
    let sender = Sender::open(&a.interface, o.dst_mac)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_nanos() as u64
        ^ u64::from(std::process::id());
    let report = flood::run(&o, &sender, seed)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
