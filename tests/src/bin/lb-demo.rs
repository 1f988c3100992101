//! `cargo xtask demo`: builds a lab (client, one LB, three stub apiservers on a bridge),
//! starts lb-agent, sends HTTPS through the VIP, prints `lb-agent status`, tears down.

use std::{process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use lb_tests::lab::{bin, Lab, VIP, VIP_PORT};

fn main() -> Result<()> {
    let Some(lab) = Lab::new("demo", 1, 3) else {
        bail!("the demo needs root (XDP, network namespaces): run it with `cargo xtask demo`");
    };
    println!("lab {}: client 198.18.0.50, lb1 198.18.0.2 (VIP {VIP}:{VIP_PORT}), apiservers 198.18.0.11-13", lab.id);
    let stubs = lab.start_stubs();
    lab.add_vip(0);
    let config = lab.agent_config(0, "", "interval = \"500ms\"");
    println!(
        "config {}:\n{}",
        config.display(),
        std::fs::read_to_string(&config)?
    );
    let mut agent = lab.start_agent(0, &config);
    println!("lb-agent running on lb1; sending 500 HTTPS requests to https://{VIP}:{VIP_PORT}/version, each on a new connection...");
    let report = lab.loadgen("/version", &["--count", "500", "--concurrency", "4"]);
    println!(
        "client: {} ok, {} failed, served by {}",
        report["ok"], report["failed"], report["backends"]
    );
    println!("\n$ lb-agent status --config {}", config.display());
    let out = Command::new(bin("lb-agent"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .context("lb-agent status")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let st = agent.terminate(Duration::from_secs(10));
    println!("\nlb-agent stopped ({st:?}); tearing the lab down");
    drop(stubs);
    let footprint = lab.footprint();
    drop(lab);
    let left = footprint.leftovers();
    if !left.is_empty() {
        bail!("left behind: {left:?}");
    }
    println!("lab removed");
    if report["failed"] != 0 {
        bail!("some requests failed");
    }
    Ok(())
}
