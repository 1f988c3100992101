//! `lb-agent`: run | check-config | reload | status | drain | undrain | backend-setup |
//! manifest | import.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use lb_agent::{
    app, backend_setup,
    config::{self, Config},
    control::{self, Request},
    import, logging, manifest, status,
};
use lb_common::{DEFAULT_CONFIG, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_PATH};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "lb's agent: an XDP load balancer for kube-apiservers",
    after_help = "Examples:
  lb-agent check-config --config /etc/lb/lb.toml
  lb-agent run --config /etc/lb/lb.toml
  lb-agent status
  lb-agent drain kube-apiserver master02
  lb-agent import --haproxy /etc/haproxy/haproxy.cfg --keepalived /etc/keepalived/keepalived.conf

`lb-agent help COMMAND` (or COMMAND --help) says what each argument is."
)]
struct Cli {
    /// How the agent writes its log on stderr: text, or one JSON object per line (default:
    /// the config's agent.log_format, else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP data plane and serve the configured VIPs until SIGTERM/SIGINT.
    #[command(after_help = "Example:\n  lb-agent run --config /etc/lb/lb.toml")]
    Run {
        /// The config file (lb.toml) to serve.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file against this host and exit (status 2 on a mistake).
    #[command(after_help = "Example:\n  lb-agent check-config --config /etc/lb/lb.toml")]
    CheckConfig {
        /// The config file (lb.toml) to check.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Make the running agent re-read its config file (or FILE) and apply what changed in
    /// place; prints one line per change. Exits 2, and nothing changes, when the config is
    /// refused.
    #[command(
        after_help = "Examples:\n  lb-agent reload\n  lb-agent reload --config /etc/lb/lb.toml"
    )]
    Reload {
        /// The config file to load (default: the running agent's); its control socket is
        /// where the agent is asked.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Replace the running agent with the lb-agent binary now on disk (an upgrade), in
    /// place: the data plane keeps forwarding, flows, health and VRRP mastership carry over.
    /// Waits until the new agent serves.
    #[command(
        after_help = "Examples:\n  lb-agent restart\n  lb-agent restart --config /etc/lb/lb.toml --timeout 2m"
    )]
    Restart {
        /// The config file the new agent runs with (default: the running agent's); its
        /// control socket is where the agent is asked.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// How long to wait for the new agent to serve (a duration: 30s, 2m).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// This binary's version and the map layout it uses.
    #[command(after_help = "Examples:\n  lb-agent version\n  lb-agent version --json")]
    Version {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending new connections to a backend; its connections are kept.
    #[command(
        after_help = "Example (an apiserver about to be upgraded):\n  lb-agent drain kube-apiserver master02"
    )]
    Drain {
        /// The VIP's name (`name` of its [[vip]] in the config).
        vip: String,
        /// The backend's name (`name` of its [[vip.backend]]).
        backend: String,
        /// The config file whose control socket the running agent listens on (default:
        /// /run/lb-agent.sock).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Undo `drain`: the backend gets new connections again.
    #[command(after_help = "Example:\n  lb-agent undrain kube-apiserver master02")]
    Undrain {
        /// The VIP's name (`name` of its [[vip]] in the config).
        vip: String,
        /// The backend's name (`name` of its [[vip.backend]]).
        backend: String,
        /// The config file whose control socket the running agent listens on (default:
        /// /run/lb-agent.sock).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Prepare this apiserver host to be a backend of a DSR VIP (run as root on it): the VIP
    /// on a local device, no ARP for it, and for dsr-ipip a way to take the LB's IPIP in.
    /// Prints one line per change; a second run changes nothing.
    #[command(
        after_help = "Examples:\n  lb-agent backend-setup --mode dsr-l2 --vip 198.18.0.100\n  lb-agent backend-setup --mode dsr-ipip --vip 198.18.0.100 --dry-run\n  lb-agent backend-setup --mode dsr-l2 --vip 198.18.0.100 --undo"
    )]
    BackendSetup(backend_setup::Options),
    /// Translate an HAProxy + keepalived setup (the kubeadm HA guide's, Kubespray's) into an
    /// lb.toml, with a comment for everything lb does differently (each also one line on
    /// stderr). Exits 2, naming the file and line, when something cannot be translated.
    #[command(after_help = "Examples:
  lb-agent import --haproxy /etc/haproxy/haproxy.cfg --keepalived /etc/keepalived/keepalived.conf \\
      --check-script /etc/keepalived/check_apiserver.sh --output /etc/lb/lb.toml
  lb-agent import --haproxy haproxy.cfg --interface eth0 > lb.toml

Then: lb-agent check-config --config /etc/lb/lb.toml (docs/migration.md).")]
    Import(ImportArgs),
    /// Print a manifest that runs the agent under another supervisor than systemd.
    #[command(
        after_help = "Example:\n  lb-agent manifest static-pod > /etc/kubernetes/manifests/lb-agent.yaml"
    )]
    Manifest {
        #[command(subcommand)]
        kind: ManifestKind,
    },
    /// Testing and packaging aids (fault injection, man page, completions); not for
    /// production use.
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
    /// Show what is in the data plane's maps and what the agent says.
    #[command(
        after_help = "Examples:\n  lb-agent status\n  lb-agent status --json --config /etc/lb/lb.toml"
    )]
    Status {
        /// Config file, for its pin path and control socket (defaults otherwise).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change the running agent's log level until it restarts (or a reload changes
    /// agent.log_level).
    #[command(
        after_help = "Examples:\n  lb-agent log-level debug\n  lb-agent log-level info,lb_agent::health=debug --config /etc/lb/lb.toml"
    )]
    LogLevel {
        /// A level (error, warn, info, debug, trace) or a tracing filter (RUST_LOG syntax).
        level: String,
        /// Config file, for its control socket (default: /etc/lb/lb.toml's, else /run/lb-agent.sock).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ManifestKind {
    /// A Kubernetes static pod (YAML) for a control-plane node's /etc/kubernetes/manifests.
    #[command(
        after_help = "Example:\n  lb-agent manifest static-pod --config /etc/lb/lb.toml > /etc/kubernetes/manifests/lb-agent.yaml"
    )]
    StaticPod(manifest::StaticPodOptions),
}

/// `lb-agent import`'s command line.
#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("input")
        .required(true)
        .multiple(true)
        .args(["haproxy", "keepalived"])
))]
struct ImportArgs {
    /// haproxy.cfg: its frontend + backend pairs and listen blocks (mode tcp) become the
    /// VIPs, their servers the backends, their checks the probes.
    #[arg(long, value_name = "FILE")]
    haproxy: Option<PathBuf>,
    /// keepalived.conf: its vrrp_instance becomes [vrrp], its virtual_ipaddress the VIPs'
    /// addresses.
    #[arg(long, value_name = "FILE")]
    keepalived: Option<PathBuf>,
    /// The script a vrrp_script runs (e.g. /etc/keepalived/check_apiserver.sh): read to
    /// choose which of lb's own tracking stands in for it ([vrrp.track]).
    #[arg(long, value_name = "FILE")]
    check_script: Option<PathBuf>,
    /// The LB host's NIC: agent.interface, where XDP attaches and VRRP runs (default:
    /// keepalived's interface; required without --keepalived).
    #[arg(long, value_name = "NAME")]
    interface: Option<String>,
    /// Write the lb.toml to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Configure a failpoint in the running agent (agents built with `failpoints` only),
    /// e.g. `vrrp-loop panic` or `map-write 1*return`.
    Failpoint {
        /// The failpoint's name, e.g. vrrp-loop.
        name: String,
        /// What it does, in the `fail` crate's syntax, e.g. panic or 1*return.
        actions: String,
        /// The config file whose control socket the running agent listens on.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the man page (roff, section 8) generated from this command line.
    Man,
    /// Print a shell completion script generated from this command line.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `lb-agent debug man`: lb-agent(8), the top-level page (the subcommands are in its
/// SUBCOMMANDS section; `lb-agent help COMMAND` has their arguments).
fn man_page() -> ExitCode {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .section("8")
        .render(&mut page)
        .expect("rendering into memory");
    write_stdout(&page, "the man page")
}

fn write_stdout(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: writing {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status for a mistake in the config file.
const EXIT_CONFIG: u8 = 2;
/// Exit status of `status` when no agent is running.
const EXIT_NOT_RUNNING: u8 = 3;

/// Loads and validates `path` against this host; prints the one-line error on failure.
fn load_config(path: &std::path::Path, rt: &tokio::runtime::Runtime) -> Result<Config, ExitCode> {
    let fail = |e: config::ConfigError| {
        eprintln!("lb-agent: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    rt.block_on(lb_agent::host::load_checked(path))
        .map_err(fail)
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

/// Sends the request `make` builds (from `--config` as an absolute path) to the agent whose
/// control socket `--config` names (the default one otherwise); the answer, or the exit
/// status of a failure to ask, said on stderr.
fn ask(
    config: Option<PathBuf>,
    make: impl FnOnce(Option<String>) -> Request,
) -> Result<control::Response, ExitCode> {
    let file = config.as_ref().map(|c| {
        std::path::absolute(c)
            .unwrap_or_else(|_| c.clone())
            .display()
            .to_string()
    });
    let (_, sock) = paths(config)?;
    control::request(&sock, &make(file)).map_err(|e| match e {
        e @ control::ControlError::Denied { .. } => {
            eprintln!("lb-agent: {e}");
            ExitCode::FAILURE
        }
        e => {
            eprintln!("lb-agent: is the agent running? {e}");
            ExitCode::from(EXIT_NOT_RUNNING)
        }
    })
}

/// Prints what the agent did, or says why it refused and exits with `refused`.
fn answered(r: control::Response, refused: ExitCode) -> ExitCode {
    if r.ok {
        println!("{}", r.message.unwrap_or_default());
        ExitCode::SUCCESS
    } else {
        eprintln!("lb-agent: {}", r.error.unwrap_or_default());
        refused
    }
}

/// `drain`, `undrain`, `debug failpoint` through the control socket.
fn drain(config: Option<PathBuf>, req: Request) -> ExitCode {
    match ask(config, |_| req) {
        Ok(r) => answered(r, ExitCode::FAILURE),
        Err(code) => code,
    }
}

/// `reload` through the control socket: one line per change, or the refusal.
fn reload(config: Option<PathBuf>) -> ExitCode {
    match ask(config, |config| Request::Reload { config }) {
        Ok(r) => answered(r, ExitCode::from(EXIT_CONFIG)),
        Err(code) => code,
    }
}

/// `restart` through the control socket, then waits for the agent that continues it.
fn restart(config: Option<PathBuf>, timeout: std::time::Duration) -> ExitCode {
    let sock = match paths(config.clone()) {
        Ok((_, s)) => s,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    let token = match ask(config, |config| Request::Restart { config }) {
        Ok(r) if r.ok => {
            let token = r.token.clone().unwrap_or_default();
            answered(r, ExitCode::SUCCESS);
            token
        }
        Ok(r) => return answered(r, ExitCode::from(EXIT_CONFIG)),
        Err(code) => return code,
    };
    while started.elapsed() < timeout {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let Ok(r) = control::request(&sock, &Request::Status) else {
            continue;
        };
        let Some(agent) = r.agent else { continue };
        if agent.restarted_by.as_deref() == Some(token.as_str()) {
            println!(
                "restarted: lb-agent {} (pid {}) serving again {} ms after the request",
                agent.version,
                agent.pid,
                started.elapsed().as_millis()
            );
            return ExitCode::SUCCESS;
        }
    }
    eprintln!(
        "lb-agent: the restarted agent did not answer within {}; see its log (journalctl -u lb-agent)",
        humantime::format_duration(timeout)
    );
    ExitCode::FAILURE
}

/// `backend-setup`: its changes, or their commands, on stdout.
fn backend_setup(opts: &backend_setup::Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut out = std::io::stdout();
    rt.block_on(backend_setup::run(opts, &mut out))
        .with_context(|| format!("backend-setup{}", if opts.undo { " --undo" } else { "" }))
}

/// `import`: the lb.toml on stdout (or --output), one line per difference on stderr; a
/// translation error is one line naming the file and line, with exit status 2.
fn import(args: &ImportArgs) -> anyhow::Result<ExitCode> {
    let read = |p: &Option<PathBuf>| p.as_deref().map(import::Source::read).transpose();
    let inputs = (|| {
        Ok::<_, import::ImportError>(import::Inputs {
            haproxy: read(&args.haproxy)?,
            keepalived: read(&args.keepalived)?,
            check_script: read(&args.check_script)?,
            interface: args.interface.clone(),
        })
    })()
    .and_then(|inputs| import::import(&inputs));
    let out = match inputs {
        Ok(out) => out,
        Err(e) => {
            eprintln!("lb-agent: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    for n in &out.notes {
        eprintln!("lb-agent: note: {n}");
    }
    match &args.output {
        Some(path) => std::fs::write(path, &out.toml)
            .with_context(|| format!("writing {}", path.display()))?,
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(out.toml.as_bytes())
                .context("writing to stdout")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let mut b = b;
    b.enable_all().build().map_err(|e| {
        eprintln!("lb-agent: starting the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(f) = cli.log_format {
        logging::set_format_from_cli(f);
    }
    // `run` logs as its config says: read it first (a broken file is reported by `run`).
    let agent = match &cli.cmd {
        Cmd::Run { config } => Config::load(config).ok().map(|c| c.agent),
        _ => None,
    };
    logging::init(
        cli.log_format
            .or(agent.as_ref().map(|a| a.log_format))
            .unwrap_or_default(),
        agent.as_ref().and_then(|a| a.log_level.as_deref()),
    );
    match cli.cmd {
        Cmd::CheckConfig { config } => {
            let rt = match runtime(1) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match load_config(&config, &rt) {
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
            }
        }
        Cmd::Run { config } => {
            // Probes, the control socket and map writes; VRRP runs on a thread of its own.
            let rt = match runtime(2) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let cfg = match load_config(&config, &rt) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match rt.block_on(app::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lb-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Debug {
            cmd:
                DebugCmd::Failpoint {
                    name,
                    actions,
                    config,
                },
        } => drain(config, Request::Failpoint { name, actions }),
        Cmd::Debug { cmd: DebugCmd::Man } => man_page(),
        Cmd::Debug {
            cmd: DebugCmd::Completions { shell },
        } => {
            use clap::CommandFactory;
            // Into a buffer first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb-agent", &mut script);
            write_stdout(&script, "the completion script")
        }
        Cmd::Reload { config } => reload(config),
        Cmd::Import(args) => match import(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("lb-agent: import: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::BackendSetup(opts) => match backend_setup(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Restart { config, timeout } => restart(config, timeout),
        Cmd::Manifest {
            kind: ManifestKind::StaticPod(opts),
        } => match manifest::static_pod(&opts) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lb-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Version { json } => {
            #[allow(unused_mut)]
            let mut v = app::Version::ours();
            // Tests make a binary claim another layout to drive `restart`'s safe path.
            #[cfg(feature = "failpoints")]
            if let Some(l) = std::env::var("LB_FAILPOINT_MAP_LAYOUT")
                .ok()
                .and_then(|l| l.parse().ok())
            {
                v.map_layout_version = l;
            }
            if json {
                println!("{}", serde_json::to_string(&v).expect("serializable"));
            } else {
                println!(
                    "lb-agent {} (map layout {})",
                    v.version, v.map_layout_version
                );
            }
            ExitCode::SUCCESS
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
        Cmd::LogLevel { level, config } => drain(config, Request::LogLevel { level }),
        Cmd::Status { config, json } => {
            let (pin, sock) = match paths(config) {
                Ok(p) => p,
                Err(code) => return code,
            };
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
