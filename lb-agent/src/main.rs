//! `lb-agent`: run | check-config | status.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_agent::{
    app,
    config::{self, Config},
    control::{self, Request},
    status,
};
use lb_common::{DEFAULT_CONFIG, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_PATH};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "lb's agent: an XDP load balancer for kube-apiservers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP data plane and serve the configured VIPs until SIGTERM/SIGINT.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file against this host and exit (status 2 on a mistake).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Stop sending new connections to a backend; its connections are kept.
    Drain {
        /// VIP name.
        vip: String,
        /// Backend name.
        backend: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Undo `drain`.
    Undrain {
        vip: String,
        backend: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show what is in the data plane's maps and what the agent says.
    Status {
        /// Config file, for its pin path and control socket (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Exit status for a mistake in the config file.
const EXIT_CONFIG: u8 = 2;
/// Exit status of `status` when no agent is running.
const EXIT_NOT_RUNNING: u8 = 3;

/// Loads and validates `path` against this host; prints the one-line error on failure.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    let fail = |e: config::ConfigError| {
        eprintln!("lb-agent: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let cfg = Config::load(path).map_err(fail)?;
    match config::read_ephemeral_range() {
        Ok(range) => cfg.check_port_ranges(range).map_err(fail)?,
        Err(e) => log::warn!("cannot read net.ipv4.ip_local_port_range: {e}"),
    }
    for (i, v) in cfg.vips.iter().enumerate() {
        if let Err(e) = lb_agent::health::tls_config(&v.health) {
            return Err(fail(config::ConfigError {
                file: cfg.path.clone(),
                field: format!("vip[{i}].health.{}", e.field),
                message: format!(
                    "{}{}",
                    e.message,
                    if e.field == "ca_file" {
                        " (the CA that signed the apiservers' certificates; or set insecure_skip_verify = true)"
                    } else {
                        ""
                    }
                ),
            }));
        }
    }
    if lb_agent::host::ifindex(&cfg.agent.interface).is_err() {
        return Err(fail(config::ConfigError {
            file: cfg.path.clone(),
            field: "agent.interface".into(),
            message: format!("no interface {:?} on this host", cfg.agent.interface),
        }));
    }
    Ok(cfg)
}

/// Pin path and control socket from `--config`, or the defaults.
fn paths(config: Option<PathBuf>) -> Result<(PathBuf, PathBuf), ExitCode> {
    match config {
        Some(path) => match Config::load(&path) {
            Ok(c) => Ok((c.agent.pin_path, c.agent.control_socket)),
            Err(e) => {
                eprintln!("lb-agent: {e}");
                Err(ExitCode::from(EXIT_CONFIG))
            }
        },
        None => Ok((DEFAULT_PIN_PATH.into(), DEFAULT_CONTROL_SOCKET.into())),
    }
}

/// `drain` / `undrain` through the control socket.
fn drain(config: Option<PathBuf>, req: Request) -> ExitCode {
    let (_, sock) = match paths(config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match control::request(&sock, &req) {
        Ok(r) if r.ok => {
            println!("{}", r.message.unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("lb-agent: {}", r.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("lb-agent: is the agent running? {e}");
            ExitCode::from(EXIT_NOT_RUNNING)
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => match load_config(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} VIPs, {} backends)",
                    cfg.path.display(),
                    cfg.vips.len(),
                    cfg.vips.iter().map(|v| v.backends.len()).sum::<usize>()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Run { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("lb-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(app::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lb-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Drain {
            vip,
            backend,
            config,
        } => drain(config, Request::Drain { vip, backend }),
        Cmd::Undrain {
            vip,
            backend,
            config,
        } => drain(config, Request::Undrain { vip, backend }),
        Cmd::Status { config, json } => {
            let (pin, sock) = match paths(config) {
                Ok(p) => p,
                Err(code) => return code,
            };
            if let Err(e) = lb_agent::host::check_privileges("status") {
                eprintln!("lb-agent: {e}");
                return ExitCode::FAILURE;
            }
            match status::gather(&pin, &sock) {
                Ok(r) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&r).expect("serializable")
                        );
                    } else {
                        print!("{}", status::render(&r));
                    }
                    ExitCode::SUCCESS
                }
                Err(e @ status::StatusError::NotRunning { .. }) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"running": false, "error": e.to_string(), "vips": []})
                        );
                    } else {
                        eprintln!("lb-agent: {e}");
                    }
                    ExitCode::from(EXIT_NOT_RUNNING)
                }
                Err(e) => {
                    eprintln!("lb-agent: status: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
