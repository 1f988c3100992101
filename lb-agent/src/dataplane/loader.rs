//! Loading the embedded XDP object, pinning its maps and attaching the program.

use std::path::{Path, PathBuf};

use aya::{
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{map, xdp_mode, PROG_LB};

use super::{generic, DataplaneError, OBJECT};
use crate::config::XdpModeSetting;

/// The loaded data plane. Dropping it detaches the program and removes the pins.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_path: PathBuf,
    link: Option<XdpLinkId>,
    /// `xdp_mode::*` of the current attachment.
    pub mode: u32,
}

/// Removes lb's pins under `dir` (a crashed agent's leftovers) and the dir if then empty.
pub fn remove_pins(dir: &Path) -> Result<usize, DataplaneError> {
    let mut removed = 0;
    for name in map::ALL {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path: p, source }),
        }
    }
    // Only succeeds when empty: an operator's own pins there are left alone.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// The pin directory must be ours alone: /sys/fs/bpf is world-writable (sticky), so another
/// user could create the directory first, or a symlink, and then swap our maps for theirs or
/// turn `share_with_group` into a chown of any file.
fn check_pin_dir(dir: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| {
        DataplaneError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(format!(
            "agent.pin_path: {why}; refusing to pin maps there (remove it, or choose another pin_path)"
        )),
    }
    };
    let m = std::fs::symlink_metadata(dir).map_err(|source| DataplaneError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !m.file_type().is_dir() {
        return Err(refuse("not a directory (a symlink?)".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(refuse(format!(
            "owned by uid {}, not by the agent (uid {me})",
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        // Ours, but the umask left it writable by others: close it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(
            |source| DataplaneError::Io {
                path: dir.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}

impl Dataplane {
    /// Loads and verifies the programs and pins every map under `pin_path`, with the
    /// default flow table.
    pub fn load(pin_path: &Path) -> Result<Self, DataplaneError> {
        Self::load_with(pin_path, lb_common::MAX_FLOWS)
    }

    /// As `load`, with a flow table for `max_flows` connections.
    pub fn load_with(pin_path: &Path, max_flows: u32) -> Result<Self, DataplaneError> {
        crate::host::ensure_bpffs(pin_path).map_err(|e| DataplaneError::Io {
            path: pin_path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        if pin_path.exists() {
            check_pin_dir(pin_path)?;
        }
        let stale = remove_pins(pin_path)?;
        if stale > 0 {
            log::warn!(
                "removed {stale} stale pins under {} (an earlier agent did not shut down)",
                pin_path.display()
            );
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map::FLOWS, max_flows.saturating_mul(2))
            .load(OBJECT)
            .map_err(DataplaneError::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_LB)
            .ok_or(DataplaneError::Program {
                name: PROG_LB,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name: PROG_LB,
                source,
            })?;
        prog.load().map_err(|source| DataplaneError::Program {
            name: PROG_LB,
            source,
        })?;
        std::fs::create_dir_all(pin_path).map_err(|source| DataplaneError::Io {
            path: pin_path.to_path_buf(),
            source,
        })?;
        check_pin_dir(pin_path)?;
        let dp = Self {
            ebpf,
            pin_path: pin_path.to_path_buf(),
            link: None,
            mode: xdp_mode::NONE,
        };
        for name in map::ALL {
            let m = dp.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
            let path = pin_path.join(name);
            m.pin(&path)
                .map_err(|source| DataplaneError::Pin { name, path, source })?;
        }
        Ok(dp)
    }

    /// Gives group `gid` read access to the pins (0750 directory, 0640 maps), so its members
    /// can run `lb-agent status`.
    pub fn share_with_group(&self, gid: u32) -> Result<(), DataplaneError> {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| -> Result<(), DataplaneError> {
            let io = |source| DataplaneError::Io {
                path: p.to_path_buf(),
                source,
            };
            nix::unistd::chown(p, None, Some(gid.into())).map_err(|e| io(e.into()))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io)
        };
        set(&self.pin_path, 0o750)?;
        for name in map::ALL {
            set(&self.pin_path.join(name), 0o640)?;
        }
        Ok(())
    }

    /// The loaded LB program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROG_LB)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load")
    }

    /// Attaches to `interface`; `auto` tries native mode first, then generic with a warning.
    /// `generic_hazard` (from `generic::generic_hazard`) says why generic mode would corrupt
    /// checksums there: then it is neither used nor fallen back to.
    pub fn attach(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
        generic_hazard: Option<&str>,
    ) -> Result<u32, DataplaneError> {
        if let (XdpModeSetting::Generic, Some(h)) = (setting, generic_hazard) {
            return Err(DataplaneError::GenericRefused {
                interface: interface.to_string(),
                hazard: h.to_string(),
            });
        }
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_LB)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load");
        let try_mode = |prog: &mut Xdp, mode: XdpMode, label: &'static str| {
            prog.attach(interface, mode)
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_string(),
                    mode: label,
                    source,
                })
        };
        let (link, mode) = match setting {
            XdpModeSetting::Native => {
                (try_mode(prog, XdpMode::Driver, "native")?, xdp_mode::NATIVE)
            }
            XdpModeSetting::Generic => {
                (try_mode(prog, XdpMode::Skb, "generic")?, xdp_mode::GENERIC)
            }
            XdpModeSetting::Auto => match try_mode(prog, XdpMode::Driver, "native") {
                Ok(l) => (l, xdp_mode::NATIVE),
                Err(DataplaneError::Attach { source, .. }) if generic_hazard.is_some() => {
                    let hazard = generic_hazard.unwrap_or_default().to_string();
                    let mut native = error_chain(&source);
                    if let Some(hint) = (hazard == "veth")
                        .then(|| errno(&source).and_then(generic::veth_native_hint))
                        .flatten()
                    {
                        native = format!("{native}: {hint}");
                    }
                    return Err(DataplaneError::NoFallback {
                        interface: interface.to_string(),
                        hazard,
                        native,
                    });
                }
                Err(e) => {
                    log::warn!("{e}; falling back to generic (skb) mode, which is much slower");
                    (try_mode(prog, XdpMode::Skb, "generic")?, xdp_mode::GENERIC)
                }
            },
        };
        self.link = Some(link);
        self.mode = mode;
        Ok(mode)
    }

    /// Detaches the program (idempotent).
    pub fn detach(&mut self) {
        if let Some(link) = self.link.take() {
            if let Some(prog) = self
                .ebpf
                .program_mut(PROG_LB)
                .and_then(|p| TryInto::<&mut Xdp>::try_into(p).ok())
            {
                if let Err(e) = prog.detach(link) {
                    log::warn!("detaching XDP: {e}");
                }
            }
            self.mode = xdp_mode::NONE;
        }
    }
}

/// `e` and its causes on one line, as anyhow's `{:#}` prints them.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The errno somewhere in `e`'s causes.
fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(n) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(n);
        }
        cause = c.source();
    }
    None
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach();
        if let Err(e) = remove_pins(&self.pin_path) {
            log::warn!("removing pins: {e}");
        }
    }
}
