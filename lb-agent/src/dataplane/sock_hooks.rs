//! The socket-mode hooks: lb_connect4 and lb_getpeername4 attached to a cgroup (v2) through
//! bpf_links pinned under the pin path. Pinned, they stay attached with the maps as the
//! agent left them when its process ends, as the XDP link does: the host's processes keep
//! reaching the apiservers through a crash or an upgrade. An orderly stop detaches them.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{programs::CgroupSockAddr, Ebpf};
use lb_common::{LINK_CONNECT4_PIN, LINK_GETPEERNAME4_PIN, PROG_CONNECT4, PROG_GETPEERNAME4};

use super::{sys, DataplaneError};

/// Each hook: its program, the pin of its link, its attach type.
const HOOKS: [(&str, &str, u32); 2] = [
    (
        PROG_CONNECT4,
        LINK_CONNECT4_PIN,
        sys::BPF_CGROUP_INET4_CONNECT,
    ),
    (
        PROG_GETPEERNAME4,
        LINK_GETPEERNAME4_PIN,
        sys::BPF_CGROUP_INET4_GETPEERNAME,
    ),
];

/// The pins' names, for the pin directory's clean-up.
pub const PINS: [&str; 2] = [LINK_CONNECT4_PIN, LINK_GETPEERNAME4_PIN];

/// Attaches the hooks to `cgroup`, or makes links an earlier agent pinned under `pin_path`
/// run this object's programs (in one step each: no connect() meets no hook).
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, pin_path: &Path) -> Result<(), DataplaneError> {
    let io = |path: PathBuf| move |source| DataplaneError::Io { path, source };
    let dir = std::fs::File::open(cgroup).map_err(io(cgroup.to_path_buf()))?;
    for (name, pin, attach_type) in HOOKS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let prog_fd = prog
            .fd()
            .map_err(|source| DataplaneError::Program { name, source })?;
        let path = pin_path.join(pin);
        let link_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| DataplaneError::Link { path, op, source }
        };
        if let Ok(link) = sys::obj_get(&path, 0) {
            sys::link_update(link.as_fd(), prog_fd.as_fd())
                .map_err(link_err("BPF_LINK_UPDATE", &path))?;
            continue;
        }
        let link = sys::cgroup_link_create(prog_fd.as_fd(), dir.as_fd(), attach_type)
            .map_err(link_err("BPF_LINK_CREATE", cgroup))?;
        sys::obj_pin(link.as_fd(), &path).map_err(link_err("BPF_OBJ_PIN", &path))?;
    }
    Ok(())
}

/// Detaches the hooks pinned under `pin_path` and removes their pins (idempotent).
pub fn detach(pin_path: &Path) {
    for pin in PINS {
        let path = pin_path.join(pin);
        let Ok(link) = sys::obj_get(&path, 0) else {
            continue;
        };
        if let Err(e) = sys::link_detach(link.as_fd()) {
            log::warn!("detaching the cgroup hook {}: {e}", path.display());
        }
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}
