//! The XDP data plane as the agent sees it.
//!
//! `loader` loads the embedded object, pins its maps and attaches the program through a
//! pinned link, or adopts the data plane an earlier agent left pinned; `generic` says where
//! XDP generic mode would corrupt checksums; `pinned` opens the pinned maps (the agent and
//! `lb-agent status` both go through it); `writer` turns the config and backend states into
//! map contents, publishing Maglev tables atomically; `tc_local` attaches the TC egress
//! program local backends' replies need; `sys` issues the bpf(2) commands aya does not.

pub mod events;
pub mod generic;
pub mod loader;
pub mod pinned;
mod sock_hooks;
mod sys;
mod tc_local;
pub mod writer;

/// The XDP object built by build.rs from lb-ebpf, embedded so the agent is one file.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// Errors of the data plane layer.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object could not be loaded (verifier, missing privileges...).
    #[error("loading the XDP object: {0}")]
    Load(#[source] aya::EbpfError),
    /// A program is missing from the object or failed to load/attach.
    #[error("XDP program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A program is missing from the object.
    #[error("program {0} is missing from the XDP object")]
    MissingProgram(&'static str),
    /// A map is missing from the object.
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning a map failed.
    #[error("pinning map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// A filesystem operation on the pin directory failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The interface cannot take an XDP program in the requested mode.
    #[error("attaching XDP to interface {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// `xdp_mode = "generic"` on an interface where it would corrupt checksums.
    #[error("agent.xdp_mode: {}", generic::refusal(interface, hazard))]
    GenericRefused { interface: String, hazard: String },
    /// `xdp_mode = "auto"`: native mode failed where generic mode would corrupt checksums.
    #[error("agent.xdp_mode: {}", generic::no_fallback(interface, hazard, native))]
    NoFallback {
        interface: String,
        hazard: String,
        /// Why native mode failed, with its causes.
        native: String,
    },
    /// Every index of a kind is taken (by the config, or by removed backends and VIPs whose
    /// connections are still kept).
    #[error(
        "no free {0} index: at most {1} {0}s, counting removed ones whose connections are kept"
    )]
    NoIndex(&'static str, u32),
    /// A bpf(2) command on the pinned XDP link failed.
    #[error("XDP link {path}: {op}: {source}")]
    Link {
        path: std::path::PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `attach` was asked for another interface than the one the adopted link serves.
    #[error("the XDP link pinned at {path} serves interface index {adopted}, not {interface} (index {ifindex})")]
    AdoptedElsewhere {
        path: std::path::PathBuf,
        adopted: u32,
        interface: String,
        ifindex: u32,
    },
    /// A pinned map was replaced or removed while the data plane was being adopted.
    #[error("map {name} pinned at {path} changed while the data plane was being adopted")]
    AdoptRace {
        name: &'static str,
        path: std::path::PathBuf,
    },
    /// The TC egress program could not be attached.
    #[error(
        "attaching {} to {interface} egress: {error}",
        lb_common::PROG_TC_LOCAL
    )]
    Tc { interface: String, error: String },
    /// A failure injected by a test (failpoints build only).
    #[error("{0}: injected failure")]
    Injected(&'static str),
    /// A batch syscall failed.
    #[error("map {name}: {op}: {source}")]
    Syscall {
        name: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for map errors.
pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}
