//! The data plane's maps, opened from their pins. The agent writes through this and
//! `lb-agent status` reads through it, so both see exactly what the XDP program sees.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    map, AgentMeta, BackendInfo, BackendMeta, Flow, FlowKey, TrafficStats, VipInfo, VipKey,
    VipMeta, VlanDev,
};

use super::{map_err, sys, DataplaneError};

/// Every map of the data plane, typed.
pub struct PinnedMaps {
    pub pin_path: PathBuf,
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    pub backends: Array<MapData, BackendInfo>,
    /// Raw: written and read in batches (a table is 2 x 65537 slots).
    pub maglev: MapData,
    pub flows: HashMap<MapData, FlowKey, Flow>,
    pub half_open: HashMap<MapData, FlowKey, Flow>,
    pub dsr_flows: HashMap<MapData, FlowKey, Flow>,
    pub addr_filter: Array<MapData, u32>,
    pub vlan_devs: HashMap<MapData, u32, VlanDev>,
    pub stats_vip: PerCpuArray<MapData, TrafficStats>,
    pub stats_backend: PerCpuArray<MapData, TrafficStats>,
    pub stats_reason: PerCpuArray<MapData, u64>,
    pub vip_meta: Array<MapData, VipMeta>,
    pub backend_meta: Array<MapData, BackendMeta>,
    pub agent_meta: Array<MapData, AgentMeta>,
    pub snat_cursor: Array<MapData, u64>,
}

/// What the flow tables hold.
pub struct FlowCounts {
    /// Connections per backend index, over all tables.
    pub by_backend: std::collections::BTreeMap<u32, u64>,
    /// Connections in FLOWS.
    pub flows: u64,
    /// Connections in HALF_OPEN.
    pub half_open: u64,
    /// Connections in DSR_FLOWS.
    pub dsr: u64,
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of `Flow::last_seen_ns`.
pub fn monotonic_coarse_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The kernel memory charged to a map (its fdinfo's `memlock`), 0 if unreadable.
fn memlock(m: &MapData) -> u64 {
    let path = format!("/proc/self/fdinfo/{}", m.fd().as_fd().as_raw_fd());
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opens a pinned map read-only (aya's `from_pin` asks for write access too).
fn open_read_only(path: &Path) -> std::io::Result<MapData> {
    let fd = sys::obj_get(path, sys::BPF_F_RDONLY)?;
    MapData::from_fd(fd).map_err(std::io::Error::other)
}

fn open_data(dir: &Path, name: &'static str, read_only: bool) -> Result<MapData, DataplaneError> {
    let path = dir.join(name);
    if read_only {
        open_read_only(&path).map_err(|source| DataplaneError::Io { path, source })
    } else {
        MapData::from_pin(path).map_err(map_err(name))
    }
}

fn open(dir: &Path, name: &'static str, read_only: bool) -> Result<Map, DataplaneError> {
    Map::from_map_data(open_data(dir, name, read_only)?).map_err(map_err(name))
}

macro_rules! typed {
    ($dir:expr, $name:expr, $ro:expr) => {{
        let name: &'static str = $name;
        open($dir, name, $ro)?.try_into().map_err(map_err(name))?
    }};
}

impl PinnedMaps {
    /// True when the pin directory holds lb's maps (an agent runs, or crashed).
    pub fn present(dir: &Path) -> bool {
        dir.join(map::VIPS).exists()
    }

    /// Opens every map pinned under `dir` for reading and writing (the agent).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Self::open_with(dir, false)
    }

    /// Opens every map pinned under `dir` for reading only: `lb-agent status` works for
    /// whoever may read the pins.
    pub fn open_read_only(dir: &Path) -> Result<Self, DataplaneError> {
        Self::open_with(dir, true)
    }

    fn open_with(dir: &Path, ro: bool) -> Result<Self, DataplaneError> {
        Ok(Self {
            pin_path: dir.to_path_buf(),
            vips: typed!(dir, map::VIPS, ro),
            backends: typed!(dir, map::BACKENDS, ro),
            maglev: open_data(dir, map::MAGLEV, ro)?,
            flows: typed!(dir, map::FLOWS, ro),
            half_open: typed!(dir, map::HALF_OPEN, ro),
            dsr_flows: typed!(dir, map::DSR_FLOWS, ro),
            addr_filter: typed!(dir, map::ADDR_FILTER, ro),
            vlan_devs: typed!(dir, map::VLAN_DEVS, ro),
            stats_vip: typed!(dir, map::STATS_VIP, ro),
            stats_backend: typed!(dir, map::STATS_BACKEND, ro),
            stats_reason: typed!(dir, map::STATS_REASON, ro),
            vip_meta: typed!(dir, map::VIP_META, ro),
            backend_meta: typed!(dir, map::BACKEND_META, ro),
            agent_meta: typed!(dir, map::AGENT_META, ro),
            snat_cursor: typed!(dir, map::SNAT_CURSOR, ro),
        })
    }

    /// Connections per backend index (FLOWS and HALF_OPEN, the client's direction only:
    /// each connection has an entry per direction; DSR_FLOWS), and in FLOWS, HALF_OPEN and
    /// DSR_FLOWS in all.
    /// With `now` (the coarse monotonic clock, as `monotonic_coarse_ns` reads it), only
    /// those not over yet (`Flow::over`); otherwise every entry.
    pub fn flows_by_backend(&self, now: Option<u64>) -> FlowCounts {
        let mut by_backend = std::collections::BTreeMap::new();
        let mut count = |m: &HashMap<MapData, FlowKey, Flow>| {
            let mut n = 0u64;
            for (_, v) in m.iter().filter_map(Result::ok) {
                if v.flags & lb_common::flow_flags::REPLY == 0 && !now.is_some_and(|t| v.over(t)) {
                    n += 1;
                    *by_backend.entry(v.backend).or_default() += 1;
                }
            }
            n
        };
        let flows = count(&self.flows);
        let half_open = count(&self.half_open);
        let dsr = count(&self.dsr_flows);
        FlowCounts {
            by_backend,
            flows,
            half_open,
            dsr,
        }
    }

    /// Capacity and kernel memory of the flow tables, from each map's pin.
    pub fn flow_table(&self) -> crate::status::FlowTable {
        let mut t = crate::status::FlowTable::default();
        for name in map::ALL {
            let Ok(m) = open_read_only(&self.pin_path.join(name)) else {
                continue;
            };
            let bytes = memlock(&m);
            t.all_maps_bytes += bytes;
            let entries = m.info().map(|i| i.max_entries() as u64).unwrap_or(0);
            if name == map::FLOWS {
                t.capacity = entries / 2;
                t.bytes += bytes;
            } else if name == map::HALF_OPEN {
                t.half_open_capacity = entries / 2;
                t.bytes += bytes;
            } else if name == map::DSR_FLOWS {
                t.dsr_capacity = entries;
                t.bytes += bytes;
            }
        }
        t
    }

    /// Writes `values` into MAGLEV starting at `first` with one BPF_MAP_UPDATE_BATCH.
    pub fn maglev_write(&self, first: u32, values: &[u32]) -> Result<(), DataplaneError> {
        let keys: Vec<u32> = (first..first + values.len() as u32).collect();
        let mut count = values.len() as u32;
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count,
            map_fd: self.maglev.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        batch(sys::BPF_MAP_UPDATE_BATCH, &mut attr, "update batch")?;
        count = attr.count;
        if count as usize != values.len() {
            return Err(DataplaneError::Syscall {
                name: map::MAGLEV,
                op: "update batch",
                source: std::io::Error::other(format!("wrote {count} of {}", values.len())),
            });
        }
        Ok(())
    }

    /// Reads `len` MAGLEV slots starting at `first` with BPF_MAP_LOOKUP_BATCH.
    pub fn maglev_read(&self, first: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        let mut keys = vec![0u32; len as usize];
        let mut values = vec![0u32; len as usize];
        let mut done = 0usize;
        // in_batch names the key *before* the first one returned (NULL: from the start).
        let mut in_batch: u32 = first.wrapping_sub(1);
        let mut out_batch: u32 = 0;
        let mut first_call = true;
        while done < len as usize {
            let mut attr = BatchAttr {
                in_batch: if first_call && first == 0 {
                    0
                } else {
                    &in_batch as *const u32 as u64
                },
                out_batch: &mut out_batch as *mut u32 as u64,
                keys: keys[done..].as_mut_ptr() as u64,
                values: values[done..].as_mut_ptr() as u64,
                count: len - done as u32,
                map_fd: self.maglev.fd().as_fd().as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            let r = batch(sys::BPF_MAP_LOOKUP_BATCH, &mut attr, "lookup batch");
            done += attr.count as usize;
            match r {
                Ok(()) => {}
                Err(DataplaneError::Syscall { ref source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    break
                }
                Err(e) => return Err(e),
            }
            in_batch = out_batch;
            first_call = false;
            if attr.count == 0 {
                break;
            }
        }
        values.truncate(done);
        Ok(values)
    }
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn batch(cmd: libc::c_long, attr: &mut BatchAttr, op: &'static str) -> Result<(), DataplaneError> {
    // SAFETY: attr is the batch member; the buffers it points to outlive the call.
    unsafe { sys::bpf(cmd, attr) }
        .map(drop)
        .map_err(|source| DataplaneError::Syscall {
            name: map::MAGLEV,
            op,
            source,
        })
}
