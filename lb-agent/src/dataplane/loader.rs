//! Loading the embedded XDP object, pinning its maps and its link, attaching the program, and
//! adopting the pinned data plane an earlier agent left running.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, ProgramArray},
    programs::{ProgramError, Xdp},
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use lb_common::{
    map, tail, xdp_mode, AgentMeta, LINK_CONNECT4_PIN, LINK_PIN, MAP_LAYOUT_VERSION, PROGS_PIN,
    PROG_LB, PROG_NEW_FLOW,
};

use super::{generic, sock_hooks, sys, tc_local, DataplaneError, OBJECT};
use crate::config::XdpModeSetting;

/// The loaded data plane. Dropping it detaches the program and removes the pins (the
/// orderly stop); `leave` keeps both for the next agent to adopt.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_path: PathBuf,
    link: Option<Link>,
    /// `xdp_mode::*` of the current attachment.
    pub mode: u32,
    /// Set by `leave`: the drop then keeps the program attached and the pins in place.
    left: bool,
}

/// The XDP link pinned at `<pin_path>/LINK`.
struct Link {
    fd: OwnedFd,
    ifindex: u32,
    /// False while it still runs the adopted program, until `attach` replaces that.
    ours: bool,
}

/// How `Dataplane::load_or_adopt` found the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Nothing of lb's was pinned: everything loaded fresh.
    Fresh,
    /// A running data plane was adopted: its maps are reused as they are and `attach`
    /// replaces its program in place.
    Adopted(Adopted),
    /// lb's pins were there but could not be adopted: they were removed (detaching their
    /// program) and everything loaded fresh.
    Replaced {
        /// What did not match, in words.
        why: String,
        /// Pins removed.
        pins_removed: usize,
    },
}

/// What was adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The pinned link's id: it stays the same through `attach`.
    pub link_id: u32,
    /// The program the link ran when adopted (`attach` replaces it).
    pub prog_id: u32,
    /// `xdp_mode::*` of the link, as its agent recorded it in AGENT_META.
    pub mode: u32,
    /// AGENT_META as the previous agent left it (its pid, start time, MAC...).
    pub meta: AgentMeta,
}

/// Where `attach` pins a new program array until the link runs the program that uses it.
// No dot: bpffs refuses names with one.
const PROGS_NEXT_PIN: &str = "PROGS_NEXT";

/// Every pin name of lb's: the maps, the link and the program arrays.
fn pin_names() -> impl Iterator<Item = &'static str> {
    map::ALL
        .into_iter()
        .chain([LINK_PIN, PROGS_PIN, PROGS_NEXT_PIN])
        .chain(sock_hooks::PINS)
}

/// Removes lb's pins under `dir` (a crashed agent's leftovers) and the dir if then empty.
/// A pinned link is detached first: unlinking alone would leave the program attached while
/// any process still holds the link (bpftool, a hung agent).
pub fn remove_pins(dir: &Path) -> Result<usize, DataplaneError> {
    let mut removed = 0;
    for name in pin_names() {
        let p = dir.join(name);
        if name == LINK_PIN || sock_hooks::PINS.contains(&name) {
            if let Ok(fd) = sys::obj_get(&p, 0) {
                if let Err(e) = sys::link_detach(fd.as_fd()) {
                    log::debug!("{}: BPF_LINK_DETACH: {e}", p.display());
                }
            }
        }
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

/// Makes sure bpffs is mounted and the pin directory, if there, is ours.
fn prepare_pin_dir(pin_path: &Path) -> Result<(), DataplaneError> {
    crate::host::ensure_bpffs(pin_path).map_err(|e| DataplaneError::Io {
        path: pin_path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    if pin_path.exists() {
        check_pin_dir(pin_path)?;
    }
    Ok(())
}

/// A pinned data plane that passed every check, held open.
struct Adoptable {
    /// The XDP link; None for a socket-mode-only data plane (no interface).
    link: Option<OwnedFd>,
    /// The XDP link's, or for a socket-mode-only data plane the connect4 hook's.
    link_info: sys::LinkInfo,
    meta: AgentMeta,
    /// Each pinned map's id as checked: the maps the loader must reuse.
    map_ids: Vec<(&'static str, u32)>,
}

/// Checks that the data plane pinned under `dir` is one this agent's program can take over
/// with `max_flows` on interface `ifindex`; why not, in words, if not.
fn adoptable(dir: &Path, max_flows: u32, ifindex: u32) -> Result<Adoptable, String> {
    let object = aya_obj::Object::parse(OBJECT)
        .map_err(|e| format!("the embedded XDP object does not parse: {e}"))?;
    let open = |name: &'static str| {
        let path = dir.join(name);
        let fd = sys::obj_get(&path, 0)
            .map_err(|e| format!("map {name} is not pinned at {}: {e}", path.display()))?;
        let info = MapData::from_fd(fd)
            .and_then(|m| m.info().map(|i| (m, i)))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(info)
    };

    // The layout version first, read as raw bytes at the offset every layout keeps for it:
    // the most telling reason when an upgrade changed the layout.
    let (meta_map, meta_info) = open(map::AGENT_META)?;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    if meta_info.map_type().map(|t| t as u32).ok() != Some(BPF_MAP_TYPE_ARRAY)
        || meta_info.value_size() < 16
    {
        return Err(format!(
            "AGENT_META is not an array of at least 16 bytes (type {:?}, value size {})",
            meta_info.map_type().ok(),
            meta_info.value_size()
        ));
    }
    let raw = sys::array_lookup(meta_map.fd().as_fd(), 0, meta_info.value_size())
        .map_err(|e| format!("reading AGENT_META: {e}"))?;
    let word = |at: usize| u32::from_ne_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let layout = word(12);
    if layout != MAP_LAYOUT_VERSION {
        return Err(format!(
            "the pinned maps have layout version {layout}, this lb-agent's is {MAP_LAYOUT_VERSION}"
        ));
    }
    let meta_ifindex = word(4);
    if meta_ifindex != ifindex {
        return Err(format!(
            "the pinned data plane serves interface index {meta_ifindex}, this agent's interface has index {ifindex}"
        ));
    }

    // Then every map against what the object declares, so a layout change made without a
    // version bump is caught too.
    let mut map_ids = Vec::with_capacity(map::ALL.len());
    for name in map::ALL {
        let declared = object
            .maps
            .get(name)
            .ok_or_else(|| format!("map {name} is missing from the XDP object"))?;
        let want_entries = if name == map::FLOWS {
            max_flows.saturating_mul(2)
        } else if name == map::DSR_FLOWS {
            max_flows
        } else {
            declared.max_entries()
        };
        let (_, info) = open(name)?;
        if name == map::FLOWS && info.max_entries() != want_entries {
            return Err(format!(
                "FLOWS holds {} entries (max_flows {}), this agent wants {want_entries} (max_flows {max_flows})",
                info.max_entries(),
                info.max_entries() / 2
            ));
        }
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        for (what, pinned, ours) in [
            ("type", pinned_type, declared.map_type()),
            ("key size", info.key_size(), declared.key_size()),
            ("value size", info.value_size(), declared.value_size()),
            ("max entries", info.max_entries(), want_entries),
            ("flags", info.map_flags(), declared.map_flags()),
        ] {
            if pinned != ours {
                return Err(format!(
                    "map {name}: {what} is {pinned} pinned, {ours} in this agent's program \
                     (a layout change without a MAP_LAYOUT_VERSION bump?)"
                ));
            }
        }
        map_ids.push((name, info.id()));
    }
    // Sizes checked: now AGENT_META is this agent's AgentMeta.
    // SAFETY: AgentMeta is plain old data and raw holds exactly one (value size checked).
    let meta: AgentMeta = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    if ifindex == 0 {
        // Socket mode only: no XDP; the connect4 hook's link is what must still be attached.
        let path = dir.join(LINK_CONNECT4_PIN);
        let link = sys::obj_get(&path, 0)
            .map_err(|e| format!("no cgroup hook pinned at {}: {e}", path.display()))?;
        let link_info = sys::link_info(link.as_fd())
            .map_err(|e| format!("{}: BPF_OBJ_GET_INFO_BY_FD: {e}", path.display()))?;
        if link_info.link_type != sys::BPF_LINK_TYPE_CGROUP {
            return Err(format!(
                "{} is not a cgroup link (link type {})",
                path.display(),
                link_info.link_type
            ));
        }
        return Ok(Adoptable {
            link: None,
            link_info,
            meta,
            map_ids,
        });
    }
    if !matches!(meta.xdp_mode, xdp_mode::NATIVE | xdp_mode::GENERIC) {
        return Err(format!(
            "AGENT_META says the program is not attached (xdp_mode {})",
            meta.xdp_mode
        ));
    }

    let path = dir.join(LINK_PIN);
    let link =
        sys::obj_get(&path, 0).map_err(|e| format!("no link pinned at {}: {e}", path.display()))?;
    let link_info = sys::link_info(link.as_fd())
        .map_err(|e| format!("{}: BPF_OBJ_GET_INFO_BY_FD: {e}", path.display()))?;
    if link_info.link_type != sys::BPF_LINK_TYPE_XDP {
        return Err(format!(
            "{} is not an XDP link (link type {})",
            path.display(),
            link_info.link_type
        ));
    }
    if link_info.ifindex != ifindex {
        return Err(if link_info.ifindex == 0 {
            format!(
                "the link pinned at {} is attached to no interface (detached, or its interface is gone)",
                path.display()
            )
        } else {
            format!(
                "the link pinned at {} is attached to interface index {}, not {ifindex}",
                path.display(),
                link_info.ifindex
            )
        });
    }
    Ok(Adoptable {
        link: Some(link),
        link_info,
        meta,
        map_ids,
    })
}

/// Whether an adopted attachment in `mode` is what `setting` asks for.
fn mode_fits(setting: XdpModeSetting, mode: u32, generic_hazard: Option<&str>) -> bool {
    match setting {
        XdpModeSetting::Native => mode == xdp_mode::NATIVE,
        XdpModeSetting::Generic => mode == xdp_mode::GENERIC,
        // Generic here means native failed for the previous agent: keep it, unless generic
        // mode corrupts checksums on this interface.
        XdpModeSetting::Auto => {
            mode == xdp_mode::NATIVE || (mode == xdp_mode::GENERIC && generic_hazard.is_none())
        }
    }
}

/// The index of `interface` in the calling thread's network namespace.
fn ifindex_of(interface: &str) -> Result<u32, ProgramError> {
    let unknown = || ProgramError::UnknownInterface {
        name: interface.to_string(),
    };
    let c = std::ffi::CString::new(interface).map_err(|_| unknown())?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(unknown()),
        i => Ok(i),
    }
}

impl Dataplane {
    /// Loads and verifies the programs and pins every map under `pin_path`, with the
    /// default flow table.
    pub fn load(pin_path: &Path) -> Result<Self, DataplaneError> {
        Self::load_with(pin_path, lb_common::MAX_FLOWS)
    }

    /// As `load`, with a flow table for `max_flows` connections: always fresh, whatever is
    /// pinned there is removed first.
    pub fn load_with(pin_path: &Path, max_flows: u32) -> Result<Self, DataplaneError> {
        prepare_pin_dir(pin_path)?;
        let (dp, stale) = Self::load_fresh(pin_path, max_flows, true)?;
        if stale > 0 {
            log::warn!(
                "removed {stale} stale pins under {} (an earlier agent did not shut down)",
                pin_path.display()
            );
        }
        Ok(dp)
    }

    /// Takes over the data plane pinned under `pin_path` if an earlier agent left one that
    /// this agent's program can run with `max_flows` on interface `ifindex`: its maps and
    /// their entries are kept and `attach` replaces its program without detaching it.
    /// Otherwise loads fresh as `load_with` does, and `Start` says why.
    ///
    /// Adopted, the dataplane owns the running program at once: dropping it, even before
    /// `attach`, detaches the program and removes the pins; `leave` keeps them.
    pub fn load_or_adopt(
        pin_path: &Path,
        max_flows: u32,
        ifindex: u32,
    ) -> Result<(Self, Start), DataplaneError> {
        prepare_pin_dir(pin_path)?;
        if !pin_names().any(|n| pin_path.join(n).exists()) {
            let (dp, _) = Self::load_fresh(pin_path, max_flows, ifindex != 0)?;
            return Ok((dp, Start::Fresh));
        }
        match adoptable(pin_path, max_flows, ifindex) {
            Ok(a) => Self::adopt(pin_path, max_flows, a, ifindex != 0),
            Err(why) => {
                let (dp, pins_removed) = Self::load_fresh(pin_path, max_flows, ifindex != 0)?;
                Ok((dp, Start::Replaced { why, pins_removed }))
            }
        }
    }

    /// Whether `load_or_adopt` would adopt what is pinned under `pin_path` (and why not),
    /// without loading anything: the agent decides from it whether to resume as VRRP master
    /// before the slow part of its start.
    pub fn can_adopt(pin_path: &Path, max_flows: u32, ifindex: u32) -> Result<(), String> {
        adoptable(pin_path, max_flows, ifindex).map(|_| ())
    }

    /// Removes lb's pins, loads the object with new maps and pins them (and, with `xdp`,
    /// the XDP programs into the verifier); returns how many pins were removed.
    fn load_fresh(
        pin_path: &Path,
        max_flows: u32,
        xdp: bool,
    ) -> Result<(Self, usize), DataplaneError> {
        let stale = remove_pins(pin_path)?;
        let ebpf = EbpfLoader::new()
            .map_max_entries(map::FLOWS, max_flows.saturating_mul(2))
            .map_max_entries(map::DSR_FLOWS, max_flows)
            .load(OBJECT)
            .map_err(DataplaneError::Load)?;
        let dp = Self::with_program(ebpf, pin_path, None, xdp_mode::NONE, xdp)?;
        for name in map::ALL {
            let m = dp.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
            let path = pin_path.join(name);
            m.pin(&path)
                .map_err(|source| DataplaneError::Pin { name, path, source })?;
        }
        Ok((dp, stale))
    }

    /// Loads the object on the maps pinned under `pin_path`, which `adoptable` checked.
    fn adopt(
        pin_path: &Path,
        max_flows: u32,
        a: Adoptable,
        xdp: bool,
    ) -> Result<(Self, Start), DataplaneError> {
        let paths: Vec<(&'static str, PathBuf)> =
            map::ALL.iter().map(|n| (*n, pin_path.join(n))).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map::FLOWS, max_flows.saturating_mul(2));
        loader.map_max_entries(map::DSR_FLOWS, max_flows);
        // aya opens the map pinned at the path if there is one, and creates and pins a new
        // one otherwise: without a check, a map whose pin vanished meanwhile would start
        // empty. CLOCK and NEXT_HOP are not named here: they start afresh, as caches should.
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(OBJECT).map_err(DataplaneError::Load)?;
        for ((name, path), (_, id)) in paths.into_iter().zip(&a.map_ids) {
            let now = MapData::from_pin(&path)
                .and_then(|m| m.info())
                .map(|i| i.id())
                .map_err(super::map_err(name))?;
            if now != *id {
                return Err(DataplaneError::AdoptRace { name, path });
            }
        }
        let link = a.link.map(|fd| Link {
            fd,
            ifindex: a.link_info.ifindex,
            ours: false,
        });
        let dp = Self::with_program(ebpf, pin_path, link, a.meta.xdp_mode, xdp)?;
        let adopted = Adopted {
            link_id: a.link_info.id,
            prog_id: a.link_info.prog_id,
            mode: a.meta.xdp_mode,
            meta: a.meta,
        };
        Ok((dp, Start::Adopted(adopted)))
    }

    /// Loads the LB programs into the verifier (unless `xdp` is false: every VIP is in
    /// socket mode and the XDP programs would never run) and makes sure the pin directory
    /// exists.
    fn with_program(
        mut ebpf: Ebpf,
        pin_path: &Path,
        link: Option<Link>,
        mode: u32,
        xdp: bool,
    ) -> Result<Self, DataplaneError> {
        if xdp {
            Self::load_xdp(&mut ebpf)?;
        }
        std::fs::create_dir_all(pin_path).map_err(|source| DataplaneError::Io {
            path: pin_path.to_path_buf(),
            source,
        })?;
        check_pin_dir(pin_path)?;
        Ok(Self {
            ebpf,
            pin_path: pin_path.to_path_buf(),
            link,
            mode,
            left: false,
        })
    }

    /// Loads lb_xdp and the programs it tail-calls into the verifier.
    fn load_xdp(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_LB)
            .ok_or(DataplaneError::Program {
                name: PROG_LB,
                source: ProgramError::UnexpectedProgramType,
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
        fill_progs(ebpf)
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

    /// How many instructions the verifier processed for each loaded program, against its
    /// limit of a million: the margin left for new data-plane code.
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let n = p.info().ok()?.verified_instruction_count()?;
                Some((name.to_string(), n))
            })
            .collect()
    }

    /// The pinned link's id and the id of the program it runs, if attached.
    pub fn link_ids(&self) -> Option<(u32, u32)> {
        let link = self.link.as_ref()?;
        sys::link_info(link.fd.as_fd())
            .ok()
            .map(|i| (i.id, i.prog_id))
    }

    /// Attaches to `interface` through a link pinned under the pin path, so the program stays
    /// attached if the agent's process ends; `auto` tries native mode first, then generic with
    /// a warning. `generic_hazard` (from `generic::generic_hazard`) says why generic mode
    /// would corrupt checksums there: then it is neither used nor fallen back to.
    ///
    /// Adopted, the link's program is replaced in one step (BPF_LINK_UPDATE), so no packet
    /// meets the interface without a program; only a mode other than the adopted one makes
    /// it detach and attach anew.
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
        let attach_err = |label: &'static str| {
            move |source| DataplaneError::Attach {
                interface: interface.to_string(),
                mode: label,
                source,
            }
        };
        let label = match setting {
            XdpModeSetting::Auto => "auto",
            XdpModeSetting::Native => "native",
            XdpModeSetting::Generic => "generic",
        };
        let ifindex = ifindex_of(interface).map_err(attach_err(label))?;
        let link_path = self.pin_path.join(LINK_PIN);
        let staged = self.stage_progs()?;
        if let Some(link) = self.link.as_mut().filter(|l| !l.ours) {
            if link.ifindex != ifindex {
                return Err(DataplaneError::AdoptedElsewhere {
                    path: link_path,
                    adopted: link.ifindex,
                    interface: interface.to_string(),
                    ifindex,
                });
            }
            if mode_fits(setting, self.mode, generic_hazard) {
                let prog = self
                    .ebpf
                    .program(PROG_LB)
                    .and_then(|p| <&Xdp>::try_from(p).ok())
                    .expect("loaded in Dataplane::load");
                let prog_fd = prog.fd().map_err(attach_err(xdp_mode::name(self.mode)))?;
                sys::link_update(link.fd.as_fd(), prog_fd.as_fd()).map_err(|source| {
                    DataplaneError::Link {
                        path: link_path,
                        op: "BPF_LINK_UPDATE",
                        source,
                    }
                })?;
                link.ours = true;
                self.commit_progs(&staged)?;
                self.attach_tc(interface);
                return Ok(self.mode);
            }
            log::warn!(
                "the adopted XDP program runs on {interface} in {} mode, agent.xdp_mode = {setting:?} \
                 wants another: detaching it to attach anew (until then packets meet no XDP program)",
                xdp_mode::name(self.mode)
            );
            self.detach();
        }
        let prog = self
            .ebpf
            .program(PROG_LB)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load");
        let try_mode = |flags: u32, label: &'static str| -> Result<OwnedFd, DataplaneError> {
            let prog_fd = prog.fd().map_err(attach_err(label))?;
            sys::xdp_link_create(prog_fd.as_fd(), ifindex, flags).map_err(|io_error| {
                attach_err(label)(ProgramError::SyscallError(SyscallError {
                    call: "bpf_link_create",
                    io_error,
                }))
            })
        };
        let (fd, mode) = match setting {
            XdpModeSetting::Native => (
                try_mode(sys::XDP_FLAGS_DRV_MODE, "native")?,
                xdp_mode::NATIVE,
            ),
            XdpModeSetting::Generic => (
                try_mode(sys::XDP_FLAGS_SKB_MODE, "generic")?,
                xdp_mode::GENERIC,
            ),
            XdpModeSetting::Auto => match try_mode(sys::XDP_FLAGS_DRV_MODE, "native") {
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
                    (
                        try_mode(sys::XDP_FLAGS_SKB_MODE, "generic")?,
                        xdp_mode::GENERIC,
                    )
                }
            },
        };
        // Unpinned, the link and so the attachment end with this fd if pinning fails.
        sys::obj_pin(fd.as_fd(), &link_path).map_err(|source| DataplaneError::Link {
            path: link_path,
            op: "BPF_OBJ_PIN",
            source,
        })?;
        self.link = Some(Link {
            fd,
            ifindex,
            ours: true,
        });
        self.mode = mode;
        self.commit_progs(&staged)?;
        self.attach_tc(interface);
        Ok(mode)
    }

    /// Pins this object's program array under PROGS_NEXT_PIN: from then on its programs
    /// outlive the agent, as the link's program will need them once `attach` switches.
    fn stage_progs(&self) -> Result<PathBuf, DataplaneError> {
        self.pin_progs(PROGS_NEXT_PIN)
    }

    /// Pins the program array at PROGS_PIN once the link runs this object's program, in
    /// place of the previous program's (whose programs go with it), then drops the staged
    /// pin. bpffs has no rename; the staged pin holds the array in between.
    fn commit_progs(&self, staged: &Path) -> Result<(), DataplaneError> {
        self.pin_progs(PROGS_PIN)?;
        unpin(staged)
    }

    /// Pins this object's program array as `name` under the pin path, in place of
    /// whatever was pinned there.
    fn pin_progs(&self, name: &str) -> Result<PathBuf, DataplaneError> {
        let path = self.pin_path.join(name);
        unpin(&path)?;
        let m = self
            .ebpf
            .map(map::PROGS)
            .ok_or(DataplaneError::MissingMap(map::PROGS))?;
        m.pin(&path).map_err(|source| DataplaneError::Pin {
            name: map::PROGS,
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Attaches lb_tc_local to `interface`'s egress (replacing an earlier agent's). A
    /// failure is logged, not returned: only a local backend on another port than its VIP
    /// needs the program, and the XDP program must not go down for it.
    fn attach_tc(&mut self, interface: &str) {
        if let Err(e) = tc_local::attach(&mut self.ebpf, interface) {
            log::error!(
                "{e}: replies of a backend on this host listening on another port than its VIP's \
                 leave with the wrong source port"
            );
        }
    }

    /// Attaches the socket-mode hooks to `cgroup` (or takes over those an earlier agent
    /// pinned).
    pub fn attach_sock_hooks(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        sock_hooks::attach(&mut self.ebpf, cgroup, &self.pin_path)
    }

    /// Detaches the program and removes the link's pin (idempotent).
    pub fn detach(&mut self) {
        sock_hooks::detach(&self.pin_path);
        if let Some(link) = self.link.take() {
            tc_local::detach(link.ifindex);
            let path = self.pin_path.join(LINK_PIN);
            if let Err(e) = sys::link_detach(link.fd.as_fd()) {
                log::warn!("detaching XDP ({}): {e}", path.display());
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("removing {}: {e}", path.display()),
            }
            self.mode = xdp_mode::NONE;
        }
    }

    /// Ends this agent's hold on the data plane without detaching the program or removing
    /// the pins, so the next agent (an exec'd upgrade) adopts it with `load_or_adopt`.
    pub fn leave(mut self) {
        self.left = true;
    }
}

/// Removes the pin at `path`, if there.
fn unpin(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads the programs PROG_LB tail-calls and puts them in PROGS.
fn fill_progs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_NEW_FLOW)
        .ok_or(DataplaneError::Program {
            name: PROG_NEW_FLOW,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name: PROG_NEW_FLOW,
            source,
        })?;
    let program_err = |source| DataplaneError::Program {
        name: PROG_NEW_FLOW,
        source,
    };
    prog.load().map_err(program_err)?;
    let fd = prog
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(program_err)?;
    let m = ebpf
        .map_mut(map::PROGS)
        .ok_or(DataplaneError::MissingMap(map::PROGS))?;
    let mut progs = ProgramArray::try_from(m).map_err(super::map_err(map::PROGS))?;
    progs
        .set(tail::NEW_FLOW, &fd, 0)
        .map_err(super::map_err(map::PROGS))
}

/// `e` and its causes on one line, as anyhow's `{:#}` prints them.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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
        if self.left {
            return;
        }
        self.detach();
        if let Err(e) = remove_pins(&self.pin_path) {
            log::warn!("removing pins: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopted_mode_is_kept_only_where_the_setting_allows_it() {
        use XdpModeSetting::*;
        let (native, generic) = (xdp_mode::NATIVE, xdp_mode::GENERIC);
        assert!(mode_fits(Native, native, None));
        assert!(!mode_fits(Native, generic, None));
        assert!(mode_fits(Generic, generic, None));
        assert!(!mode_fits(Generic, native, None));
        assert!(mode_fits(Auto, native, Some("veth")));
        // auto fell back to generic for the previous agent: kept, unless it corrupts here.
        assert!(mode_fits(Auto, generic, None));
        assert!(!mode_fits(Auto, generic, Some("veth")));
    }
}
