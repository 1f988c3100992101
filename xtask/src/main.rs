//! `cargo xtask build|run|test|demo|bench|package`: installs what lb needs (nightly rust-src,
//! bpf-linker, Debian packages), builds, and runs.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

mod package;

const BPF_LINKER_VERSION: &str = "0.10.3";
/// Debian packages the tests and the demo use: the lab (ip, ethtool, nsenter), the stubs'
/// admin calls (curl), the tracking test (nft) and the VRRP interop tests (keepalived).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("nft", "nftables"),
    ("keepalived", "keepalived"),
    // `systemd-analyze verify` checks packaging/systemd/lb-agent.service (tests/tests/systemd_unit.rs).
    ("systemd-analyze", "systemd"),
    // A real Prometheus scrapes the agent, and promtool checks the exposition and the alert
    // rules (tests/tests/e2e_metrics.rs).
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // The Debian package: strip and objdump build it, `man -w` checks its man page
    // (tests/tests/deb_package.rs).
    ("objdump", "binutils"),
    ("man", "man-db"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// Nightly with rust-src and bpf-linker built against nightly's LLVM.
fn ensure_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the XDP program")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (the XDP program needs it)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        say("installing rust-src for nightly (build-std=core for bpfel-unknown-none)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        say(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} with nightly's LLVM 22 (about 70 s)"
        ));
        run(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "rust-llvm-22",
            "--locked",
            "--force",
        ]))?;
    }
    Ok(())
}

/// What the benchmark compares lb with and drives it with.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("haproxy", "haproxy"),
    ("nft", "nftables"),
    ("nginx", "nginx-light"),
    // Kubespray's nginx-proxy is a `stream` proxy; Debian builds that module apart.
    (
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "libnginx-mod-stream",
    ),
];

/// Whether `what` of a (what, package) pair is there: a command on PATH, or a file when it
/// is an absolute path.
fn installed(what: &str) -> bool {
    if what.starts_with('/') {
        return std::path::Path::new(what).exists();
    }
    output(Command::new("sh").args(["-c", &format!("command -v {what}")])).is_some()
}

/// Debian packages the lab needs; installed with apt-get when missing.
fn ensure_packages(extra: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .chain(extra)
        .filter(|(what, _)| !installed(what))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them (apt-get install {}) or run as root",
            missing.join(" ")
        );
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Fault injection (`lb-agent debug failpoint`) for the tests; never in release builds.
const TEST_FEATURES: &str = "lb-agent/failpoints";

fn build(release: bool) -> Result<PathBuf> {
    build_with(release, None)
}

fn build_with(release: bool, features: Option<&str>) -> Result<PathBuf> {
    ensure_toolchain()?;
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    if let Some(f) = features {
        c.args(["--features", f]);
    }
    run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// Runs `cmd` as root, through sudo when we are not.
fn as_root(bin: &Path, args: &[String]) -> Command {
    if is_root() {
        let mut c = Command::new(bin);
        c.args(args);
        c
    } else {
        say(&format!(
            "{} needs root (XDP, bpffs, namespaces, sysctls): using sudo",
            bin.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut c = Command::new("sudo");
        c.arg(bin).args(args);
        c
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => build(args.iter().any(|a| a == "--release")).map(|dir| {
            say(&format!("built {}", dir.join("lb-agent").display()));
        }),
        Some("run") => (|| {
            let dir = build(true)?;
            let rest: Vec<String> = match args.iter().position(|a| a == "--") {
                Some(i) => args[i + 1..].to_vec(),
                None => vec!["run".into(), "--config".into(), "/etc/lb/lb.toml".into()],
            };
            let status = as_root(&dir.join("lb-agent"), &rest).status()?;
            if !status.success() {
                bail!("lb-agent exited with {status}");
            }
            Ok(())
        })(),
        Some("test") => test(&args[1..]),
        Some("demo") => (|| {
            ensure_packages(&[])?;
            let dir = build(true)?;
            run(as_root(&dir.join("lb-demo"), &[]).env("LB_AGENT_BIN", dir.join("lb-agent")))
        })(),
        Some("bench") => bench(&args[1..]),
        Some("package") => (|| {
            // --binary PATH packages a binary already built (the test's debug one).
            let flag = |name: &str| {
                args.iter()
                    .position(|a| a == name)
                    .and_then(|i| args.get(i + 1))
                    .map(PathBuf::from)
            };
            let binary = match flag("--binary") {
                Some(b) => b,
                None => build(true)?.join("lb-agent"),
            };
            let out = flag("--out").unwrap_or_else(|| root().join("target/package"));
            let deb = package::package(&binary, &out)?;
            println!("{}", deb.display());
            Ok(())
        })(),
        _ => {
            eprintln!(
                "usage: cargo xtask build [--release] | run [-- ARGS] | test | demo | bench [--quick] | package [--binary PATH] [--out DIR]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Unit tests, data plane tests (BPF_PROG_TEST_RUN) and end-to-end tests in namespaces.
fn test(extra: &[String]) -> Result<()> {
    ensure_packages(&[])?;
    let dir = build_with(false, Some(TEST_FEATURES))?;
    let mut c = cargo();
    // The same features as the build above, so cargo does not rebuild lb-agent without them.
    c.args(["test", "--workspace", "--features", TEST_FEATURES])
        .args(extra)
        .env("LB_AGENT_BIN", dir.join("lb-agent"));
    run(&mut c)
}

/// The microbenchmark, lb against direct, HAProxy and nftables in the lab, memory and
/// probe cost; writes docs/benchmarks.md and target/bench/results.json.
fn bench(extra: &[String]) -> Result<()> {
    ensure_packages(BENCH_PACKAGES)?;
    let dir = build(true)?;
    let mut args: Vec<String> = extra.to_vec();
    for (flag, path) in [
        ("--doc", root().join("docs/benchmarks.md")),
        ("--json", root().join("target/bench/results.json")),
    ] {
        if !args.iter().any(|a| a == flag) {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
    }
    let mut c = as_root(&dir.join("lb-bench"), &args);
    c.current_dir(root());
    run(&mut c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_takes_commands_and_files() {
        assert!(installed("sh"));
        assert!(!installed("no-such-command-lb"));
        assert!(installed("/bin/sh"));
        assert!(!installed("/usr/lib/nginx/modules/no_such_module.so"));
    }
}
