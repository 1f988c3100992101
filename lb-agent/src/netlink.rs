//! rtnetlink, through the design card's `rtnetlink` crate: the addresses VRRP moves (with a
//! valid lifetime, so a dead agent's addresses expire by themselves), link state, the XDP
//! program attached to a link, and a stream of link and address events.
//!
//! Every call is async. A `Netlink` drives its socket from a task on the runtime that opened
//! it: the VRRP thread opens its own, so VRRP never waits on the main runtime's netlink.

use std::{io, net::Ipv4Addr, time::Duration};

use futures_util::{Stream, StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, CacheInfo},
    link::{InfoData, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    RouteNetlinkMessage,
};
use rtnetlink::{new_connection, new_multicast_connection, MulticastGroup};

/// A netlink request that failed; `op` says what was asked.
#[derive(Debug, thiserror::Error)]
#[error("netlink {op}: {source}")]
pub struct NetlinkError {
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    fn new(op: impl Into<String>, e: rtnetlink::Error) -> Self {
        let source = match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            other => io::Error::other(other.to_string()),
        };
        Self {
            op: op.into(),
            source,
        }
    }

    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// What the agent needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Carrier present (IFF_RUNNING).
    pub running: bool,
    /// Id of the XDP program attached in any mode.
    pub xdp_prog_id: Option<u32>,
    /// IFLA_INFO_KIND ("veth", "vlan", "bond"...): None for a device a hardware driver
    /// registered (a NIC) and for the loopback.
    pub kind: Option<String>,
    /// IFF_LOOPBACK.
    pub loopback: bool,
    /// IFLA_LINK: the device below a VLAN (a veth's peer; meaningless for a NIC).
    pub lower: Option<u32>,
    /// IFLA_LINK is an index in another network namespace (IFLA_LINK_NETNSID is set).
    pub lower_elsewhere: bool,
    /// IFLA_MASTER: the bond, team or bridge this link is a port of.
    pub master: Option<u32>,
    /// IFLA_PARENT_DEV_BUS_NAME: the bus of the device behind the link ("pci", "virtio").
    pub parent_bus: Option<String>,
    /// The VLAN id, for a VLAN device.
    pub vlan_id: Option<u16>,
}

impl Link {
    /// Up and with carrier: VRRP can use it.
    pub fn usable(&self) -> bool {
        self.up && self.running
    }

    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            up: m.header.flags.contains(LinkFlags::Up),
            running: m.header.flags.contains(LinkFlags::Running),
            xdp_prog_id: None,
            kind: None,
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            lower: None,
            lower_elsewhere: false,
            master: None,
            parent_bus: None,
            vlan_id: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(b) if b.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(b);
                    link.mac = Some(mac);
                }
                LinkAttribute::Xdp(x) => {
                    for e in x {
                        if let LinkXdp::ProgId(id) = e {
                            if *id != 0 {
                                link.xdp_prog_id = Some(*id);
                            }
                        }
                    }
                }
                LinkAttribute::Link(l) => link.lower = Some(*l),
                LinkAttribute::LinkNetNsId(_) => link.lower_elsewhere = true,
                LinkAttribute::Controller(c) => link.master = Some(*c),
                LinkAttribute::ParentDevBusName(b) => link.parent_bus = Some(b.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vlan(v)) => {
                                for x in v {
                                    if let InfoVlan::Id(id) = x {
                                        link.vlan_id = Some(*id);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// The VLAN devices stacked on link `parent` among `links`: (ifindex, VLAN id).
pub fn vlans_on(links: &[Link], parent: u32) -> Vec<(u32, u16)> {
    links
        .iter()
        .filter(|l| l.lower == Some(parent) && !l.lower_elsewhere)
        .filter_map(|l| Some((l.index, l.vlan_id?)))
        .collect()
}

/// An IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// Configured without a lifetime (an operator's or the system's address, not one of the
    /// agent's VRRP addresses, which always carry one).
    pub permanent: bool,
}

impl Address {
    fn from_message(m: &AddressMessage) -> Option<Self> {
        let mut addr = None;
        let mut permanent = m.header.flags.contains(AddressHeaderFlags::Permanent);
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(std::net::IpAddr::V4(a)) => addr = Some(*a),
                AddressAttribute::Address(std::net::IpAddr::V4(a)) if addr.is_none() => {
                    addr = Some(*a)
                }
                AddressAttribute::Flags(f) => permanent |= f.contains(AddressFlags::Permanent),
                _ => {}
            }
        }
        Some(Address {
            index: m.header.index,
            addr: addr?,
            prefix: m.header.prefix_len,
            permanent,
        })
    }
}

/// A tc filter, as `tc filter show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    /// "bpf", "u32", "flower"...
    pub kind: String,
    pub priority: u16,
    pub handle: u32,
    /// A bpf filter's program name (TCA_BPF_NAME).
    pub bpf_name: Option<String>,
    /// A bpf filter's program id.
    pub bpf_id: Option<u32>,
}

impl TcFilter {
    fn from_message(m: &TcMessage) -> Option<Self> {
        let mut kind = None;
        let mut options = None;
        for a in &m.attributes {
            match a {
                TcAttribute::Kind(k) => kind = Some(k.clone()),
                TcAttribute::Options(o) => options = Some(o),
                _ => {}
            }
        }
        // The dump has a message per priority without options: not a filter.
        let options = options?;
        let mut f = TcFilter {
            kind: kind?,
            priority: (m.header.info >> 16) as u16,
            handle: m.header.handle.into(),
            bpf_name: None,
            bpf_id: None,
        };
        for o in options {
            match o {
                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.bpf_name = Some(n.clone()),
                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => f.bpf_id = Some(*id),
                _ => {}
            }
        }
        Some(f)
    }
}

/// A change the kernel announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A link changed (or was announced); `None` when it was deleted.
    Link { index: u32, link: Option<Link> },
    /// An IPv4 address appeared or changed.
    AddressAdded(Address),
    /// An IPv4 address went away (deleted, or its lifetime ran out).
    AddressRemoved(Address),
}

/// A request connection to the kernel's routing netlink.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a connection whose socket is driven by a task on the current runtime.
    pub fn connect() -> io::Result<Self> {
        let (conn, handle, _) = new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link with index `index`.
    pub async fn link(&self, index: u32) -> Result<Link, NetlinkError> {
        let req = self.handle.link().get().match_index(index);
        first_link(req, || format!("get link {index}")).await
    }

    /// The link named `name`.
    pub async fn link_by_name(&self, name: &str) -> Result<Link, NetlinkError> {
        let req = self.handle.link().get().match_name(name);
        first_link(req, || format!("get link {name}")).await
    }

    /// Every link in this network namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new("list links", e))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The VLAN devices stacked on link `parent`: (ifindex, VLAN id).
    pub async fn vlans(&self, parent: u32) -> Result<Vec<(u32, u16)>, NetlinkError> {
        Ok(vlans_on(&self.links().await?, parent))
    }

    /// The IPv4 addresses on link `index`, in the kernel's order (primary first).
    pub async fn addresses(&self, index: u32) -> Result<Vec<Address>, NetlinkError> {
        let mut req = self.handle.address().get().set_link_index_filter(index);
        req.message_mut().header.family = netlink_packet_route::AddressFamily::Inet;
        let msgs: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new(format!("list addresses of link {index}"), e))?;
        Ok(msgs.iter().filter_map(Address::from_message).collect())
    }

    /// Adds `addr/prefix` to link `index`, or refreshes it if it is there. With a lifetime the
    /// kernel removes the address when the lifetime runs out unless it is refreshed again.
    pub async fn add_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        lifetime: Option<Duration>,
    ) -> Result<(), NetlinkError> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.into(), prefix)
            .replace();
        if let Some(l) = lifetime {
            // Whole seconds, at least one: the kernel refuses a zero valid lifetime.
            let secs = l.as_secs().clamp(1, u32::MAX as u64 - 1) as u32;
            let mut ci = CacheInfo::default();
            ci.ifa_preferred = secs;
            ci.ifa_valid = secs;
            req.message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(ci));
        }
        req.execute()
            .await
            .map_err(|e| NetlinkError::new(format!("add {addr}/{prefix} to link {index}"), e))
    }

    /// Removes `addr/prefix` from link `index`; an address that is not there is fine.
    pub async fn del_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = netlink_packet_route::AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetlinkError::new(format!("remove {addr}/{prefix} from link {index}"), e);
                if matches!(e.errno(), Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV)) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The interface's first IPv4 address (its primary one).
    pub async fn primary_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>, NetlinkError> {
        Ok(self.addresses(index).await?.first().map(|a| a.addr))
    }

    /// Creates `name` as an ipip device in external (collect_md) mode, down: it receives
    /// IPIP from any outer source. EOPNOTSUPP when the kernel has no ipip device type.
    pub async fn add_ipip_external(&self, name: &str) -> Result<(), NetlinkError> {
        let msg = rtnetlink::LinkIpIp::new(name)
            .collect_metadata(true)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("add link {name} type ipip external"), e))
    }

    /// Sets link `index` administratively up.
    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = rtnetlink::LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("set link {index} up"), e))
    }

    /// Deletes link `index`.
    pub async fn del_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("delete link {index}"), e))
    }

    /// Whether link `index` has a clsact qdisc.
    pub async fn has_clsact(&self, index: u32) -> Result<bool, NetlinkError> {
        let msgs: Vec<TcMessage> = self
            .handle
            .qdisc()
            .get()
            .index(index as i32)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new(format!("list qdiscs of link {index}"), e))?;
        // The kernel dumps every link's qdiscs whatever the request's index says.
        Ok(msgs.iter().any(|m| {
            m.header.index == index as i32
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        }))
    }

    /// Removes link `index`'s clsact qdisc, and with it every filter on it; a qdisc that is
    /// not there is fine.
    pub async fn del_clsact(&self, index: u32) -> Result<(), NetlinkError> {
        let mut req = self.handle.qdisc().del(index as i32);
        let m = req.message_mut();
        m.header.parent = TcHandle::CLSACT;
        m.header.handle = TcHandle::from(0xffff_0000u32);
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetlinkError::new(format!("delete the clsact qdisc of link {index}"), e);
                if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The filters on link `index`'s clsact ingress (or egress) hook.
    pub async fn tc_filters(
        &self,
        index: u32,
        egress: bool,
    ) -> Result<Vec<TcFilter>, NetlinkError> {
        let mut h = self.handle.traffic_filter(index as i32);
        let req = h.get();
        let req = if egress { req.egress() } else { req.ingress() };
        let msgs: Result<Vec<TcMessage>, _> = req.execute().try_collect().await;
        let msgs = match msgs {
            Ok(m) => m,
            // No clsact qdisc: no hook, no filters.
            Err(rtnetlink::Error::NetlinkError(m))
                if matches!(
                    m.to_io().raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::ENOENT)
                ) =>
            {
                Vec::new()
            }
            Err(e) => {
                return Err(NetlinkError::new(
                    format!("list tc filters of link {index}"),
                    e,
                ))
            }
        };
        Ok(msgs.iter().filter_map(TcFilter::from_message).collect())
    }
}

/// Link and address events, as `events` yields them.
pub type Events = std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>;

/// The one link a lookup by index or name answers; ENODEV when there is none.
async fn first_link(
    req: rtnetlink::LinkGetRequest,
    op: impl Fn() -> String,
) -> Result<Link, NetlinkError> {
    match req.execute().try_next().await {
        Ok(Some(m)) => Ok(Link::from_message(&m)),
        Ok(None) => Err(NetlinkError {
            op: op(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        }),
        Err(e) => Err(NetlinkError::new(op(), e)),
    }
}

/// Subscribes to link and IPv4 address events (what `ip monitor link address` shows). The
/// socket is driven by a task on the current runtime; the stream ends if that task ends.
pub fn events() -> io::Result<Events> {
    subscribe(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
}

/// Subscribes to link events only (`ip monitor link`), as `events` does.
pub fn link_events() -> io::Result<Events> {
    subscribe(&[MulticastGroup::Link])
}

fn subscribe(groups: &[MulticastGroup]) -> io::Result<Events> {
    let (conn, _handle, messages) = new_multicast_connection(groups)?;
    tokio::spawn(conn);
    Ok(messages
        .filter_map(|(m, _)| async move {
            let NetlinkPayload::InnerMessage(m) = m.payload else {
                return None;
            };
            match m {
                RouteNetlinkMessage::NewLink(l) => Some(Event::Link {
                    index: l.header.index,
                    link: Some(Link::from_message(&l)),
                }),
                RouteNetlinkMessage::DelLink(l) => Some(Event::Link {
                    index: l.header.index,
                    link: None,
                }),
                RouteNetlinkMessage::NewAddress(a) => {
                    Address::from_message(&a).map(Event::AddressAdded)
                }
                RouteNetlinkMessage::DelAddress(a) => {
                    Address::from_message(&a).map(Event::AddressRemoved)
                }
                _ => None,
            }
        })
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::link::InfoKind;

    /// `attrs` as the kernel would send them: emitted to bytes and parsed back.
    fn link(index: u32, flags: LinkFlags, attrs: Vec<LinkAttribute>) -> Link {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = flags;
        m.attributes = attrs;
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        Link::from_message(&LinkMessage::parse(&buf[..]).expect("parses"))
    }

    fn info(kind: InfoKind, data: Option<InfoData>) -> LinkAttribute {
        let mut i = vec![LinkInfo::Kind(kind)];
        i.extend(data.map(LinkInfo::Data));
        LinkAttribute::LinkInfo(i)
    }

    #[test]
    fn links_carry_kind_stacking_and_vlan_id() {
        let nic = link(
            4,
            LinkFlags::Up | LinkFlags::Running,
            vec![
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::ParentDevBusName("pci".into()),
                LinkAttribute::Controller(9),
            ],
        );
        assert_eq!(nic.kind, None);
        assert_eq!(nic.parent_bus.as_deref(), Some("pci"));
        assert_eq!(nic.master, Some(9));
        assert!(nic.usable() && !nic.loopback);

        let lo = link(1, LinkFlags::Loopback | LinkFlags::Up, vec![]);
        assert!(lo.loopback);

        let vlan = link(
            7,
            LinkFlags::Up,
            vec![
                LinkAttribute::IfName("eth0.100".into()),
                LinkAttribute::Link(4),
                info(
                    InfoKind::Vlan,
                    Some(InfoData::Vlan(vec![InfoVlan::Id(100)])),
                ),
            ],
        );
        assert_eq!(vlan.kind.as_deref(), Some("vlan"));
        assert_eq!((vlan.lower, vlan.vlan_id), (Some(4), Some(100)));
        assert!(!vlan.lower_elsewhere);

        // A veth's IFLA_LINK is its peer, often in another namespace.
        let veth = link(
            5,
            LinkFlags::Up,
            vec![
                LinkAttribute::Link(4),
                LinkAttribute::LinkNetNsId(0),
                info(InfoKind::Veth, None),
            ],
        );
        assert_eq!(veth.kind.as_deref(), Some("veth"));
        assert!(veth.lower_elsewhere);

        // Same lower index, but in another namespace: not a VLAN on our eth0.
        let mut far_vlan = vlan.clone();
        far_vlan.index = 8;
        far_vlan.lower_elsewhere = true;
        let macvlan = link(
            10,
            LinkFlags::Up,
            vec![LinkAttribute::Link(4), info(InfoKind::MacVlan, None)],
        );
        let other = link(
            11,
            LinkFlags::Up,
            vec![
                LinkAttribute::Link(3),
                info(InfoKind::Vlan, Some(InfoData::Vlan(vec![InfoVlan::Id(5)]))),
            ],
        );
        let all = [nic, lo, vlan, veth, far_vlan, macvlan, other];
        assert_eq!(vlans_on(&all, 4), vec![(7, 100)]);
        assert_eq!(vlans_on(&all, 3), vec![(11, 5)]);
        assert!(vlans_on(&all, 2).is_empty());
    }
}
