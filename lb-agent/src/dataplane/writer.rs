//! Turns the config and the backends' states into map contents. A backend's state changes
//! here and only here; Maglev tables are published by writing the idle half of a double
//! buffer and then flipping `active_half` in the VIP's entry, so the XDP program never sees
//! a half-written table.

use std::net::Ipv4Addr;

use lb_common::{
    maglev_index, map, mode, name_bytes, state, AgentMeta, BackendInfo, BackendMeta, VipInfo,
    VipKey, VipMeta, IPPROTO_TCP, NO_BACKEND,
};

use super::{map_err, pinned::PinnedMaps, DataplaneError};
use crate::{
    config::Config,
    maglev::{self, MaglevBackend},
};

/// A VIP as placed in the maps.
#[derive(Debug, Clone)]
pub struct VipPlan {
    pub name: String,
    pub key: VipKey,
    pub info: VipInfo,
    pub backends: Vec<BackendPlan>,
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
}

impl BackendPlan {
    fn info(&self, vip: u32) -> BackendInfo {
        BackendInfo {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            state: self.state,
            _pad: 0,
            vip,
        }
    }
}

/// Index assignment: VIPs in config order, backends numbered across VIPs in config order.
/// Backends with weight 0 start drained; all others up.
pub fn plan(config: &Config, default_snat: Ipv4Addr) -> Vec<VipPlan> {
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
                info: VipInfo {
                    index: i as u32,
                    mode: mode::NAT,
                    snat_addr: u32::from(v.snat_address.unwrap_or(default_snat)).to_be(),
                    snat_port_min: v.snat_ports.0,
                    snat_port_max: v.snat_ports.1,
                    table_size: v.maglev_table_size,
                    active_half: 0,
                },
                backends,
            }
        })
        .collect()
}

/// Writes the data plane's maps.
pub struct Writer {
    pub maps: PinnedMaps,
}

impl Writer {
    /// Writes everything for `vips`: names, backends, tables, and last the VIP entries that
    /// make the XDP program start serving them.
    pub fn install(&mut self, vips: &mut [VipPlan]) -> Result<(), DataplaneError> {
        for v in vips.iter_mut() {
            self.maps
                .vip_meta
                .set(
                    v.info.index,
                    VipMeta {
                        name: name_bytes(&v.name),
                        in_use: 1,
                        _pad: 0,
                    },
                    0,
                )
                .map_err(map_err(map::VIP_META))?;
            for b in &v.backends {
                self.maps
                    .backend_meta
                    .set(
                        b.index,
                        BackendMeta {
                            name: name_bytes(&b.name),
                            weight: b.weight,
                            in_use: 1,
                        },
                        0,
                    )
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

    /// Builds the VIP's table from its up backends, writes the idle half, flips.
    pub fn publish(&mut self, vip: &mut VipPlan) -> Result<(), DataplaneError> {
        let table = table_for(vip);
        let next = vip.info.active_half ^ 1;
        self.maps
            .maglev_write(maglev_index(vip.info.index, next, 0), &table)?;
        let mut info = vip.info;
        info.active_half = next;
        self.maps
            .vips
            .insert(vip.key, info, 0)
            .map_err(map_err(map::VIPS))?;
        vip.info = info;
        Ok(())
    }

    /// Moves backend `b` of `vip` to `new_state`, in the order that never sends a new flow
    /// to a backend marked unusable: join = state first, then table; leave = table first.
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
        let info = vip.backends[b].info(vip.info.index);
        let index = vip.backends[b].index;
        if new_state == state::UP {
            self.maps
                .backends
                .set(index, info, 0)
                .map_err(map_err(map::BACKENDS))?;
            self.publish(vip)
        } else {
            self.publish(vip)?;
            self.maps
                .backends
                .set(index, info, 0)
                .map_err(map_err(map::BACKENDS))
        }
    }

    /// Records how the program is attached, for `lb-agent status`.
    pub fn set_agent_meta(&mut self, meta: AgentMeta) -> Result<(), DataplaneError> {
        self.maps
            .agent_meta
            .set(0, meta, 0)
            .map_err(map_err(map::AGENT_META))
    }
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
