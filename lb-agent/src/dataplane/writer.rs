//! Turns the config and the backends' states into map contents. A backend's state changes
//! here and only here; Maglev tables are published by writing the idle half of a double
//! buffer and then flipping `active_half` in the VIP's entry, so the XDP program never sees
//! a half-written table.

use std::net::Ipv4Addr;

use lb_common::{
    addr_filter, addr_filter_index, backend_info_flags, maglev_index, map, mode, name_bytes, state,
    AgentMeta, BackendInfo, BackendMeta, VipInfo, VipKey, VipMeta, VlanDev, IPPROTO_TCP,
    NO_BACKEND,
};

use super::{map_err, pinned::PinnedMaps, DataplaneError};
use crate::{
    config::{Config, Mode, VipConfig},
    maglev::{self, MaglevBackend},
};

/// A VIP as placed in the maps.
#[derive(Debug, Clone)]
pub struct VipPlan {
    pub name: String,
    pub key: VipKey,
    pub info: VipInfo,
    pub backends: Vec<BackendPlan>,
    /// The table the plan gives, kept from the last publish so a reconcile compares without
    /// rebuilding it; empty when the plan changed since (then it is rebuilt).
    pub table: Vec<u32>,
    /// Taken out of the config by a reload: no VIPS entry (no new connections), but its
    /// backends and address filter stay while their connections are kept.
    pub removed: bool,
}

/// A backend as placed in the maps.
#[derive(Debug, Clone)]
pub struct BackendPlan {
    /// Global index into BACKENDS.
    pub index: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    /// `state::*`.
    pub state: u8,
    /// `backend_flags::*` beyond IN_USE (drained, removed).
    pub flags: u32,
    /// A NAT VIP's backend at an address of this host: its connections pass to the local
    /// stack instead of being NATed.
    pub local: bool,
}

impl BackendPlan {
    fn info(&self, vip: u32) -> BackendInfo {
        BackendInfo {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            state: self.state,
            flags: if self.local {
                backend_info_flags::LOCAL
            } else {
                0
            },
            vip,
        }
    }
}

/// Index assignment: VIPs in config order, backends numbered across VIPs in config order.
/// Backends with weight 0 start drained; all others up. `local` holds this host's
/// addresses: a NAT VIP's backend there is local.
pub fn plan(config: &Config, default_snat: Ipv4Addr, local: &[Ipv4Addr]) -> Vec<VipPlan> {
    let mut next_backend = 0u32;
    config
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let backends = v
                .backends
                .iter()
                .map(|b| {
                    let index = next_backend;
                    next_backend += 1;
                    BackendPlan {
                        index,
                        name: b.name.clone(),
                        addr: b.address,
                        port: b.port,
                        weight: b.weight,
                        state: if b.weight == 0 {
                            state::DRAIN
                        } else {
                            state::UP
                        },
                        flags: 0,
                        local: v.mode == Mode::Nat && local.contains(&b.address),
                    }
                })
                .collect();
            VipPlan {
                name: v.name.clone(),
                key: VipKey {
                    addr: u32::from(v.address).to_be(),
                    port: v.port.to_be(),
                    proto: IPPROTO_TCP,
                    _pad: 0,
                },
                info: vip_info(i as u32, v, default_snat),
                backends,
                table: Vec::new(),
                removed: false,
            }
        })
        .collect()
}

/// The VIPS value for `v` at index `index` (table half 0).
fn vip_info(index: u32, v: &VipConfig, default_snat: Ipv4Addr) -> VipInfo {
    let (mode, snat) = match v.mode {
        Mode::Nat => (
            mode::NAT,
            u32::from(v.snat_address.unwrap_or(default_snat)).to_be(),
        ),
        // No SNAT: the address stays out of ADDR_FILTER and the range empty.
        Mode::DsrL2 => (mode::DSR_L2, 0),
        Mode::DsrIpip => (mode::DSR_IPIP, 0),
        Mode::Socket => (mode::SOCKET, 0),
    };
    let (net, len) = v.ipip_source;
    let host = u32::MAX.checked_shr(len as u32).unwrap_or(0);
    let (port_min, port_max) = if v.mode != Mode::Nat {
        (1, 0)
    } else {
        v.snat_ports
    };
    VipInfo {
        index,
        mode,
        snat_addr: snat,
        snat_port_min: port_min,
        snat_port_max: port_max,
        table_size: v.maglev_table_size,
        active_half: 0,
        mss_clamp: v.mss_clamp.unwrap_or(0),
        _pad: 0,
        encap_src: u32::from(net).to_be(),
        encap_src_mask: host.to_be(),
    }
}

/// Writes the data plane's maps and keeps them equal to what the agent intends: every write
/// that fails leaves the maps "dirty" and `reconcile` (called again until it succeeds, and
/// periodically anyway) compares each map with the plans and repairs what differs.
pub struct Writer {
    pub maps: PinnedMaps,
    /// The agent-wide entry as it should be.
    meta: Option<AgentMeta>,
    /// Entries reconcile found wrong and rewrote, since start.
    pub repairs: u64,
    /// The last repair, in words.
    pub last_repair: Option<String>,
    /// Map writes that failed, since start.
    pub write_failures: u64,
    /// Per VIP index: where the next partial check of its live table starts.
    cursor: std::collections::HashMap<u32, u32>,
}

/// Slots of a live Maglev table one periodic reconcile reads back: reading all 65537 costs
/// about 15 ms of kernel time (the batch lookup copies slot by slot), so a periodic pass
/// checks a window and the whole table is covered every `65537 / WINDOW` passes.
pub const RECONCILE_WINDOW: u32 = 8192;

/// What one reconcile found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Entries found wrong and rewritten (or stale and deleted), in words.
    pub repaired: Vec<String>,
}

impl Writer {
    /// A writer for the maps pinned in `maps`.
    pub fn new(maps: PinnedMaps) -> Self {
        Self {
            maps,
            meta: None,
            repairs: 0,
            last_repair: None,
            write_failures: 0,
            cursor: Default::default(),
        }
    }

    fn failed<T>(&mut self, r: Result<T, DataplaneError>) -> Result<T, DataplaneError> {
        if r.is_err() {
            self.write_failures += 1;
        }
        r
    }

    /// Writes everything for `vips`: names, backends, tables, and last the VIP entries that
    /// make the XDP program start serving them.
    pub fn install(&mut self, vips: &mut [VipPlan]) -> Result<(), DataplaneError> {
        // The filter first: a VIP entry behind a filter that hides its address serves nothing.
        for (i, bits) in filter_slots(vips) {
            self.maps
                .addr_filter
                .set(i, bits, 0)
                .map_err(map_err(map::ADDR_FILTER))?;
        }
        for v in vips.iter_mut() {
            self.maps
                .vip_meta
                .set(v.info.index, vip_meta(v), 0)
                .map_err(map_err(map::VIP_META))?;
            for b in &v.backends {
                self.maps
                    .backend_meta
                    .set(b.index, backend_meta(b), 0)
                    .map_err(map_err(map::BACKEND_META))?;
                self.maps
                    .backends
                    .set(b.index, b.info(v.info.index), 0)
                    .map_err(map_err(map::BACKENDS))?;
                // A restarted agent must not walk the ports it just used: the backend
                // still holds them in TIME_WAIT, and a SYN that meets one stalls.
                self.maps
                    .snat_cursor
                    .set(b.index, random_u64(), 0)
                    .map_err(map_err(map::SNAT_CURSOR))?;
            }
            // The VIP entry does not exist yet: fill half 1 and let publish flip to it.
            v.info.active_half = 1;
            self.publish(v)?;
        }
        Ok(())
    }

    /// Builds the VIP's table from its up backends, writes the half the data plane is not
    /// reading, flips. The live half is read from the map, not assumed: after a repair the
    /// two can differ, and writing the live half would show the program a half-written table.
    pub fn publish(&mut self, vip: &mut VipPlan) -> Result<(), DataplaneError> {
        let _span = tracing::info_span!("publish", vip = %vip.name).entered();
        let r = self.publish_inner(vip);
        self.failed(r)
    }

    fn publish_inner(&mut self, vip: &mut VipPlan) -> Result<(), DataplaneError> {
        fail::fail_point!("map-write", |_| Err(DataplaneError::Injected("map-write")));
        let live = match self.maps.vips.get(&vip.key, 0) {
            Ok(info) => info.active_half,
            Err(aya::maps::MapError::KeyNotFound) => vip.info.active_half ^ 1,
            Err(e) => return Err(map_err(map::VIPS)(e)),
        };
        let table = table_for(vip);
        let next = (live & 1) ^ 1;
        self.maps
            .maglev_write(maglev_index(vip.info.index, next, 0), &table)?;
        vip.table = table;
        let mut info = vip.info;
        info.active_half = next;
        self.maps
            .vips
            .insert(vip.key, info, 0)
            .map_err(map_err(map::VIPS))?;
        vip.info = info;
        Ok(())
    }

    fn write_backend(&mut self, vip: &VipPlan, b: usize) -> Result<(), DataplaneError> {
        fail::fail_point!("map-write", |_| Err(DataplaneError::Injected("map-write")));
        let be = &vip.backends[b];
        let r = self
            .maps
            .backends
            .set(be.index, be.info(vip.info.index), 0)
            .map_err(map_err(map::BACKENDS));
        self.failed(r)
    }

    /// Moves backend `b` of `vip` to `new_state`, in the order that never sends a new flow
    /// to a backend marked unusable: join = state first, then table; leave = table first.
    /// The plan says `new_state` whatever happens: on an error the maps are behind the plan
    /// and `reconcile` brings them level.
    pub fn set_state(
        &mut self,
        vip: &mut VipPlan,
        b: usize,
        new_state: u8,
    ) -> Result<(), DataplaneError> {
        let old = vip.backends[b].state;
        if old == new_state {
            return Ok(());
        }
        vip.backends[b].state = new_state;
        // The plan changed: the cached table no longer says what the maps should hold,
        // even if the publish below fails.
        vip.table.clear();
        if new_state == state::UP {
            self.write_backend(vip, b)?;
            self.publish(vip)
        } else {
            self.publish(vip)?;
            self.write_backend(vip, b)
        }
    }

    /// Writes backend `b`'s BACKEND_META entry (its name, weight and flags).
    pub fn set_backend_meta(&mut self, vip: &VipPlan, b: usize) -> Result<(), DataplaneError> {
        let be = &vip.backends[b];
        let r = self
            .maps
            .backend_meta
            .set(be.index, backend_meta(be), 0)
            .map_err(map_err(map::BACKEND_META));
        self.failed(r)
    }

    /// Records how the program is attached, for `lb-agent status`.
    pub fn set_agent_meta(&mut self, meta: AgentMeta) -> Result<(), DataplaneError> {
        self.meta = Some(meta);
        let r = self
            .maps
            .agent_meta
            .set(0, meta, 0)
            .map_err(map_err(map::AGENT_META));
        self.failed(r)
    }

    /// Makes VLAN_DEVS hold exactly `devs` (ifindex, device): the VLANs on the XDP
    /// interface. Returns what changed, in words.
    pub fn set_vlans(&mut self, devs: &[(u32, VlanDev)]) -> Result<Vec<String>, DataplaneError> {
        let mut changed = Vec::new();
        for (ifindex, dev) in devs {
            if self.maps.vlan_devs.get(ifindex, 0).ok() != Some(*dev) {
                let r = self
                    .maps
                    .vlan_devs
                    .insert(ifindex, dev, 0)
                    .map_err(map_err(map::VLAN_DEVS));
                self.failed(r)?;
                changed.push(format!(
                    "VLAN_DEVS[{ifindex}]: VLAN {}",
                    u16::from_be(dev.vid)
                ));
            }
        }
        let stale: Vec<u32> = self
            .maps
            .vlan_devs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !devs.iter().any(|(i, _)| i == k))
            .collect();
        for k in stale {
            let r = self
                .maps
                .vlan_devs
                .remove(&k)
                .map_err(map_err(map::VLAN_DEVS));
            self.failed(r)?;
            changed.push(format!("VLAN_DEVS[{k}]: removed"));
        }
        Ok(changed)
    }

    /// Compares every map with `vips` and repairs what differs, in the same safe order as
    /// `set_state`: backends that take new flows first, then tables, then the others.
    /// `full` reads back whole Maglev tables; otherwise a window of each. Each repair is
    /// counted: the maps were not what the agent had written.
    pub fn reconcile(
        &mut self,
        vips: &mut [VipPlan],
        full: bool,
    ) -> Result<Reconciled, DataplaneError> {
        let done = self.compare(vips, full)?;
        if let Some(last) = done.repaired.last() {
            self.repairs += done.repaired.len() as u64;
            self.last_repair = Some(last.clone());
        }
        Ok(done)
    }

    /// Writes what differs between the maps and `vips` after the plans changed (a start, a
    /// reload), in reconcile's order, reading back whole tables; nothing counts as a repair.
    pub fn sync(&mut self, vips: &mut [VipPlan]) -> Result<Reconciled, DataplaneError> {
        self.compare(vips, true)
    }

    fn compare(&mut self, vips: &mut [VipPlan], full: bool) -> Result<Reconciled, DataplaneError> {
        let mut done = Reconciled::default();
        let mut note = |what: String| done.repaired.push(what);
        // The filter first: a VIP entry behind a filter that hides its address serves nothing.
        for (i, bits) in filter_slots(vips) {
            if self.maps.addr_filter.get(&i, 0).ok() != Some(bits) {
                let r = self
                    .maps
                    .addr_filter
                    .set(i, bits, 0)
                    .map_err(map_err(map::ADDR_FILTER));
                self.failed(r)?;
                note(format!("ADDR_FILTER[{i}]"));
            }
        }
        for pass_up in [true, false] {
            for v in vips.iter_mut() {
                for b in 0..v.backends.len() {
                    if (v.backends[b].state == state::UP) != pass_up {
                        continue;
                    }
                    let be = &v.backends[b];
                    let want = be.info(v.info.index);
                    let have = self.maps.backends.get(&be.index, 0).ok();
                    if have != Some(want) {
                        let what = format!(
                            "BACKENDS[{}] ({}/{}): {} instead of {}",
                            be.index,
                            v.name,
                            be.name,
                            have.map(|h| state::name(h.state)).unwrap_or("unreadable"),
                            state::name(want.state)
                        );
                        self.write_backend(v, b)?;
                        note(what);
                    }
                    let be = &v.backends[b];
                    let meta = backend_meta(be);
                    if self.maps.backend_meta.get(&be.index, 0).ok() != Some(meta) {
                        let r = self
                            .maps
                            .backend_meta
                            .set(be.index, meta, 0)
                            .map_err(map_err(map::BACKEND_META));
                        self.failed(r)?;
                        note(format!(
                            "BACKEND_META[{}] ({}/{})",
                            be.index, v.name, be.name
                        ));
                    }
                }
                if pass_up && !v.removed {
                    if let Some(why) = self.table_differs(v, full)? {
                        self.publish(v)?;
                        note(format!("VIP {}: {why}", v.name));
                    }
                    let meta = vip_meta(v);
                    if self.maps.vip_meta.get(&v.info.index, 0).ok() != Some(meta) {
                        let r = self
                            .maps
                            .vip_meta
                            .set(v.info.index, meta, 0)
                            .map_err(map_err(map::VIP_META));
                        self.failed(r)?;
                        note(format!("VIP_META[{}] ({})", v.info.index, v.name));
                    }
                }
            }
        }
        // VIP entries the agent did not write make the program serve what nobody configured.
        let stale: Vec<VipKey> = self
            .maps
            .vips
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !vips.iter().any(|v| v.key == *k && !v.removed))
            .collect();
        for k in stale {
            let r = self.maps.vips.remove(&k).map_err(map_err(map::VIPS));
            self.failed(r)?;
            note(format!(
                "VIPS: removed an entry for {}:{} that no VIP has",
                Ipv4Addr::from(u32::from_be(k.addr)),
                u16::from_be(k.port)
            ));
        }
        if let Some(meta) = self.meta {
            if self.maps.agent_meta.get(&0, 0).ok() != Some(meta) {
                self.set_agent_meta(meta)?;
                note("AGENT_META".into());
            }
        }
        Ok(done)
    }

    /// Readies BACKENDS index `i` for a backend new to it: its SNAT walk starts at a random
    /// port and its counters at zero (they may hold a predecessor's).
    pub fn fresh_backend(&mut self, i: u32) -> Result<(), DataplaneError> {
        // A restarted agent must not walk the ports it just used: the backend still holds
        // them in TIME_WAIT, and a SYN that meets one stalls.
        let r = self
            .maps
            .snat_cursor
            .set(i, random_u64(), 0)
            .map_err(map_err(map::SNAT_CURSOR));
        self.failed(r)?;
        let r = zero_per_cpu(&mut self.maps.stats_backend, i, map::STATS_BACKEND);
        self.failed(r)
    }

    /// Readies VIP index `i` for a VIP new to it: counters at zero.
    pub fn fresh_vip(&mut self, i: u32) -> Result<(), DataplaneError> {
        let r = zero_per_cpu(&mut self.maps.stats_vip, i, map::STATS_VIP);
        self.failed(r)
    }

    /// Frees BACKENDS index `i`: the program resets a flow that still names it (as for a
    /// backend that is down) and status no longer lists it.
    pub fn retire_backend(&mut self, i: u32) -> Result<(), DataplaneError> {
        let r = self
            .maps
            .backends
            .set(
                i,
                BackendInfo {
                    state: state::UNUSED,
                    vip: u32::MAX,
                    ..Default::default()
                },
                0,
            )
            .map_err(map_err(map::BACKENDS));
        self.failed(r)?;
        let r = self
            .maps
            .backend_meta
            .set(i, BackendMeta::default(), 0)
            .map_err(map_err(map::BACKEND_META));
        self.failed(r)
    }

    /// Frees VIP index `i` (its VIPS entry is already gone).
    pub fn retire_vip(&mut self, i: u32) -> Result<(), DataplaneError> {
        let r = self
            .maps
            .vip_meta
            .set(i, VipMeta::default(), 0)
            .map_err(map_err(map::VIP_META));
        self.failed(r)
    }

    /// Clears the ADDR_FILTER slots `before` needed and `after` does not: traffic to an
    /// address lb no longer serves passes after one array read again.
    pub fn clear_filter(
        &mut self,
        before: &[VipPlan],
        after: &[VipPlan],
    ) -> Result<(), DataplaneError> {
        let keep = filter_slots(after);
        for (i, _) in filter_slots(before) {
            if keep.binary_search_by_key(&i, |&(k, _)| k).is_err() {
                let r = self
                    .maps
                    .addr_filter
                    .set(i, 0, 0)
                    .map_err(map_err(map::ADDR_FILTER));
                self.failed(r)?;
            }
        }
        Ok(())
    }

    /// Why the live table of `vip` is not the one its plan gives, if it is not (looking at
    /// all of it, or at the next window).
    fn table_differs(
        &mut self,
        vip: &mut VipPlan,
        full: bool,
    ) -> Result<Option<String>, DataplaneError> {
        let info = match self.maps.vips.get(&vip.key, 0) {
            Ok(i) => i,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(Some("VIPS entry missing".into())),
            Err(e) => return Err(map_err(map::VIPS)(e)),
        };
        let expected = VipInfo {
            active_half: info.active_half,
            ..vip.info
        };
        if info != expected || info.active_half > 1 {
            return Ok(Some("VIPS entry differs".into()));
        }
        // The plan follows the map's live half from here on.
        vip.info.active_half = info.active_half;
        if vip.table.len() != vip.info.table_size as usize {
            // Never published (a failed first write): build it to compare.
            vip.table = table_for(vip);
        }
        let size = vip.info.table_size;
        let (start, len) = if full || size <= RECONCILE_WINDOW {
            (0, size)
        } else {
            let c = self.cursor.entry(vip.info.index).or_insert(0);
            let start = *c % size;
            let len = RECONCILE_WINDOW.min(size - start);
            *c = (start + len) % size;
            (start, len)
        };
        let live = self
            .maps
            .maglev_read(maglev_index(vip.info.index, info.active_half, start), len)?;
        let want = &vip.table[start as usize..(start + len) as usize];
        let wrong =
            live.iter().zip(want).filter(|(a, b)| a != b).count() + want.len().abs_diff(live.len());
        Ok((wrong > 0).then(|| format!("{wrong} Maglev slots differ")))
    }
}

/// ADDR_FILTER slots the VIPs' addresses and SNAT addresses hash to, with their
/// `addr_filter` bits, in slot order: the program looks at nothing else.
fn filter_slots(vips: &[VipPlan]) -> Vec<(u32, u32)> {
    let mut slots = std::collections::BTreeMap::new();
    for v in vips {
        // The XDP program has nothing to do with a socket-mode VIP's address.
        if v.info.mode == mode::SOCKET {
            continue;
        }
        let dsr = if v.info.mode == mode::NAT {
            0
        } else {
            addr_filter::DSR
        };
        // A local backend's connections live in DSR_FLOWS too.
        let local = v.backends.iter().filter(|b| b.local);
        let mut local_bits = 0;
        for b in local {
            local_bits |= addr_filter::DSR;
            if b.port.to_be() != v.key.port {
                local_bits |= addr_filter::LOCAL_PORT;
            }
        }
        *slots.entry(addr_filter_index(v.key.addr)).or_insert(0) |=
            addr_filter::LB | dsr | local_bits;
        if v.info.snat_addr != 0 {
            *slots
                .entry(addr_filter_index(v.info.snat_addr))
                .or_insert(0) |= addr_filter::LB;
        }
    }
    slots.into_iter().collect()
}

fn vip_meta(v: &VipPlan) -> VipMeta {
    VipMeta {
        name: name_bytes(&v.name),
        in_use: 1,
        _pad: 0,
    }
}

fn backend_meta(b: &BackendPlan) -> BackendMeta {
    BackendMeta {
        name: name_bytes(&b.name),
        weight: b.weight,
        in_use: lb_common::backend_flags::IN_USE | b.flags,
    }
}

/// Sets every CPU's copy of per-CPU array entry `i` to zero.
fn zero_per_cpu<T: aya::Pod + Default + Clone>(
    m: &mut aya::maps::PerCpuArray<aya::maps::MapData, T>,
    i: u32,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
        path: "/sys/devices/system/cpu/possible".into(),
        source,
    })?;
    let zeros = aya::maps::PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|source| {
        DataplaneError::Io {
            path: name.into(),
            source,
        }
    })?;
    m.set(i, zeros, 0).map_err(map_err(name))
}

/// A random number from the standard library's per-process SipHash keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// The Maglev table of a VIP as global backend indices (NO_BACKEND where none).
pub fn table_for(vip: &VipPlan) -> Vec<u32> {
    let members: Vec<MaglevBackend<'_>> = vip
        .backends
        .iter()
        .map(|b| MaglevBackend {
            name: &b.name,
            weight: if b.state == state::UP { b.weight } else { 0 },
        })
        .collect();
    maglev::build(&members, vip.info.table_size)
        .into_iter()
        .map(|i| {
            if i == NO_BACKEND {
                NO_BACKEND
            } else {
                vip.backends[i as usize].index
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_plan_carries_each_vips_mss_clamp() {
        let text = "[agent]\ninterface = \"eth0\"\n\n\
            [[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\nmss_clamp = 1360\n\
            [[vip.backend]]\nname = \"m\"\naddress = \"198.18.0.11\"\n\n\
            [[vip]]\nname = \"konn\"\naddress = \"198.18.0.100\"\nport = 8132\n\
            [[vip.backend]]\nname = \"m\"\naddress = \"198.18.0.11\"\n";
        let config = Config::parse(Path::new("lb.toml"), text).expect("valid config");
        let plans = plan(&config, Ipv4Addr::new(198, 18, 0, 2), &[]);
        assert_eq!(plans[0].info.mss_clamp, 1360);
        assert_eq!(plans[1].info.mss_clamp, 0, "absent: no clamp");
    }
}
