//! Rare events for the agent's log: one per reason per CPU per second at most, with the
//! count of those held back. Reached only from `stats::reason` for the reasons of
//! `lb_common::event::REASONS`, never from a healthy flow's path.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use lb_common::{event, DataplaneEvent};

use crate::{EVENTS, EVENT_RATE};

/// Reason `r` happened: tell the agent, unless this CPU did within the last second.
#[inline(always)]
pub fn note(r: u32) {
    let Some(rate) = EVENT_RATE.get_ptr_mut(r) else {
        return;
    };
    // SAFETY: a per-CPU slot, this CPU's alone while the program runs.
    let rate = unsafe { &mut *rate };
    let now = unsafe { bpf_ktime_get_ns() };
    if rate.last_ns != 0 && now.wrapping_sub(rate.last_ns) < event::INTERVAL_NS {
        rate.suppressed += 1;
        return;
    }
    let ev = DataplaneEvent {
        reason: r,
        cpu: unsafe { bpf_get_smp_processor_id() },
        suppressed: rate.suppressed,
        ktime_ns: now,
    };
    if EVENTS.output::<DataplaneEvent>(&ev, 0).is_ok() {
        rate.last_ns = now;
        rate.suppressed = 0;
    } else {
        // The ring is full (the agent reads nothing): counted, and tried again next time.
        rate.suppressed += 1;
    }
}
