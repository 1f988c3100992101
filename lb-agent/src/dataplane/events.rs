//! The data plane's rare events (EVENTS, a ring buffer): each becomes one structured log
//! event. The data plane holds them to one per reason per CPU per second and says how many
//! it held back, so a flood costs a line a second, not a line a packet.

use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use lb_common::{map, reason, DataplaneEvent};
use tokio::{io::unix::AsyncFd, sync::watch};

use super::DataplaneError;

/// Opens the pinned EVENTS under `pin_path` for reading.
pub fn open(pin_path: &Path) -> Result<RingBuf<MapData>, DataplaneError> {
    let path = pin_path.join(map::EVENTS);
    let data = MapData::from_pin(&path).map_err(super::map_err(map::EVENTS))?;
    let m = Map::from_map_data(data).map_err(super::map_err(map::EVENTS))?;
    RingBuf::try_from(m).map_err(super::map_err(map::EVENTS))
}

/// What an operator should know about reason `r`, and what to do.
pub fn explain(r: u32) -> &'static str {
    match r {
        reason::DROP_SNAT_EXHAUSTED => {
            "no free SNAT port: a new connection was dropped (widen the VIP's snat_ports)"
        }
        reason::DROP_FLOW_INSERT => {
            "the flow table is full: a new connection was dropped (raise agent.max_flows)"
        }
        reason::DROP_FIB_UNREACHABLE => "no route to a backend: its packets are dropped",
        reason::PASS_FIB_OTHER => {
            "the FIB could not resolve a backend's next hop: packets went to the kernel's stack"
        }
        reason::HALF_OPEN_RECYCLED => {
            "SYN flood: the half-open table is full and its oldest entries are recycled (established connections are not affected)"
        }
        reason::DROP_TAIL_CALL => {
            "the new-flow program is missing from PROGS: new connections are dropped (restart the agent)"
        }
        _ => "a data-plane event",
    }
}

/// Decodes one ring buffer item.
pub fn decode(item: &[u8]) -> Option<DataplaneEvent> {
    (item.len() >= std::mem::size_of::<DataplaneEvent>())
        // SAFETY: plain old data of the size checked; the kernel aligns items to 8 bytes,
        // read_unaligned does not rely on it.
        .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DataplaneEvent>()) })
}

/// Logs one event.
pub fn log(ev: &DataplaneEvent) {
    let name = reason::NAMES
        .get(ev.reason as usize)
        .copied()
        .unwrap_or("unknown");
    let more = if ev.suppressed > 0 {
        format!(
            " ({} more on CPU {} since its last report)",
            ev.suppressed, ev.cpu
        )
    } else {
        String::new()
    };
    tracing::warn!(
        event = "dataplane",
        reason = name,
        cpu = ev.cpu,
        suppressed = ev.suppressed,
        "data plane: {}{more}",
        explain(ev.reason)
    );
}

/// Logs the events of `ring` as they come, until `stop` turns true.
pub async fn follow(ring: RingBuf<MapData>, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    // SAFETY: the ring owns its map's fd, open for as long as the AsyncFd owns the ring.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| format!("EVENTS: {}", std::io::Error::from(e)))?;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            guard = fd.readable_mut() => {
                let mut guard = guard.map_err(|e| format!("EVENTS: {e}"))?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(ev) = decode(&item) {
                        log(&ev);
                    }
                }
                guard.clear_ready();
            }
        }
    }
}
