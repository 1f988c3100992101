//! Parsing and validation of lb's TOML configuration file.
//!
//! Deserialization goes through permissive "raw" structs (every field optional,
//! integers as `i64`, enums as strings) so that serde only rejects unknown keys
//! and wrong TOML types; everything else is checked by hand here, which lets
//! every error name the exact field (`vip[0].backend[1].address`) and say what
//! is wrong in one line.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

pub mod diff;
mod discovery;
mod vrrp;
pub use discovery::{check_backends, DiscoveryConfig, DEFAULT_KUBECONFIG};
use discovery::{validate_discovery, RawDiscovery};
use vrrp::{validate_vrrp, RawVrrp};
pub use vrrp::{NotifyConfig, TrackConfig, VrrpConfig};

// Names are NUL-padded in the maps, so at most NAME_LEN - 1 bytes.
use lb_common::{
    DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_PATH, MAX_BACKENDS, MAX_MAGLEV_SIZE, MAX_VIPS, NAME_LEN,
};

/// Linux IFNAMSIZ is 16 including the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;
/// Weights are relative; the cap keeps the Maglev fill loop short (see maglev.rs).
const MAX_WEIGHT: i64 = 10_000;
/// A backend's weight when the config (or discovery) gives none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The Maglev paper keeps every backend within ~1% of its fair share with M >= 100 N.
const SLOTS_PER_BACKEND: u64 = 100;
const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);
/// Ports below this are privileged/well-known; SNAT must not steal them.
const MIN_SNAT_PORT: u32 = 1024;
/// `mss_clamp` bounds. Below 536 (RFC 1122's default MSS, 576 - 40) a clamp would ask
/// clients for segments smaller than any IPv4 host is allowed to assume; above 9000 (a
/// jumbo frame) it would never lower anything a real link carries.
const MSS_CLAMP_RANGE: std::ops::RangeInclusive<i64> = 536..=9000;
/// A repair is due this long after a map was changed behind the agent's back, at most.
const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
const EPHEMERAL_RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// A validated lb configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file the configuration was read from (used in error messages).
    pub path: PathBuf,
    /// The `[agent]` section.
    pub agent: AgentConfig,
    /// The `[[vip]]` sections, in file order.
    pub vips: Vec<VipConfig>,
    /// The `[vrrp]` section; None = the VIP addresses are placed by other means.
    pub vrrp: Option<VrrpConfig>,
    /// The `[metrics]` section; None = no metrics endpoint.
    pub metrics: Option<MetricsConfig>,
    /// Which file, and which version of it, this config was read from (`load` only).
    pub source: Option<ConfigSource>,
}

/// The identity of a loaded config file: `lb-agent status` shows it, so an operator can
/// tell whether the running agent has the file that is on disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// Absolute (symlinks kept as named: this is the path the operator gave).
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, lower-case hex.
    pub sha256: String,
    /// Wall-clock time the file was read.
    pub loaded: SystemTime,
}

impl ConfigSource {
    /// The identity of `bytes`, read from `path` now.
    pub fn new(path: &Path, bytes: &[u8]) -> ConfigSource {
        ConfigSource {
            // Only fails for an empty path, which could not have been read.
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            sha256: sha256_hex(bytes),
            loaded: SystemTime::now(),
        }
    }
}

/// SHA-256 of `bytes` as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The `[agent]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// NIC the XDP program attaches to; None when every VIP is in socket mode (no XDP).
    pub interface: Option<String>,
    /// How to attach the XDP program.
    pub xdp_mode: XdpModeSetting,
    /// bpffs directory where maps and links are pinned.
    pub pin_path: PathBuf,
    /// Unix socket of the agent's control interface.
    pub control_socket: PathBuf,
    /// Group that may use the control socket (mode 0660); None = root only (0600).
    pub control_socket_group: Option<String>,
    /// How often the agent compares the maps with what it intends and repairs them.
    pub reconcile_interval: Duration,
    /// Connections the flow table holds (FLOWS has an entry per direction).
    pub max_flows: u32,
    /// What a reload does with the connections of a backend it removes.
    pub removed_backends: RemovedBackends,
    /// The cgroup (v2) whose processes socket-mode VIPs serve; None: the root cgroup.
    pub cgroup: Option<PathBuf>,
    /// `log_level`: a level or tracing filter; RUST_LOG wins over it. None: info.
    pub log_level: Option<String>,
    /// `log_format`: text, or JSON lines; `--log-format` wins over it.
    pub log_format: crate::logging::LogFormat,
}

/// `agent.removed_backends`: what happens to the connections of a backend that a reload
/// takes out of the config (or whose VIP it takes out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemovedBackends {
    /// Kept until they end, like a drained backend's (unless its probes then find it
    /// unreachable): an apiserver's watches are never cut for less than the backend dying.
    #[default]
    Drain,
    /// Reset at their next packet, like an unreachable backend's: clients reconnect at once.
    Reset,
}

/// XDP attach mode requested in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XdpModeSetting {
    /// Native (driver) mode if the NIC supports it, generic (skb) mode otherwise.
    Auto,
    /// Driver mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// One `[[vip]]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    /// Unique VIP name.
    pub name: String,
    /// Virtual IPv4 address clients connect to.
    pub address: Ipv4Addr,
    /// Virtual port clients connect to.
    pub port: u16,
    /// L4 protocol.
    pub protocol: Protocol,
    /// Forwarding mode.
    pub mode: Mode,
    /// Source address for NAT towards backends; `None` = the interface's primary IPv4.
    pub snat_address: Option<Ipv4Addr>,
    /// Inclusive source port range used for NAT towards backends.
    pub snat_ports: (u16, u16),
    /// Maglev table size M (prime).
    pub maglev_table_size: u32,
    /// Largest MSS the VIP's SYNs and SYN-ACKs may announce; None = left as they are.
    pub mss_clamp: Option<u16>,
    /// dsr-ipip: the network outer source addresses are taken from, one per flow (address,
    /// prefix length).
    pub ipip_source: (Ipv4Addr, u8),
    /// Backends, in file order.
    pub backends: Vec<BackendConfig>,
    /// The `[vip.health]` section (defaults when absent).
    pub health: HealthConfig,
    /// `[vip.discovery]` with `kubernetes = true`: the backends above are a seed, replaced
    /// by the apiservers the `kubernetes` EndpointSlice lists (`crate::discovery`).
    pub discovery: Option<DiscoveryConfig>,
}

/// How the agent probes a VIP's backends (`[vip.health]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Probe kind.
    pub kind: HealthKind,
    /// HTTP path requested (https and http).
    pub path: String,
    /// Status a healthy backend answers.
    pub expect_status: u16,
    /// Time between the starts of two probes of one backend.
    pub interval: Duration,
    /// A probe not finished after this long has failed.
    pub timeout: Duration,
    /// Consecutive successes to go up.
    pub rise: u32,
    /// Consecutive failures to go down.
    pub fall: u32,
    /// CA the backends' certificates must chain to (https unless insecure_skip_verify).
    pub ca_file: PathBuf,
    /// Do not verify the backends' certificates at all (explicit opt-in).
    pub insecure_skip_verify: bool,
    /// Name sent as SNI and verified; None = the backend's address.
    pub server_name: Option<String>,
    /// Client certificate and key presented to the backends.
    pub client_cert: Option<PathBuf>,
    /// Key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Probe kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthKind {
    /// TLS handshake, then HTTP/1.1 GET `path`.
    Https,
    /// HTTP/1.1 GET `path` in clear.
    Http,
    /// A TCP connect.
    Tcp,
    /// No probes: every backend is up.
    None,
}

/// The CA a kubeadm control-plane node has: the default `health.ca_file`.
pub const DEFAULT_CA_FILE: &str = "/etc/kubernetes/pki/ca.crt";

impl HealthConfig {
    /// No probes: every backend counts as up.
    pub fn none() -> Self {
        Self {
            kind: HealthKind::None,
            ..Self::default()
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::Https,
            path: "/readyz".into(),
            expect_status: 200,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            ca_file: PathBuf::from(DEFAULT_CA_FILE),
            insecure_skip_verify: false,
            server_name: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// L4 protocol of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
}

/// Forwarding mode of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Full NAT: destination and source are rewritten.
    Nat,
    /// Direct server return on the LB's segment: only the destination MAC is rewritten.
    DsrL2,
    /// Direct server return through IPv4-in-IPv4 to the backend's address.
    DsrIpip,
    /// Node-local: cgroup hooks connect this host's own sockets to a backend at connect().
    Socket,
}

impl Mode {
    /// The name the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::DsrL2 => "dsr-l2",
            Mode::DsrIpip => "dsr-ipip",
            Mode::Socket => "socket",
        }
    }

    /// True for the modes where backends answer clients directly.
    pub fn is_dsr(self) -> bool {
        matches!(self, Mode::DsrL2 | Mode::DsrIpip)
    }

    /// True for the one mode whose packets take the LB's own addresses and ports (SNAT).
    pub fn uses_snat(self) -> bool {
        self == Mode::Nat
    }
}

/// Default `ipip_source`: private addresses no LB or backend holds, as Katran uses. Only
/// the backend's tunnel endpoint sees them.
pub const DEFAULT_IPIP_SOURCE: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 0, 0), 16);

/// One `[[vip.backend]]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Stable identity; the Maglev permutation is derived from it.
    pub name: String,
    /// Backend IPv4 address.
    pub address: Ipv4Addr,
    /// Backend port.
    pub port: u16,
    /// Relative weight; 0 drains the backend.
    pub weight: u32,
}

/// One line naming the file, the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {field}: {message}", file.display())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Field path such as `vip[0].backend[1].address`, or `(file)` / `(syntax)`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(file: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            field: field.into(),
            // Callers log these as single lines; toml/serde messages may span several.
            message: one_line(&message.into()),
        }
    }
}

/// A validation failure before the file name is attached.
#[derive(Debug)]
pub(crate) struct Issue {
    field: String,
    message: String,
}

pub(crate) fn issue(field: impl Into<String>, message: impl Into<String>) -> Issue {
    Issue {
        field: field.into(),
        message: message.into(),
    }
}

impl Issue {
    fn into_error(self, file: &Path) -> ConfigError {
        ConfigError::new(file, self.field, self.message)
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cannot_read = |e: &dyn std::fmt::Display| {
            ConfigError::new(path, "(file)", format!("cannot read: {e}"))
        };
        // One read: the hash is of exactly the bytes that were parsed.
        let bytes = std::fs::read(path).map_err(|e| cannot_read(&e))?;
        let source = ConfigSource::new(path, &bytes);
        let text = String::from_utf8(bytes).map_err(|e| cannot_read(&e))?;
        let mut config = Self::parse(path, &text)?;
        config.source = Some(source);
        Ok(config)
    }

    /// Parses and validates `text`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = deserialize(text).map_err(|i| i.into_error(path))?;
        let raw_vrrp = raw.vrrp;
        let metrics = match raw.metrics {
            None => None,
            Some(m) => Some(validate_metrics(m).map_err(|i| i.into_error(path))?),
        };
        let (agent, vips) = validate(RawConfig {
            vrrp: None,
            metrics: None,
            ..raw
        })
        .map_err(|i| i.into_error(path))?;
        let vrrp = match raw_vrrp {
            None => None,
            Some(v) => Some(validate_vrrp(v, &agent, &vips).map_err(|i| i.into_error(path))?),
        };
        Ok(Config {
            path: path.to_path_buf(),
            agent,
            vips,
            vrrp,
            metrics,
            source: None,
        })
    }

    /// Checks against this host: `ephemeral` is the kernel's ip_local_port_range.
    pub fn check_port_ranges(&self, ephemeral: (u16, u16)) -> Result<(), ConfigError> {
        let (e_lo, e_hi) = ephemeral;
        for (i, vip) in self.vips.iter().enumerate() {
            if !vip.mode.uses_snat() {
                continue;
            }
            let (lo, hi) = vip.snat_ports;
            // The kernel picks source ports for the host's own sockets from the
            // ephemeral range without knowing about our NAT state, so a shared
            // port could make a reply land in the wrong flow.
            if lo <= e_hi && e_lo <= hi {
                return Err(ConfigError::new(
                    &self.path,
                    format!("vip[{i}].snat_ports"),
                    format!(
                        "{lo}-{hi} overlaps the kernel's ephemeral port range {e_lo}-{e_hi} \
                         (net.ipv4.ip_local_port_range); the agent's own connections use that range"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reads the kernel's ephemeral port range from /proc/sys/net/ipv4/ip_local_port_range.
pub fn read_ephemeral_range() -> std::io::Result<(u16, u16)> {
    let text = std::fs::read_to_string(EPHEMERAL_RANGE_PATH)?;
    parse_ephemeral_range(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{EPHEMERAL_RANGE_PATH}: expected two port numbers, got {text:?}"),
        )
    })
}

fn parse_ephemeral_range(text: &str) -> Option<(u16, u16)> {
    let mut words = text.split_whitespace();
    let lo: u16 = words.next()?.parse().ok()?;
    let hi: u16 = words.next()?.parse().ok()?;
    if words.next().is_some() || lo > hi {
        return None;
    }
    Some((lo, hi))
}

/// Returns whether `n` is a prime number.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

// ---------------------------------------------------------------------------
// Raw (unvalidated) file structure.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a TOML document")]
struct RawConfig {
    agent: Option<RawAgent>,
    #[serde(default)]
    vip: Vec<RawVip>,
    vrrp: Option<RawVrrp>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [metrics] table")]
struct RawMetrics {
    listen: Option<String>,
}

/// The `[metrics]` section: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: std::net::SocketAddr,
}

fn validate_metrics(raw: RawMetrics) -> Result<MetricsConfig, Issue> {
    let port = crate::metrics::DEFAULT_PORT;
    let listen = match raw.listen.as_deref() {
        None => std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        Some(s) => match s.parse::<std::net::SocketAddr>() {
            Ok(a) => a,
            // An address alone gets the default port.
            Err(_) => match s.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                Ok(ip) => std::net::SocketAddr::new(ip, port),
                Err(_) => {
                    return Err(issue(
                        "metrics.listen",
                        format!("{s:?} is not an address and port like \"0.0.0.0:{port}\""),
                    ))
                }
            },
        },
    };
    Ok(MetricsConfig { listen })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "an [agent] table")]
struct RawAgent {
    interface: Option<String>,
    xdp_mode: Option<String>,
    pin_path: Option<String>,
    control_socket: Option<String>,
    control_socket_group: Option<String>,
    reconcile_interval: Option<String>,
    max_flows: Option<i64>,
    removed_backends: Option<String>,
    cgroup: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[vip]] table")]
struct RawVip {
    name: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    protocol: Option<String>,
    mode: Option<String>,
    snat_address: Option<String>,
    snat_ports: Option<String>,
    maglev_table_size: Option<i64>,
    mss_clamp: Option<i64>,
    ipip_source: Option<String>,
    health: Option<RawHealth>,
    discovery: Option<RawDiscovery>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [vip.health] table")]
struct RawHealth {
    kind: Option<String>,
    path: Option<String>,
    expect_status: Option<i64>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
    ca_file: Option<String>,
    insecure_skip_verify: Option<bool>,
    server_name: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[vip.backend]] table")]
struct RawBackend {
    name: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
}

fn deserialize(text: &str) -> Result<RawConfig, Issue> {
    // A plain parse first separates syntax errors (no field path, but a
    // position) from type/unknown-key errors (a field path).
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return Err(issue("(syntax)", syntax_message(text, &e)));
    }
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let path = e.path().to_string();
        describe_serde_error(path, e.inner().message())
    })
}

fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = one_line(e.message());
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn describe_serde_error(path: String, message: &str) -> Issue {
    let path = if path == "." { String::new() } else { path };
    if let Some(key) = unknown_field_name(message) {
        // serde_path_to_error stops at the table holding the unknown key.
        let field = if path.is_empty() {
            key.to_string()
        } else if path == key || path.ends_with(&format!(".{key}")) {
            path.clone()
        } else {
            format!("{path}.{key}")
        };
        return issue(field, format!("unknown field \"{key}\""));
    }
    let field = if path.is_empty() {
        "(root)".to_string()
    } else {
        path
    };
    let mut message = reword_serde_message(message);
    if message.contains("invalid type: table, expected an array") {
        // The usual cause is `[vip]` written for `[[vip]]`.
        let header: String = field
            .split('.')
            .map(|seg| seg.split('[').next().unwrap_or(seg))
            .collect::<Vec<_>>()
            .join(".");
        message.push_str(&format!(" (write [[{header}]] for each entry)"));
    }
    issue(field, message)
}

/// Extracts `bogus` from serde's "unknown field `bogus`, expected ...".
fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.split_once("unknown field `")?.1;
    Some(rest.split_once('`')?.0)
}

/// Replaces Rust/serde vocabulary with TOML vocabulary.
fn reword_serde_message(message: &str) -> String {
    one_line(message)
        .replace("expected i64", "expected an integer")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("expected a sequence", "expected an array")
        .replace('`', "")
}

// ---------------------------------------------------------------------------
// Validation, in file order; the first problem wins.

fn validate(raw: RawConfig) -> Result<(AgentConfig, Vec<VipConfig>), Issue> {
    let agent = validate_agent(raw.agent)?;

    if raw.vip.is_empty() {
        return Err(issue("vip", "at least one [[vip]] is required"));
    }
    if raw.vip.len() > MAX_VIPS as usize {
        return Err(issue(
            "vip",
            format!(
                "{} VIPs configured; at most {MAX_VIPS} are supported",
                raw.vip.len()
            ),
        ));
    }

    let mut vips: Vec<VipConfig> = Vec::with_capacity(raw.vip.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut endpoints: HashMap<(Ipv4Addr, u16, Protocol), usize> = HashMap::new();
    let mut total_backends = 0usize;
    for (i, rv) in raw.vip.into_iter().enumerate() {
        let vip = validate_vip(i, rv, &mut names, &mut endpoints)?;
        total_backends += vip.backends.len();
        if total_backends > MAX_BACKENDS as usize {
            return Err(issue(
                format!("vip[{i}].backend"),
                format!(
                    "this VIP brings the number of backends to {total_backends}; \
                     at most {MAX_BACKENDS} are supported across all VIPs"
                ),
            ));
        }
        vips.push(vip);
    }
    if agent.interface.is_none() {
        if let Some(i) = vips.iter().position(|v| v.mode != Mode::Socket) {
            return Err(issue(
                "agent.interface",
                format!(
                    "required: vip[{i}] is in {} mode (only a config whose every VIP has mode = \"socket\" runs without XDP and an interface)",
                    vips[i].mode.as_str()
                ),
            ));
        }
    }
    Ok((agent, vips))
}

fn validate_agent(raw: Option<RawAgent>) -> Result<AgentConfig, Issue> {
    // `validate` checks that only an all-socket config leaves the interface out.
    let raw = raw.unwrap_or_default();
    let interface = match raw.interface {
        None => None,
        Some(s) => Some(validate_ifname(s).map_err(|m| issue("agent.interface", m))?),
    };
    let xdp_mode = match raw.xdp_mode.as_deref() {
        None | Some("auto") => XdpModeSetting::Auto,
        Some("native") => XdpModeSetting::Native,
        Some("generic") => XdpModeSetting::Generic,
        Some(other) => {
            return Err(issue(
                "agent.xdp_mode",
                format!(
                    "{other:?} is not a valid xdp_mode; valid values: \"auto\", \"native\", \"generic\""
                ),
            ))
        }
    };
    let pin_path = non_empty_path("agent.pin_path", raw.pin_path, DEFAULT_PIN_PATH)?;
    let control_socket = non_empty_path(
        "agent.control_socket",
        raw.control_socket,
        DEFAULT_CONTROL_SOCKET,
    )?;
    let control_socket_group = match raw.control_socket_group {
        None => None,
        Some(g) if g.is_empty() || g.contains(':') || g.chars().any(char::is_whitespace) => {
            return Err(issue(
                "agent.control_socket_group",
                format!("{g:?} is not a group name"),
            ))
        }
        Some(g) => Some(g),
    };
    let reconcile_interval = match raw.reconcile_interval {
        None => DEFAULT_RECONCILE_INTERVAL,
        Some(s) => {
            let d = humantime::parse_duration(&s).map_err(|e| {
                issue(
                    "agent.reconcile_interval",
                    format!("{s:?} is not a duration like \"10s\": {e}"),
                )
            })?;
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
                return Err(issue(
                    "agent.reconcile_interval",
                    format!("{s:?}: between 100ms and 1h"),
                ));
            }
            d
        }
    };
    let max_flows = match raw.max_flows {
        None => lb_common::MAX_FLOWS,
        Some(n) if (MIN_MAX_FLOWS as i64..=MAX_MAX_FLOWS as i64).contains(&n) => n as u32,
        Some(n) => {
            return Err(issue(
                "agent.max_flows",
                format!("{n}: between {MIN_MAX_FLOWS} and {MAX_MAX_FLOWS} connections"),
            ))
        }
    };
    let removed_backends = match raw.removed_backends.as_deref() {
        None | Some("drain") => RemovedBackends::Drain,
        Some("reset") => RemovedBackends::Reset,
        Some(other) => {
            return Err(issue(
                "agent.removed_backends",
                format!("{other:?}: valid values: \"drain\", \"reset\""),
            ))
        }
    };
    let cgroup = match raw.cgroup {
        None => None,
        Some(c) if c.starts_with('/') => Some(PathBuf::from(c)),
        Some(c) => {
            return Err(issue(
                "agent.cgroup",
                format!(
                "{c:?} is not an absolute path (a cgroup v2 directory, e.g. \"/sys/fs/cgroup\")"
            ),
            ))
        }
    };
    let log_level = match raw.log_level {
        None => None,
        Some(l) => {
            crate::logging::parse_level(&l).map_err(|m| issue("agent.log_level", m))?;
            Some(l)
        }
    };
    // The names `--log-format` takes, from the same enum.
    let log_format = match raw.log_format.as_deref() {
        None => crate::logging::LogFormat::default(),
        Some(f) => {
            <crate::logging::LogFormat as clap::ValueEnum>::from_str(f, false).map_err(|_| {
                issue(
                    "agent.log_format",
                    format!("{f:?}: valid values: \"text\", \"json\""),
                )
            })?
        }
    };
    Ok(AgentConfig {
        log_level,
        log_format,
        interface,
        xdp_mode,
        pin_path,
        control_socket,
        control_socket_group,
        reconcile_interval,
        max_flows,
        removed_backends,
        cgroup,
    })
}

/// Fewest connections `agent.max_flows` accepts: below this a busy control plane evicts.
pub const MIN_MAX_FLOWS: u32 = 1024;
/// Most connections `agent.max_flows` accepts (about 1.3 GiB of kernel memory).
pub const MAX_MAX_FLOWS: u32 = 8 << 20;

/// Mirrors the kernel's dev_valid_name() so a bad name fails here rather than at attach time.
pub(crate) fn validate_ifname(name: String) -> Result<String, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!(
            "{name:?} is {} bytes long; Linux interface names are at most {MAX_IFNAME_LEN} bytes",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(format!(
            "{name:?} is not a valid interface name (no '/', ':', NUL or whitespace)"
        ));
    }
    Ok(name)
}

fn non_empty_path(field: &str, value: Option<String>, default: &str) -> Result<PathBuf, Issue> {
    match value {
        None => Ok(PathBuf::from(default)),
        Some(s) if s.is_empty() => Err(issue(field, "must not be empty")),
        Some(s) => Ok(PathBuf::from(s)),
    }
}

fn validate_vip(
    i: usize,
    raw: RawVip,
    names: &mut HashMap<String, usize>,
    endpoints: &mut HashMap<(Ipv4Addr, u16, Protocol), usize>,
) -> Result<VipConfig, Issue> {
    let at = |field: &str| format!("vip[{i}].{field}");

    let name = validate_name(&at("name"), raw.name)?;
    if let Some(&first) = names.get(&name) {
        return Err(issue(
            at("name"),
            format!("duplicate VIP name {name:?} (also vip[{first}])"),
        ));
    }
    names.insert(name.clone(), i);

    let address = validate_ipv4(&at("address"), raw.address.as_deref())?;
    let port = validate_port(&at("port"), raw.port, None)?;
    let protocol = match raw.protocol.as_deref() {
        None | Some("tcp") => Protocol::Tcp,
        Some(other) => {
            return Err(issue(
                at("protocol"),
                format!("{other:?} is not supported; valid values: \"tcp\""),
            ))
        }
    };
    if let Some(&first) = endpoints.get(&(address, port, protocol)) {
        return Err(issue(
            at("address"),
            format!("duplicate VIP {address}:{port}/tcp (also vip[{first}])"),
        ));
    }
    endpoints.insert((address, port, protocol), i);

    let mode = match raw.mode.as_deref() {
        None | Some("nat") => Mode::Nat,
        Some("dsr-l2") => Mode::DsrL2,
        Some("dsr-ipip") => Mode::DsrIpip,
        Some("socket") => Mode::Socket,
        Some(other) => {
            return Err(issue(
                at("mode"),
                format!(
                    "{other:?} is not a valid mode; valid values: \"nat\", \"dsr-l2\", \"dsr-ipip\", \"socket\""
                ),
            ))
        }
    };
    if mode == Mode::Socket {
        // The kernel connects the socket to the backend itself: no packet is rewritten.
        for (field, set) in [
            ("snat_address", raw.snat_address.is_some()),
            ("snat_ports", raw.snat_ports.is_some()),
            ("mss_clamp", raw.mss_clamp.is_some()),
        ] {
            if set {
                return Err(issue(
                    at(field),
                    "not used in socket mode (connect() goes to the backend directly, no packet is rewritten); remove it".to_string(),
                ));
            }
        }
    }
    if mode.is_dsr() {
        // Backends answer clients from the VIP itself: there is no SNAT to configure.
        for (field, set) in [
            ("snat_address", raw.snat_address.is_some()),
            ("snat_ports", raw.snat_ports.is_some()),
        ] {
            if set {
                return Err(issue(
                    at(field),
                    format!(
                        "not used in {} mode (backends reply to clients directly); remove it",
                        mode.as_str()
                    ),
                ));
            }
        }
    }
    let ipip_source = match raw.ipip_source.as_deref() {
        None => DEFAULT_IPIP_SOURCE,
        Some(_) if mode != Mode::DsrIpip => {
            return Err(issue(
                at("ipip_source"),
                format!(
                    "only used in dsr-ipip mode, not {}; remove it",
                    mode.as_str()
                ),
            ))
        }
        Some(s) => parse_cidr(s).map_err(|m| issue(at("ipip_source"), m))?,
    };

    let snat_address = match raw.snat_address.as_deref() {
        None => None,
        Some(s) => Some(validate_ipv4(&at("snat_address"), Some(s))?),
    };
    let snat_ports = match raw.snat_ports.as_deref() {
        None => DEFAULT_SNAT_PORTS,
        Some(s) => parse_snat_ports(s).map_err(|m| issue(at("snat_ports"), m))?,
    };

    let maglev_table_size = validate_table_size(
        &at("maglev_table_size"),
        raw.maglev_table_size,
        raw.backend.len(),
    )?;

    let mss_clamp = match raw.mss_clamp {
        None => None,
        Some(n) if MSS_CLAMP_RANGE.contains(&n) => Some(n as u16),
        Some(n) => {
            return Err(issue(
                at("mss_clamp"),
                format!(
                    "{n} is out of range ({}-{}, bytes of TCP payload per segment)",
                    MSS_CLAMP_RANGE.start(),
                    MSS_CLAMP_RANGE.end()
                ),
            ))
        }
    };

    if raw.backend.is_empty() {
        return Err(issue(
            at("backend"),
            "at least one [[vip.backend]] is required",
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backend.len());
    let mut backend_names: HashMap<String, usize> = HashMap::new();
    let mut backend_endpoints: HashMap<(Ipv4Addr, u16), usize> = HashMap::new();
    for (j, rb) in raw.backend.into_iter().enumerate() {
        let bat = |field: &str| format!("vip[{i}].backend[{j}].{field}");

        let name = validate_name(&bat("name"), rb.name)?;
        if let Some(&first) = backend_names.get(&name) {
            return Err(issue(
                bat("name"),
                format!("duplicate backend name {name:?} (also vip[{i}].backend[{first}])"),
            ));
        }
        backend_names.insert(name.clone(), j);

        let address = validate_ipv4(&bat("address"), rb.address.as_deref())?;
        let bport = validate_port(&bat("port"), rb.port, Some(port))?;
        if mode.is_dsr() && bport != port {
            return Err(issue(
                bat("port"),
                format!(
                    "{bport} differs from the VIP's port {port}: in {} mode packets reach the \
                     backend unchanged, so it must listen on the VIP's port",
                    mode.as_str()
                ),
            ));
        }
        if let Some(&first) = backend_endpoints.get(&(address, bport)) {
            return Err(issue(
                bat("address"),
                format!("duplicate backend {address}:{bport} (also vip[{i}].backend[{first}])"),
            ));
        }
        backend_endpoints.insert((address, bport), j);

        let weight = match rb.weight {
            None => DEFAULT_WEIGHT,
            Some(w) if (0..=MAX_WEIGHT).contains(&w) => w as u32,
            Some(w) => {
                return Err(issue(
                    bat("weight"),
                    format!("{w} is out of range (0-{MAX_WEIGHT}; 0 drains the backend)"),
                ))
            }
        };
        backends.push(BackendConfig {
            name,
            address,
            port: bport,
            weight,
        });
    }

    let health = match raw.health {
        None => HealthConfig::default(),
        Some(h) => validate_health(i, h)?,
    };
    let discovery = match raw.discovery {
        None => None,
        Some(d) => validate_discovery(i, d)?,
    };
    if mode.is_dsr() && health.kind == HealthKind::None {
        // XDP cannot ask for a neighbour's MAC, and a DSR packet must not go to the
        // kernel, which holds the VIP: the probes' own traffic keeps the MACs resolved.
        return Err(issue(
            format!("vip[{i}].health.kind"),
            format!(
                "\"none\" cannot be used in {} mode: the probes are what keep the backends' MAC addresses known to this host",
                mode.as_str()
            ),
        ));
    }

    Ok(VipConfig {
        name,
        address,
        port,
        protocol,
        mode,
        snat_address,
        snat_ports,
        maglev_table_size,
        mss_clamp,
        ipip_source,
        backends,
        health,
        discovery,
    })
}

/// `A.B.C.D/N` (or an address alone, as /32) with no host bits set.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 network such as \"172.16.0.0/16\"");
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    let host = u32::MAX.checked_shr(len as u32).unwrap_or(0);
    if u32::from(addr) & host != 0 {
        return Err(format!(
            "{s:?} has host bits set; write the network address"
        ));
    }
    Ok((addr, len))
}

fn validate_health(i: usize, raw: RawHealth) -> Result<HealthConfig, Issue> {
    let at = |field: &str| format!("vip[{i}].health.{field}");
    let d = HealthConfig::default();
    let kind = match raw.kind.as_deref() {
        None | Some("https") => HealthKind::Https,
        Some("http") => HealthKind::Http,
        Some("tcp") => HealthKind::Tcp,
        Some("none") => HealthKind::None,
        Some(other) => {
            return Err(issue(
                at("kind"),
                format!("{other:?} is not a probe kind; valid values: \"https\", \"http\", \"tcp\", \"none\""),
            ))
        }
    };
    let path = match raw.path {
        None => d.path,
        Some(p) if p.starts_with('/') && !p.chars().any(char::is_whitespace) => p,
        Some(p) => {
            return Err(issue(
                at("path"),
                format!("{p:?} must start with '/' and contain no whitespace"),
            ))
        }
    };
    let expect_status = match raw.expect_status {
        None => d.expect_status,
        Some(s) if (100..=599).contains(&s) => s as u16,
        Some(s) => {
            return Err(issue(
                at("expect_status"),
                format!("{s} is not an HTTP status (100-599)"),
            ))
        }
    };
    let duration = |field: &str, v: Option<String>, default: Duration| -> Result<Duration, Issue> {
        let Some(v) = v else { return Ok(default) };
        let dur = humantime::parse_duration(&v).map_err(|e| {
            issue(
                at(field),
                format!("{v:?} is not a duration like \"500ms\" or \"1s\": {e}"),
            )
        })?;
        if dur < Duration::from_millis(10) || dur > Duration::from_secs(3600) {
            return Err(issue(
                at(field),
                format!("{v:?} is out of range (10ms to 1h)"),
            ));
        }
        Ok(dur)
    };
    let interval = duration("interval", raw.interval, d.interval)?;
    let timeout = duration("timeout", raw.timeout, d.timeout.min(interval))?;
    if timeout > interval {
        return Err(issue(
            at("timeout"),
            format!(
                "{} is longer than the interval ({}): a probe must end before the next starts",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        ));
    }
    let count = |field: &str, v: Option<i64>, default: u32| -> Result<u32, Issue> {
        match v {
            None => Ok(default),
            Some(n) if (1..=100).contains(&n) => Ok(n as u32),
            Some(n) => Err(issue(at(field), format!("{n} is out of range (1-100)"))),
        }
    };
    let rise = count("rise", raw.rise, d.rise)?;
    let fall = count("fall", raw.fall, d.fall)?;
    let nonempty = |field: &str, v: Option<String>| -> Result<Option<String>, Issue> {
        match v {
            Some(s) if s.trim().is_empty() => Err(issue(at(field), "must not be empty")),
            other => Ok(other),
        }
    };
    let ca_file = nonempty("ca_file", raw.ca_file)?
        .map(PathBuf::from)
        .unwrap_or(d.ca_file);
    let server_name = nonempty("server_name", raw.server_name)?;
    let client_cert = nonempty("client_cert", raw.client_cert)?.map(PathBuf::from);
    let client_key = nonempty("client_key", raw.client_key)?.map(PathBuf::from);
    match (&client_cert, &client_key) {
        (Some(_), None) => return Err(issue(at("client_key"), "required with client_cert")),
        (None, Some(_)) => return Err(issue(at("client_cert"), "required with client_key")),
        _ => {}
    }
    Ok(HealthConfig {
        kind,
        path,
        expect_status,
        interval,
        timeout,
        rise,
        fall,
        ca_file,
        insecure_skip_verify: raw.insecure_skip_verify.unwrap_or(false),
        server_name,
        client_cert,
        client_key,
    })
}

fn validate_name(field: &str, value: Option<String>) -> Result<String, Issue> {
    let Some(name) = value else {
        return Err(issue(field, "required"));
    };
    if name.is_empty() {
        return Err(issue(field, "must not be empty"));
    }
    if name.len() > NAME_LEN - 1 {
        return Err(issue(
            field,
            format!(
                "name is {} bytes long; at most {} bytes are allowed",
                name.len(),
                NAME_LEN - 1
            ),
        ));
    }
    // Names are stored NUL-padded in BPF maps; an embedded NUL would truncate them.
    if name.contains('\0') {
        return Err(issue(field, "must not contain NUL bytes"));
    }
    Ok(name)
}

pub(crate) fn validate_ipv4(field: &str, value: Option<&str>) -> Result<Ipv4Addr, Issue> {
    let Some(s) = value else {
        return Err(issue(field, "required"));
    };
    let addr: Ipv4Addr = match s.parse() {
        Ok(a) => a,
        Err(_) if s.parse::<Ipv6Addr>().is_ok() => {
            return Err(issue(
                field,
                format!("{s:?} is an IPv6 address; only IPv4 is supported"),
            ))
        }
        Err(_) => return Err(issue(field, format!("{s:?} is not a valid IPv4 address"))),
    };
    if addr.is_unspecified() {
        return Err(issue(field, format!("{addr} is the unspecified address")));
    }
    if addr.is_multicast() {
        return Err(issue(field, format!("{addr} is a multicast address")));
    }
    if addr.is_broadcast() {
        return Err(issue(field, format!("{addr} is the broadcast address")));
    }
    Ok(addr)
}

fn validate_port(field: &str, value: Option<i64>, default: Option<u16>) -> Result<u16, Issue> {
    match (value, default) {
        (None, Some(d)) => Ok(d),
        (None, None) => Err(issue(field, "required")),
        (Some(p), _) => u16::try_from(p)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| issue(field, format!("{p} is out of range (1-65535)"))),
    }
}

fn parse_snat_ports(s: &str) -> Result<(u16, u16), String> {
    let syntax = || format!("{s:?} is not a port range; expected \"A-B\", e.g. \"61000-65535\"");
    let (a, b) = s.split_once('-').ok_or_else(syntax)?;
    let parse = |t: &str| -> Result<u32, String> {
        let t = t.trim();
        // u32::from_str accepts a leading '+'; a port range should be digits only.
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return Err(syntax());
        }
        t.parse::<u32>().map_err(|_| syntax())
    };
    let (lo, hi) = (parse(a)?, parse(b)?);
    if lo < MIN_SNAT_PORT {
        return Err(format!(
            "{lo}-{hi}: the range must start at {MIN_SNAT_PORT} or above (lower ports are privileged/well-known)"
        ));
    }
    if hi > u32::from(u16::MAX) {
        return Err(format!("{lo}-{hi}: ports must be at most 65535"));
    }
    if lo > hi {
        return Err(format!(
            "{lo}-{hi}: the first port must not be greater than the last"
        ));
    }
    // Bounds were checked above, so these conversions cannot fail.
    Ok((lo as u16, hi as u16))
}

fn validate_table_size(field: &str, value: Option<i64>, backends: usize) -> Result<u32, Issue> {
    let size = value.unwrap_or(i64::from(MAX_MAGLEV_SIZE));
    let needed = SLOTS_PER_BACKEND * backends as u64;
    if size > i64::from(MAX_MAGLEV_SIZE) {
        return Err(issue(
            field,
            format!(
                "{size} is too large (at most {MAX_MAGLEV_SIZE}, the per-VIP table size of the BPF map)"
            ),
        ));
    }
    // `size` is <= MAX_MAGLEV_SIZE here; negative values fail the conversion.
    let size_u32 = u32::try_from(size).unwrap_or(0);
    if !is_prime(size_u32) {
        let want = needed.max(size.max(0) as u64);
        let suggestion = next_prime_at_least(want).unwrap_or(MAX_MAGLEV_SIZE);
        return Err(issue(
            field,
            format!("{size} is not prime (Maglev needs a prime table size; try {suggestion})"),
        ));
    }
    if u64::from(size_u32) < needed {
        let hint = if needed <= u64::from(MAX_MAGLEV_SIZE) {
            format!("try {MAX_MAGLEV_SIZE}")
        } else {
            format!(
                "at most {} backends fit the largest table, {MAX_MAGLEV_SIZE}",
                u64::from(MAX_MAGLEV_SIZE) / SLOTS_PER_BACKEND
            )
        };
        return Err(issue(
            field,
            format!(
                "{size} is too small for {backends} backends: Maglev needs at least \
                 {SLOTS_PER_BACKEND} slots per backend ({needed}) to keep each backend's \
                 share within about 1% of its weight ({hint})"
            ),
        ));
    }
    Ok(size_u32)
}

fn next_prime_at_least(n: u64) -> Option<u32> {
    (n..=u64::from(MAX_MAGLEV_SIZE))
        .map(|c| c as u32)
        .find(|&c| is_prime(c))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const FILE: &str = "/etc/lb/lb.toml";

    const FULL: &str = r#"
[agent]
interface = "eth0"
xdp_mode = "native"
pin_path = "/sys/fs/bpf/lb-test"
control_socket = "/run/lb-test.sock"
control_socket_group = "lbadmin"
reconcile_interval = "2s"
max_flows = 100000

[[vip]]
name = "kube-apiserver"
address = "198.18.0.100"
port = 6443
protocol = "tcp"
mode = "nat"
snat_address = "198.18.0.2"
snat_ports = "62000-63000"
maglev_table_size = 1009
mss_clamp = 1360

  [[vip.backend]]
  name = "master01"
  address = "198.18.0.11"
  port = 6444
  weight = 50

  [[vip.backend]]
  name = "master02"
  address = "198.18.0.12"
  port = 6443
  weight = 0

[[vip]]
name = "konnectivity"
address = "198.18.0.100"
port = 8132

  [[vip.backend]]
  name = "master01"
  address = "198.18.0.11"
"#;

    const MINIMAL_AGENT: &str = "[agent]\ninterface = \"eth0\"\n";

    /// A minimal valid config with `vip_extra` appended to the VIP table and
    /// `backend_extra` appended to its only backend.
    pub(super) fn minimal(vip_extra: &str, backend_extra: &str) -> String {
        format!(
            "{MINIMAL_AGENT}\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n{vip_extra}\n\
             [[vip.backend]]\nname = \"master01\"\naddress = \"198.18.0.11\"\n{backend_extra}\n"
        )
    }

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new(FILE), text)
    }

    /// Asserts the first error is at `field` and its message contains `needle`.
    pub(super) fn assert_err(text: &str, field: &str, needle: &str) -> ConfigError {
        let err = parse(text).expect_err("config should be rejected");
        check_err(&err, field, needle);
        err
    }

    fn check_err(err: &ConfigError, field: &str, needle: &str) {
        let line = err.to_string();
        assert_eq!(err.field, field, "wrong field in: {line}");
        assert!(
            err.message.contains(needle),
            "message {:?} does not contain {needle:?}",
            err.message
        );
        assert!(line.starts_with(&format!("{FILE}: {field}: ")), "{line}");
        assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
        println!("{line}");
    }

    #[test]
    fn health_defaults_and_fields() {
        let cfg = parse(&minimal("", "")).unwrap();
        assert_eq!(cfg.vips[0].health, HealthConfig::default());
        let h = &parse(&minimal(
            "[vip.health]\nkind = \"https\"\npath = \"/livez\"\nexpect_status = 204\ninterval = \"200ms\"\n\
             timeout = \"150ms\"\nrise = 3\nfall = 4\nca_file = \"/x/ca.crt\"\ninsecure_skip_verify = true\n\
             server_name = \"kubernetes\"\nclient_cert = \"/x/c.crt\"\nclient_key = \"/x/c.key\"\n",
            "",
        ))
        .unwrap()
        .vips[0]
            .health;
        assert_eq!(h.path, "/livez");
        assert_eq!(h.expect_status, 204);
        assert_eq!(h.interval, Duration::from_millis(200));
        assert_eq!(h.timeout, Duration::from_millis(150));
        assert_eq!((h.rise, h.fall), (3, 4));
        assert!(h.insecure_skip_verify);
        assert_eq!(h.server_name.as_deref(), Some("kubernetes"));
        assert_eq!(h.client_key.as_deref(), Some(Path::new("/x/c.key")));
        // A short interval brings the default timeout down with it.
        let h = &parse(&minimal("[vip.health]\ninterval = \"100ms\"\n", ""))
            .unwrap()
            .vips[0]
            .health;
        assert_eq!(h.timeout, Duration::from_millis(100));
    }

    #[test]
    fn health_errors() {
        let h = |body: &str| minimal(&format!("[vip.health]\n{body}\n"), "");
        assert_err(
            &h("kind = \"icmp\""),
            "vip[0].health.kind",
            "not a probe kind",
        );
        assert_err(
            &h("path = \"readyz\""),
            "vip[0].health.path",
            "must start with '/'",
        );
        assert_err(
            &h("interval = \"soon\""),
            "vip[0].health.interval",
            "not a duration",
        );
        assert_err(
            &h("interval = \"1ms\""),
            "vip[0].health.interval",
            "out of range",
        );
        assert_err(
            &h("interval = \"1s\"\ntimeout = \"2s\""),
            "vip[0].health.timeout",
            "longer than the interval",
        );
        assert_err(&h("rise = 0"), "vip[0].health.rise", "out of range");
        assert_err(&h("fall = 101"), "vip[0].health.fall", "out of range");
        assert_err(
            &h("expect_status = 999"),
            "vip[0].health.expect_status",
            "not an HTTP status",
        );
        assert_err(
            &h("client_cert = \"/c\""),
            "vip[0].health.client_key",
            "required with client_cert",
        );
        assert_err(&h("bogus = 1"), "vip[0].health.bogus", "unknown field");
    }

    #[test]
    fn full_config_parses_with_all_fields() {
        let cfg = parse(FULL).expect("valid config");
        assert_eq!(cfg.path, PathBuf::from(FILE));
        assert_eq!(
            cfg.agent,
            AgentConfig {
                interface: Some("eth0".into()),
                xdp_mode: XdpModeSetting::Native,
                pin_path: "/sys/fs/bpf/lb-test".into(),
                control_socket: "/run/lb-test.sock".into(),
                control_socket_group: Some("lbadmin".into()),
                reconcile_interval: Duration::from_secs(2),
                max_flows: 100_000,
                removed_backends: RemovedBackends::Drain,
                cgroup: None,
                log_level: None,
                log_format: crate::logging::LogFormat::Text,
            }
        );
        assert_eq!(cfg.vips.len(), 2);
        assert_eq!(
            cfg.vips[0],
            VipConfig {
                name: "kube-apiserver".into(),
                address: Ipv4Addr::new(198, 18, 0, 100),
                port: 6443,
                protocol: Protocol::Tcp,
                mode: Mode::Nat,
                snat_address: Some(Ipv4Addr::new(198, 18, 0, 2)),
                snat_ports: (62000, 63000),
                maglev_table_size: 1009,
                mss_clamp: Some(1360),
                ipip_source: DEFAULT_IPIP_SOURCE,
                backends: vec![
                    BackendConfig {
                        name: "master01".into(),
                        address: Ipv4Addr::new(198, 18, 0, 11),
                        port: 6444,
                        weight: 50,
                    },
                    BackendConfig {
                        name: "master02".into(),
                        address: Ipv4Addr::new(198, 18, 0, 12),
                        port: 6443,
                        weight: 0,
                    },
                ],
                health: HealthConfig::default(),
                discovery: None,
            }
        );
        // Same address, different port: a distinct VIP. Backend names are per VIP.
        assert_eq!(cfg.vips[1].name, "konnectivity");
        assert_eq!(cfg.vips[1].backends[0].name, "master01");
        assert_eq!(cfg.vips[1].backends[0].port, 8132);
    }

    #[test]
    fn defaults_are_applied() {
        let cfg = parse(&minimal("", "")).expect("valid config");
        assert_eq!(cfg.agent.interface.as_deref(), Some("eth0"));
        assert_eq!(cfg.agent.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(cfg.agent.pin_path, PathBuf::from("/sys/fs/bpf/lb"));
        assert_eq!(
            cfg.agent.control_socket,
            PathBuf::from("/run/lb-agent.sock")
        );
        let vip = &cfg.vips[0];
        assert_eq!(vip.protocol, Protocol::Tcp);
        assert_eq!(vip.mode, Mode::Nat);
        assert_eq!(vip.snat_address, None);
        assert_eq!(vip.snat_ports, (61000, 65535));
        assert_eq!(vip.maglev_table_size, 65537);
        assert_eq!(vip.mss_clamp, None, "no clamp unless asked for");
        assert_eq!(vip.backends[0].port, 6443);
        assert_eq!(vip.backends[0].weight, 100);
    }

    #[test]
    fn all_backends_drained_is_legal() {
        let cfg = parse(&minimal("", "weight = 0")).expect("valid config");
        assert_eq!(cfg.vips[0].backends[0].weight, 0);
    }

    #[test]
    fn load_reads_file_and_reports_unreadable_file() {
        let dir = std::env::temp_dir().join(format!("lbcfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("lb.toml");
        std::fs::write(&path, minimal("", "")).expect("write config");
        let cfg = Config::load(&path).expect("valid config");
        assert_eq!(cfg.path, path);
        let source = cfg.source.expect("load records the source");
        assert_eq!(source.path, path);
        assert_eq!(
            source.sha256,
            sha256_hex(minimal("", "").as_bytes()),
            "the hash is of the file's bytes"
        );

        let missing = dir.join("missing.toml");
        let err = Config::load(&missing).expect_err("missing file");
        assert_eq!(err.field, "(file)");
        assert!(err
            .to_string()
            .starts_with(&format!("{}: (file): ", missing.display())));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn sha256_of_known_bytes() {
        // FIPS 180-2's test vectors.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn config_source_of_a_file_with_known_bytes() {
        let dir = std::env::temp_dir().join(format!("lbcfg-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("abc.toml");
        std::fs::write(&path, b"abc").expect("write");
        let before = SystemTime::now();
        let source = ConfigSource::new(&path, &std::fs::read(&path).expect("read"));
        assert_eq!(source.path, path);
        assert!(source.path.is_absolute());
        assert_eq!(
            source.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(source.loaded >= before && source.loaded <= SystemTime::now());
        // A relative path is kept as named, made absolute against the working directory.
        let rel = ConfigSource::new(Path::new("lb.toml"), b"");
        assert_eq!(
            rel.path,
            std::env::current_dir().expect("cwd").join("lb.toml")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("lbcfg-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("lb.toml");
        std::fs::write(&path, b"\xff\xfe").expect("write");
        let err = Config::load(&path).expect_err("not UTF-8");
        assert_eq!(err.field, "(file)");
        assert!(err.message.starts_with("cannot read: "), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_field_top_level() {
        let text = format!("bogus = 1\n{}", minimal("", ""));
        let err = assert_err(&text, "bogus", "unknown field \"bogus\"");
        assert_eq!(err.message, "unknown field \"bogus\"");
    }

    #[test]
    fn unknown_field_in_agent() {
        let text = minimal("", "").replace(
            MINIMAL_AGENT,
            "[agent]\ninterface = \"eth0\"\nbogus = true\n",
        );
        assert_err(&text, "agent.bogus", "unknown field \"bogus\"");
    }

    #[test]
    fn unknown_field_in_vip() {
        let err = assert_err(
            &minimal("bogus = \"x\"", ""),
            "vip[0].bogus",
            "unknown field",
        );
        assert_eq!(
            err.to_string(),
            format!("{FILE}: vip[0].bogus: unknown field \"bogus\"")
        );
    }

    #[test]
    fn unknown_field_in_backend() {
        let mut text = minimal("", "");
        text.push_str("\n[[vip.backend]]\nname = \"b\"\naddress = \"198.18.0.12\"\nbogus = 1\n");
        assert_err(&text, "vip[0].backend[1].bogus", "unknown field \"bogus\"");
    }

    #[test]
    fn wrong_type_names_the_field() {
        assert_err(
            &minimal("", "port = \"https\""),
            "vip[0].backend[0].port",
            "expected an integer",
        );
        assert_err(
            &minimal("snat_ports = 61000", ""),
            "vip[0].snat_ports",
            "invalid type",
        );
        let text = minimal("", "")
            .replace("[[vip]]", "[vip]")
            .replace("[[vip.backend]]", "[vip.backend]");
        assert_err(&text, "vip", "write [[vip]] for each entry");
        let text = minimal("", "").replace("[[vip.backend]]", "[vip.backend]");
        assert_err(
            &text,
            "vip[0].backend",
            "write [[vip.backend]] for each entry",
        );
    }

    #[test]
    fn bad_vip_address() {
        let text = minimal("", "").replace("198.18.0.100", "198.18.0.300");
        assert_err(&text, "vip[0].address", "not a valid IPv4 address");
        let text = minimal("", "").replace("198.18.0.100", "0.0.0.0");
        assert_err(&text, "vip[0].address", "unspecified");
        let text = minimal("", "").replace("198.18.0.100", "239.1.1.1");
        assert_err(&text, "vip[0].address", "multicast");
        let text = minimal("", "").replace("198.18.0.100", "255.255.255.255");
        assert_err(&text, "vip[0].address", "broadcast");
        let text = minimal("", "").replace("198.18.0.100", "fd00::1");
        assert_err(&text, "vip[0].address", "IPv6");
    }

    #[test]
    fn bad_backend_address() {
        let text = minimal("", "").replace("198.18.0.11", "master01.example");
        assert_err(
            &text,
            "vip[0].backend[0].address",
            "not a valid IPv4 address",
        );
    }

    #[test]
    fn bad_snat_address() {
        assert_err(
            &minimal("snat_address = \"1.2.3\"", ""),
            "vip[0].snat_address",
            "not a valid IPv4",
        );
    }

    #[test]
    fn duplicate_vip_name() {
        let mut text = minimal("", "");
        text.push_str(
            "\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.101\"\nport = 6443\n\
             [[vip.backend]]\nname = \"m\"\naddress = \"198.18.0.11\"\n",
        );
        let err = assert_err(
            &text,
            "vip[1].name",
            "duplicate VIP name \"api\" (also vip[0])",
        );
        assert_eq!(
            err.to_string(),
            format!("{FILE}: vip[1].name: duplicate VIP name \"api\" (also vip[0])")
        );
    }

    #[test]
    fn duplicate_vip_address_port() {
        let mut text = minimal("", "");
        text.push_str(
            "\n[[vip]]\nname = \"api2\"\naddress = \"198.18.0.100\"\nport = 6443\n\
             [[vip.backend]]\nname = \"m\"\naddress = \"198.18.0.11\"\n",
        );
        assert_err(
            &text,
            "vip[1].address",
            "duplicate VIP 198.18.0.100:6443/tcp (also vip[0])",
        );
    }

    #[test]
    fn duplicate_backend_name() {
        let mut text = minimal("", "");
        text.push_str("\n[[vip.backend]]\nname = \"master01\"\naddress = \"198.18.0.12\"\n");
        let err = assert_err(&text, "vip[0].backend[1].name", "duplicate backend name");
        assert_eq!(
            err.to_string(),
            "/etc/lb/lb.toml: vip[0].backend[1].name: duplicate backend name \"master01\" (also vip[0].backend[0])"
        );
    }

    #[test]
    fn duplicate_backend_address_port() {
        let mut text = minimal("", "");
        // Explicit port equal to the inherited VIP port still collides.
        text.push_str(
            "\n[[vip.backend]]\nname = \"master02\"\naddress = \"198.18.0.11\"\nport = 6443\n",
        );
        assert_err(
            &text,
            "vip[0].backend[1].address",
            "duplicate backend 198.18.0.11:6443 (also vip[0].backend[0])",
        );
        // A different port on the same host is fine.
        let mut text = minimal("", "");
        text.push_str(
            "\n[[vip.backend]]\nname = \"master02\"\naddress = \"198.18.0.11\"\nport = 6444\n",
        );
        parse(&text).expect("distinct port is valid");
    }

    #[test]
    fn non_prime_table_size() {
        let err = assert_err(
            &minimal("maglev_table_size = 65536", ""),
            "vip[0].maglev_table_size",
            "not prime",
        );
        assert_eq!(
            err.to_string(),
            "/etc/lb/lb.toml: vip[0].maglev_table_size: 65536 is not prime (Maglev needs a prime table size; try 65537)"
        );
        assert_err(
            &minimal("maglev_table_size = 1000", ""),
            "vip[0].maglev_table_size",
            "try 1009",
        );
        assert_err(
            &minimal("maglev_table_size = -7", ""),
            "vip[0].maglev_table_size",
            "not prime",
        );
    }

    #[test]
    fn mss_clamp_bounds() {
        for (n, want) in [(536, 536), (1360, 1360), (1460, 1460), (9000, 9000)] {
            let cfg = parse(&minimal(&format!("mss_clamp = {n}"), "")).expect("in range");
            assert_eq!(cfg.vips[0].mss_clamp, Some(want));
        }
        for n in [0, 535, 9001, -1, 65536] {
            let err = assert_err(
                &minimal(&format!("mss_clamp = {n}"), ""),
                "vip[0].mss_clamp",
                "out of range",
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "{FILE}: vip[0].mss_clamp: {n} is out of range (536-9000, bytes of TCP payload per segment)"
                )
            );
        }
        assert_err(
            &minimal("mss_clamp = \"1360\"", ""),
            "vip[0].mss_clamp",
            "invalid type",
        );
    }

    #[test]
    fn table_too_small_for_backends() {
        let mut text = minimal("maglev_table_size = 101", "");
        text.push_str("\n[[vip.backend]]\nname = \"master02\"\naddress = \"198.18.0.12\"\n");
        assert_err(
            &text,
            "vip[0].maglev_table_size",
            "too small for 2 backends",
        );
        // One backend fits exactly 100 slots' worth.
        parse(&minimal("maglev_table_size = 101", "")).expect("101 >= 100 * 1");
    }

    #[test]
    fn table_too_large() {
        assert_err(
            &minimal("maglev_table_size = 65539", ""),
            "vip[0].maglev_table_size",
            "too large",
        );
    }

    #[test]
    fn missing_interface() {
        let text = minimal("", "").replace("interface = \"eth0\"\n", "");
        let err = assert_err(&text, "agent.interface", "required");
        assert_eq!(
            err.to_string(),
            "/etc/lb/lb.toml: agent.interface: required: vip[0] is in nat mode (only a config whose every VIP has mode = \"socket\" runs without XDP and an interface)"
        );
        let text = minimal("", "").replace(MINIMAL_AGENT, "");
        assert_err(&text, "agent.interface", "required");
    }

    #[test]
    fn log_settings_are_checked() {
        let with = |line: &str| {
            minimal("", "").replace(MINIMAL_AGENT, &format!("{MINIMAL_AGENT}{line}\n"))
        };
        let cfg = parse(&with(
            "log_format = \"json\"\nlog_level = \"info,lb_agent=debug\"",
        ))
        .unwrap();
        assert_eq!(cfg.agent.log_format, crate::logging::LogFormat::Json);
        assert_eq!(cfg.agent.log_level.as_deref(), Some("info,lb_agent=debug"));
        assert_err(
            &with("log_format = \"xml\""),
            "agent.log_format",
            "valid values",
        );
        assert_err(
            &with("log_level = \"lb_agent=loud\""),
            "agent.log_level",
            "is not a log level",
        );
    }

    #[test]
    fn socket_mode_alone_needs_no_interface() {
        // Kubespray's shape: no [agent] section at all.
        let text = minimal("mode = \"socket\"", "").replace(MINIMAL_AGENT, "");
        let cfg = parse(&text).expect("an all-socket config without an interface");
        assert_eq!(cfg.agent.interface, None);
        // One VIP of another mode needs the interface back.
        let text = format!(
            "{text}\n[[vip]]\nname = \"b\"\naddress = \"198.18.0.101\"\nport = 6443\nmode = \"dsr-l2\"\n\
             [[vip.backend]]\nname = \"m\"\naddress = \"198.18.0.11\"\n"
        );
        assert_err(&text, "agent.interface", "vip[1] is in dsr-l2 mode");
        // VRRP moves addresses the XDP program serves: none here.
        let text = format!(
            "{}[vrrp]\nvirtual_router_id = 1\nvirtual_addresses = [\"198.18.0.200\"]\n",
            minimal("mode = \"socket\"", "").replace(MINIMAL_AGENT, "")
        );
        assert_err(&text, "vrrp", "needs agent.interface");
    }

    #[test]
    fn empty_interface() {
        let text = minimal("", "").replace("\"eth0\"", "\"\"");
        assert_err(&text, "agent.interface", "empty");
        let text = minimal("", "").replace("\"eth0\"", "\"enp0s31f6.4094xx\"");
        assert_err(&text, "agent.interface", "at most 15 bytes");
    }

    #[test]
    fn bad_xdp_mode() {
        let text = minimal("", "").replace(
            MINIMAL_AGENT,
            "[agent]\ninterface = \"eth0\"\nxdp_mode = \"offload\"\n",
        );
        assert_err(
            &text,
            "agent.xdp_mode",
            "valid values: \"auto\", \"native\", \"generic\"",
        );
    }

    #[test]
    fn bad_mode() {
        assert_err(
            &minimal("mode = \"tunnel\"", ""),
            "vip[0].mode",
            "not a valid mode; valid values: \"nat\", \"dsr-l2\", \"dsr-ipip\", \"socket\"",
        );
    }

    #[test]
    fn dsr_modes() {
        let cfg = parse(&minimal("mode = \"dsr-l2\"", "")).expect("dsr-l2");
        assert_eq!(cfg.vips[0].mode, Mode::DsrL2);
        let cfg = parse(&minimal(
            "mode = \"dsr-ipip\"\nipip_source = \"10.99.0.0/24\"",
            "",
        ))
        .expect("dsr-ipip");
        assert_eq!(cfg.vips[0].mode, Mode::DsrIpip);
        assert_eq!(cfg.vips[0].ipip_source, (Ipv4Addr::new(10, 99, 0, 0), 24));
        let cfg = parse(&minimal("mode = \"dsr-ipip\"", "")).expect("default source");
        assert_eq!(cfg.vips[0].ipip_source, DEFAULT_IPIP_SOURCE);
    }

    #[test]
    fn socket_mode_refuses_what_it_does_not_use() {
        let cfg = parse(&minimal("mode = \"socket\"", "")).expect("socket");
        assert_eq!(cfg.vips[0].mode, Mode::Socket);
        assert!(!cfg.vips[0].mode.is_dsr());
        for (field, line) in [
            ("snat_address", "snat_address = \"198.18.0.2\""),
            ("snat_ports", "snat_ports = \"61000-62000\""),
            ("mss_clamp", "mss_clamp = 1360"),
        ] {
            assert_err(
                &minimal(&format!("mode = \"socket\"\n{line}"), ""),
                &format!("vip[0].{field}"),
                "not used in socket mode",
            );
        }
        let text = format!(
            "{}[vrrp]\nvirtual_router_id = 1\nvirtual_addresses = [\"198.18.0.100\"]\n",
            minimal("mode = \"socket\"", "")
        );
        assert_err(&text, "vrrp.virtual_addresses[0]", "socket-mode VIP");
        let text = minimal("mode = \"socket\"", "").replacen(
            "[agent]\n",
            "[agent]\ncgroup = \"sys/fs/cgroup\"\n",
            1,
        );
        assert_err(&text, "agent.cgroup", "not an absolute path");
    }

    #[test]
    fn dsr_needs_probes() {
        assert_err(
            &minimal("mode = \"dsr-l2\"\n[vip.health]\nkind = \"none\"", ""),
            "vip[0].health.kind",
            "cannot be used in dsr-l2 mode",
        );
    }

    #[test]
    fn dsr_refuses_snat_and_other_ports() {
        assert_err(
            &minimal("mode = \"dsr-l2\"\nsnat_address = \"198.18.0.2\"", ""),
            "vip[0].snat_address",
            "not used in dsr-l2 mode",
        );
        assert_err(
            &minimal("mode = \"dsr-ipip\"\nsnat_ports = \"20000-30000\"", ""),
            "vip[0].snat_ports",
            "not used in dsr-ipip mode",
        );
        assert_err(
            &minimal("mode = \"dsr-l2\"", "port = 8443"),
            "vip[0].backend[0].port",
            "must listen on the VIP's port",
        );
        assert_err(
            &minimal("ipip_source = \"10.0.0.0/8\"", ""),
            "vip[0].ipip_source",
            "only used in dsr-ipip mode",
        );
        assert_err(
            &minimal("mode = \"dsr-ipip\"\nipip_source = \"10.0.0.1/8\"", ""),
            "vip[0].ipip_source",
            "host bits set",
        );
    }

    #[test]
    fn bad_protocol() {
        assert_err(
            &minimal("protocol = \"udp\"", ""),
            "vip[0].protocol",
            "valid values: \"tcp\"",
        );
    }

    #[test]
    fn bad_snat_ports_syntax() {
        for bad in [
            "61000",
            "61000:65535",
            "a-b",
            "-5",
            "61000-",
            "+61000-65535",
        ] {
            let text = minimal(&format!("snat_ports = \"{bad}\""), "");
            assert_err(&text, "vip[0].snat_ports", "expected \"A-B\"");
        }
        assert_err(
            &minimal("snat_ports = \"1000-2000\"", ""),
            "vip[0].snat_ports",
            "1024",
        );
        assert_err(
            &minimal("snat_ports = \"61000-70000\"", ""),
            "vip[0].snat_ports",
            "65535",
        );
        assert_err(
            &minimal("snat_ports = \"65000-61000\"", ""),
            "vip[0].snat_ports",
            "greater",
        );
        let cfg = parse(&minimal("snat_ports = \"1024-1024\"", "")).expect("single port range");
        assert_eq!(cfg.vips[0].snat_ports, (1024, 1024));
    }

    #[test]
    fn snat_range_overlapping_ephemeral_range() {
        let cfg = parse(&minimal("snat_ports = \"32768-40000\"", "")).expect("valid config");
        let err = cfg.check_port_ranges((32768, 60999)).expect_err("overlap");
        check_err(&err, "vip[0].snat_ports", "overlaps");
        assert_eq!(
            err.to_string(),
            "/etc/lb/lb.toml: vip[0].snat_ports: 32768-40000 overlaps the kernel's ephemeral port range \
             32768-60999 (net.ipv4.ip_local_port_range); the agent's own connections use that range"
        );
        // The default range sits just above the kernel's default ephemeral range.
        let cfg = parse(&minimal("", "")).expect("valid config");
        cfg.check_port_ranges((32768, 60999)).expect("no overlap");
        assert!(cfg.check_port_ranges((32768, 61000)).is_err());
    }

    #[test]
    fn no_vip() {
        assert_err(MINIMAL_AGENT, "vip", "at least one [[vip]]");
    }

    #[test]
    fn too_many_vips() {
        let mut text = MINIMAL_AGENT.to_string();
        for i in 0..=MAX_VIPS {
            text.push_str(&format!(
                "[[vip]]\nname = \"v{i}\"\naddress = \"198.18.1.{}\"\nport = 6443\n\
                 [[vip.backend]]\nname = \"m\"\naddress = \"198.18.0.11\"\n",
                i + 1
            ));
        }
        assert_err(&text, "vip", "at most 16");
    }

    #[test]
    fn too_many_backends_in_total() {
        let mut text = MINIMAL_AGENT.to_string();
        for i in 0..2 {
            text.push_str(&format!(
                "[[vip]]\nname = \"v{i}\"\naddress = \"198.18.1.{}\"\nport = 6443\n",
                i + 1
            ));
            for j in 0..600 {
                text.push_str(&format!(
                    "[[vip.backend]]\nname = \"m{j}\"\naddress = \"10.0.{}.{}\"\n",
                    j / 250,
                    j % 250 + 1
                ));
            }
        }
        assert_err(&text, "vip[1].backend", "1200");
    }

    #[test]
    fn no_backend() {
        let text = format!(
            "{MINIMAL_AGENT}[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n"
        );
        assert_err(&text, "vip[0].backend", "at least one [[vip.backend]]");
    }

    #[test]
    fn weight_too_large() {
        assert_err(
            &minimal("", "weight = 10001"),
            "vip[0].backend[0].weight",
            "out of range (0-10000",
        );
        assert_err(
            &minimal("", "weight = -1"),
            "vip[0].backend[0].weight",
            "out of range",
        );
        parse(&minimal("", "weight = 10000")).expect("max weight");
    }

    #[test]
    fn bad_ports() {
        assert_err(
            &minimal("", "port = 0"),
            "vip[0].backend[0].port",
            "out of range (1-65535)",
        );
        let text = minimal("", "").replace("port = 6443", "port = 65536");
        assert_err(&text, "vip[0].port", "out of range");
        let text = minimal("", "").replace("port = 6443\n", "");
        assert_err(&text, "vip[0].port", "required");
    }

    #[test]
    fn name_too_long() {
        let long = "x".repeat(64);
        let text = minimal("", "").replace("\"master01\"", &format!("\"{long}\""));
        assert_err(&text, "vip[0].backend[0].name", "64 bytes long; at most 63");
        let text = minimal("", "").replace("\"api\"", &format!("\"{long}\""));
        assert_err(&text, "vip[0].name", "at most 63");
        let ok = "x".repeat(63);
        parse(&minimal("", "").replace("\"api\"", &format!("\"{ok}\""))).expect("63 bytes");
    }

    #[test]
    fn empty_name() {
        let text = minimal("", "").replace("\"api\"", "\"\"");
        assert_err(&text, "vip[0].name", "empty");
    }

    #[test]
    fn syntax_error() {
        let text = minimal("", "").replace("port = 6443", "port = = 6443");
        let err = assert_err(&text, "(syntax)", "line 7, column");
        assert!(err.message.len() < 200, "{}", err.message);
        let text = format!("{}\n[agent\n", minimal("", ""));
        assert_err(&text, "(syntax)", "line ");
        // Duplicate keys are a TOML syntax error too.
        let text = minimal("port = 1", "");
        assert_err(&text, "(syntax)", "line ");
    }

    #[test]
    fn ephemeral_range_parsing() {
        assert_eq!(
            parse_ephemeral_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_ephemeral_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_ephemeral_range("60999 32768"), None);
        assert_eq!(parse_ephemeral_range("32768"), None);
        assert_eq!(parse_ephemeral_range("a b"), None);
        if let Ok((lo, hi)) = read_ephemeral_range() {
            assert!(lo <= hi);
        }
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537));
        assert!(!is_prime(65536));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(u32::MAX));
    }
}
