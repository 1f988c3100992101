//! The virtual addresses while this LB is master.
//!
//! They are added with a valid lifetime of `ADDRESS_LIFETIME` and refreshed every
//! `REFRESH_EVERY`, so when the agent dies (SIGKILL, OOM, panic, a wedged process) the kernel
//! removes them within about a second and a half: the backup that takes over is then the only
//! host answering ARP for the VIP. The address owner (priority 255) is the exception: its
//! addresses are its own, permanent, and never added or removed here.
//!
//! Netlink calls are awaited here, in a task of their own, never in the protocol loop: a slow
//! rtnl lock must not delay an advert.

use std::{net::Ipv4Addr, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    time::{sleep_until, Instant, MissedTickBehavior},
};

use super::garp::Garp;
use crate::netlink::{Address, Netlink};

/// Valid lifetime of a virtual address: the kernel's minimum (it counts in whole seconds).
pub const ADDRESS_LIFETIME: Duration = Duration::from_secs(1);
/// How often a held address is refreshed: five chances before it would expire.
pub const REFRESH_EVERY: Duration = Duration::from_millis(200);
/// keepalived's garp_master_delay: a second round of gratuitous ARPs for switches and hosts
/// that missed the first.
const GARP_AGAIN_AFTER: Duration = Duration::from_secs(5);
/// Refreshes in a row that may fail before holding is given up as failed.
const MAX_REFRESH_FAILURES: u32 = 3;

/// Whether the instance wants the addresses, numbered so the loop can tell when the holder
/// has acted on a particular change. Sent through a watch channel: a change of state is
/// never lost, however busy the holder is, only superseded by a newer one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Want {
    pub hold: bool,
    pub seq: u64,
    /// New gratuitous ARP settings (a reload): count per announcement, and the refresh.
    pub garp: Option<(u32, Option<Duration>)>,
}

/// Side requests; losing one under pressure is harmless (the refresh re-adds a removed
/// address within `REFRESH_EVERY`, and a skipped announcement is repeated by the next).
#[derive(Debug)]
pub enum Command {
    /// Announce the addresses again, `count` ARPs each (only while holding).
    Garp { count: u32 },
    /// The kernel announced that an address went away.
    Removed(Address),
}

/// What the holder tells the protocol loop.
#[derive(Debug)]
pub enum Report {
    /// The addresses could not be added or kept: the instance must not call itself master.
    HoldFailed(String),
    /// The addresses were added.
    Held,
}

/// Adds, keeps, announces and removes one instance's virtual addresses.
pub struct Holder {
    pub nl: Netlink,
    pub ifindex: u32,
    pub ifname: String,
    pub addresses: Vec<(Ipv4Addr, u8)>,
    /// Priority 255: the addresses are the interface's own.
    pub owner: bool,
    pub garp: Garp,
    pub garp_count: u32,
    pub garp_refresh: Option<Duration>,
    pub reports: mpsc::Sender<Report>,
}

impl Holder {
    /// Follows `want` and serves commands until the protocol loop drops its senders;
    /// `applied` says which `Want::seq` the addresses reflect.
    pub async fn run(
        mut self,
        mut want: watch::Receiver<Want>,
        applied: watch::Sender<u64>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut holding = false;
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failures = 0u32;
        let mut garp_again: Option<Instant> = None;
        let mut garp_refresh: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(3600);
        loop {
            tokio::select! {
                biased;
                changed = want.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let w = *want.borrow_and_update();
                    if let Some((count, every)) = w.garp {
                        if (count, every) != (self.garp_count, self.garp_refresh) {
                            self.garp_count = count;
                            self.garp_refresh = every;
                            if holding {
                                garp_refresh = every.map(|d| Instant::now() + d);
                            }
                        }
                    }
                    if w.hold && !holding {
                        match self.add_all().await {
                            Ok(()) => {
                                holding = true;
                                failures = 0;
                                self.announce(self.garp_count);
                                garp_again = Some(Instant::now() + GARP_AGAIN_AFTER);
                                garp_refresh = self.garp_refresh.map(|d| Instant::now() + d);
                                let _ = self.reports.send(Report::Held).await;
                            }
                            Err(e) => self.failed(e).await,
                        }
                    } else if !w.hold {
                        holding = false;
                        garp_again = None;
                        garp_refresh = None;
                        self.remove_all().await;
                    }
                    applied.send_replace(w.seq);
                }
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Garp { count }) => {
                        if holding {
                            self.announce(count);
                        }
                    }
                    Some(Command::Removed(a)) => {
                        if holding && a.index == self.ifindex {
                            if let Some(&(addr, prefix)) =
                                self.addresses.iter().find(|(x, _)| *x == a.addr)
                            {
                                log::warn!(
                                    "VRRP: virtual address {addr}/{prefix} disappeared from {} while master (removed by something else, or not refreshed in time); adding it back",
                                    self.ifname
                                );
                                match self.add(addr, prefix).await {
                                    Ok(()) => self.announce_one(addr, self.garp_count),
                                    Err(e) => {
                                        holding = false;
                                        self.failed(e).await;
                                    }
                                }
                            }
                        }
                    }
                },
                _ = refresh.tick(), if holding && !self.owner => {
                    match self.add_all().await {
                        Ok(()) => failures = 0,
                        Err(e) => {
                            failures += 1;
                            log::warn!("VRRP: refreshing the virtual addresses ({failures} failures in a row): {e}");
                            if failures >= MAX_REFRESH_FAILURES {
                                holding = false;
                                self.failed(e).await;
                            }
                        }
                    }
                }
                _ = sleep_until(garp_again.unwrap_or_else(far)), if garp_again.is_some() => {
                    garp_again = None;
                    if holding {
                        self.announce(self.garp_count);
                    }
                }
                _ = sleep_until(garp_refresh.unwrap_or_else(far)), if garp_refresh.is_some() => {
                    garp_refresh = self.garp_refresh.map(|d| Instant::now() + d);
                    if holding {
                        // One per address: this is upkeep of switch tables, not a takeover.
                        self.announce(1);
                    }
                }
            }
        }
    }

    async fn failed(&self, why: String) {
        let _ = self.reports.send(Report::HoldFailed(why)).await;
    }

    async fn add(&self, addr: Ipv4Addr, prefix: u8) -> Result<(), String> {
        fail::fail_point!("vrrp-add-address", |_| Err(format!(
            "adding {addr}/{prefix} to {}: injected failure",
            self.ifname
        )));
        // The owner's addresses are its own: put back for good, never with a lifetime.
        let lifetime = (!self.owner).then_some(ADDRESS_LIFETIME);
        self.nl
            .add_address(self.ifindex, addr, prefix, lifetime)
            .await
            .map_err(|e| format!("adding {addr}/{prefix} to {}: {e}", self.ifname))
    }

    async fn add_all(&self) -> Result<(), String> {
        if self.owner {
            return Ok(());
        }
        for &(addr, prefix) in &self.addresses {
            self.add(addr, prefix).await?;
        }
        Ok(())
    }

    /// Removes every virtual address found on the interface, also ones left by an agent
    /// that did not stop cleanly. The owner's addresses are never touched.
    async fn remove_all(&self) {
        if self.owner {
            return;
        }
        let present = match self.nl.addresses(self.ifindex).await {
            Ok(p) => p,
            Err(e) => {
                log::error!("VRRP: listing addresses on {}: {e}", self.ifname);
                // Try the configured prefixes anyway; lifetimes end the rest.
                self.addresses
                    .iter()
                    .map(|&(addr, prefix)| Address {
                        index: self.ifindex,
                        addr,
                        prefix,
                        permanent: false,
                    })
                    .collect()
            }
        };
        for (addr, _) in &self.addresses {
            for a in present.iter().filter(|a| a.addr == *addr) {
                if let Err(e) = self.nl.del_address(self.ifindex, a.addr, a.prefix).await {
                    // The lifetime removes it within a second or so anyway.
                    log::error!("VRRP: {e}");
                }
            }
        }
    }

    fn announce(&self, count: u32) {
        for &(addr, _) in &self.addresses {
            self.announce_one(addr, count);
        }
    }

    fn announce_one(&self, addr: Ipv4Addr, count: u32) {
        if count == 0 {
            return;
        }
        if let Err(e) = self.garp.send(addr, count) {
            log::warn!("VRRP: gratuitous ARP for {addr} on {}: {e}", self.ifname);
        }
    }
}
