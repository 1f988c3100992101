//! lb_tc_local on the XDP interface's egress: a local backend's replies (lb on the
//! control-plane nodes, VIP:1644 -> :6443 on this host) get the VIP's port back.
//!
//! Attached through netlink as a cls_bpf filter at a fixed priority and handle, not as a
//! TCX link: the filter stays when the agent's process ends, like the pinned XDP link, and
//! the next agent replaces its program in place.

use aya::{
    programs::{
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use lb_common::PROG_TC_LOCAL;

use super::{loader::error_chain, DataplaneError};

/// The filter's priority: `tc filter show dev IF egress` lists it as pref 49000.
const PRIORITY: u16 = 49000;
/// The filter's handle at that priority.
const HANDLE: TcHandle = TcHandle::new(0, 0x1b);

/// Loads lb_tc_local (once) and attaches it to `interface`'s egress, replacing the program
/// of a filter an earlier agent left there.
pub fn attach(ebpf: &mut Ebpf, interface: &str) -> Result<(), DataplaneError> {
    let err = |what: &str, e: &dyn std::error::Error| DataplaneError::Tc {
        interface: interface.to_string(),
        error: format!("{what}: {}", error_chain(e)),
    };
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => {}
        // Another tool's clsact, or ours from before: filters share it.
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(err("adding the clsact qdisc", &e)),
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_TC_LOCAL)
        .ok_or(DataplaneError::MissingProgram(PROG_TC_LOCAL))?
        .try_into()
        .map_err(|e| err("not a classifier", &e))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| err("loading", &e))?;
    }
    let replaced =
        SchedClassifierLink::attached(interface, TcAttachType::Egress, PRIORITY, HANDLE, None)
            .map_err(|e| err("finding the interface", &e))
            .and_then(|old| prog.attach_to_link(old).map_err(|e| err("replacing", &e)));
    let id = match replaced {
        Ok(id) => id,
        Err(_) => {
            let opts = NlOptions {
                priority: PRIORITY,
                handle: HANDLE,
                ..Default::default()
            };
            prog.attach_with_options(
                interface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(opts),
            )
            .map_err(|e| err("attaching", &e))?
        }
    };
    let link = prog
        .take_link(id)
        .map_err(|e| err("taking the filter", &e))?;
    // Dropping the link would delete the filter, which must outlive this process.
    std::mem::forget(link);
    Ok(())
}

/// Removes lb_tc_local from the egress of interface `ifindex`, if there (the orderly stop).
pub fn detach(ifindex: u32) {
    let Some(name) = nix::net::if_::if_indextoname(ifindex)
        .ok()
        .and_then(|n| n.into_string().ok())
    else {
        return;
    };
    match tc::qdisc_detach_program(&name, TcAttachType::Egress, PROG_TC_LOCAL) {
        Ok(()) => {}
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!(
            "removing {PROG_TC_LOCAL} from {name} egress: {}",
            error_chain(&e)
        ),
    }
}
