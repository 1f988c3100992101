//! lb-agent: loads lb's XDP data plane, keeps its maps true and answers `lb-agent status`.
//!
//! Where things live: `config` (the TOML file), `maglev` (table builder), `health`
//! (probes, rise/fall), `backends` (where a backend's state changes), `dataplane`
//! (the embedded XDP object, loading, pinning, map writes), `host` (interfaces, sysctls,
//! privileges), `control` (the agent's Unix socket), `status` (what `lb-agent status`
//! prints), `app` (`lb-agent run`: wiring and shutdown), `backend_setup` (`lb-agent
//! backend-setup`, run on the apiserver hosts of DSR VIPs), `sock` (raw and packet sockets),
//! `manifest` (`lb-agent manifest`: a static pod for Kubernetes control-plane nodes),
//! `logging` (tracing: text or JSON lines, the level changed at runtime), `metrics` (the
//! Prometheus endpoint), `discovery` (following the `kubernetes` EndpointSlice for a VIP's
//! backends), `import` (`lb-agent import`: an lb.toml from HAProxy and keepalived configs).

/// This lb-agent's version (the crate's; the build records no git commit).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod app;
/// `lb-agent backend-setup`: prepares an apiserver host for a DSR VIP (address, sysctls, IPIP).
pub mod backend_setup;
pub mod backends;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod discovery;
pub mod health;
pub mod heartbeat;
pub mod host;
/// `lb-agent import`: an lb.toml from an haproxy.cfg and a keepalived.conf.
pub mod import;
pub mod logging;
pub mod maglev;
/// `lb-agent manifest static-pod`: the agent as a Kubernetes static pod (YAML).
pub mod manifest;
pub mod metrics;
pub mod netlink;
pub mod sock;
pub mod status;
pub mod vrrp;
