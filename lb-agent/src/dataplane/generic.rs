//! Where XDP generic (skb) mode would corrupt TCP checksums, so the agent refuses it.
//!
//! Generic mode runs the program on an skb. A packet generated on this host with checksum
//! offload is an skb with CHECKSUM_PARTIAL: its TCP checksum field holds only the
//! pseudo-header sum, and the real checksum is computed later, by the NIC or by the kernel
//! from `csum_start`. Devices that move such an skb from a sender to a receiver without
//! finishing the checksum (a veth handing it to its peer, a tap taking it from a VM) give
//! generic XDP exactly that, and the program's incremental checksum updates (RFC 1624, which
//! assume a complete checksum) then produce wrong checksums. A frame a NIC received from the
//! wire is CHECKSUM_NONE, UNNECESSARY or COMPLETE, never PARTIAL, so a NIC is safe.

use crate::netlink::Link;

/// How deep `generic_hazard` follows stacked devices (a VLAN on a bond on a bridge...).
const MAX_DEPTH: usize = 8;

/// Why generic XDP on link `index` would see CHECKSUM_PARTIAL packets, as a short label for
/// the error ("veth", "bond over veth3 (veth)"); None for a NIC, where it is safe. `links` is
/// every link of the namespace (`Netlink::links`).
pub fn generic_hazard(links: &[Link], index: u32) -> Option<String> {
    hazard(links, index, 0)
}

fn hazard(links: &[Link], index: u32, depth: usize) -> Option<String> {
    let Some(link) = links.iter().find(|l| l.index == index) else {
        return Some("a link in another namespace".into());
    };
    if depth > MAX_DEPTH {
        return Some("devices stacked too deep to check".into());
    }
    if link.loopback {
        // Everything on lo is generated on this host, with partial checksums.
        return Some("loopback".into());
    }
    match link.kind.as_deref() {
        None => match link.parent_bus.as_deref() {
            // Paravirtual NICs hand the guest what the host sent with its checksum left to do
            // (virtio's VIRTIO_NET_HDR_F_NEEDS_CSUM, Xen's NETRXF_csum_blank): traffic from the
            // hypervisor's host or from other VMs on it arrives with CHECKSUM_PARTIAL.
            Some("virtio") => Some("virtio_net".into()),
            Some("xen") => Some("xen-netfront".into()),
            // A device a hardware driver registered: frames from the wire.
            _ => None,
        },
        // These receive what a sender on this host transmitted, as it was transmitted.
        Some("veth") | Some("netkit") => Some(link.kind.clone().expect("matched")),
        Some("tun") => Some("tun/tap".into()),
        // A VLAN's frames are its lower device's.
        Some("vlan") => match link.lower {
            Some(lower) if !link.lower_elsewhere => {
                let why = hazard(links, lower, depth + 1)?;
                Some(format!("vlan over {} ({why})", name(links, lower)))
            }
            _ => Some("vlan over a link in another namespace".into()),
        },
        // A bond's, team's or bridge's frames are its ports'.
        Some(k @ ("bond" | "team" | "bridge")) => links
            .iter()
            .filter(|p| p.master == Some(index) && p.index != index)
            .find_map(|p| {
                let why = hazard(links, p.index, depth + 1)?;
                Some(format!("{k} over {} ({why})", p.name))
            }),
        // Any other virtual device (macvlan, ipvlan, vxlan, geneve, ifb, ...) may carry
        // traffic from this host: macvlan and ipvlan siblings in bridge mode and a vxlan to a
        // local address forward skbs as they were sent, ifb takes redirected ones.
        Some(other) => Some(other.to_string()),
    }
}

fn name(links: &[Link], index: u32) -> String {
    links
        .iter()
        .find(|l| l.index == index)
        .map(|l| l.name.clone())
        .unwrap_or_else(|| format!("ifindex {index}"))
}

/// The refusal of `agent.xdp_mode = "generic"` on `interface`, without the field name.
pub fn refusal(interface: &str, hazard: &str) -> String {
    format!(
        "\"generic\" on {interface} ({hazard}) would corrupt TCP checksums of CHECKSUM_PARTIAL packets; use \"native\" or \"auto\""
    )
}

/// Why `auto` did not fall back to generic mode after native mode failed with `native`.
pub fn no_fallback(interface: &str, hazard: &str, native: &str) -> String {
    format!(
        "\"auto\" on {interface} ({hazard}): native mode failed ({native}), and generic mode there would corrupt TCP checksums of CHECKSUM_PARTIAL packets, so there is no fallback; make native mode work on {interface} or attach to a NIC"
    )
}

/// What a veth's refusal of native XDP (errno `errno`) means: its kernel driver checks its
/// peer (`veth_xdp_set`) and says why only in a netlink message the bpf_link call never gets.
pub fn veth_native_hint(errno: i32) -> Option<&'static str> {
    match errno {
        libc::ERANGE => Some(
            "the peer's MTU is too large for native XDP on a veth: lower it, to 1500 for example",
        ),
        libc::ENOSPC => Some("the veth has fewer RX queues than its peer has TX queues"),
        libc::ENOTCONN => Some("the veth's peer is gone"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            mac: None,
            up: true,
            running: true,
            xdp_prog_id: None,
            kind: kind.map(String::from),
            loopback: false,
            lower: None,
            lower_elsewhere: false,
            master: None,
            parent_bus: Some("pci".into()),
            vlan_id: None,
        }
    }

    fn verdict(links: &[Link], index: u32) -> Option<String> {
        generic_hazard(links, index)
    }

    #[test]
    fn a_nic_is_safe_and_virtual_devices_are_not() {
        let mut lo = link(1, "lo", None);
        lo.loopback = true;
        lo.parent_bus = None;
        let mut virtio = link(3, "ens3", None);
        virtio.parent_bus = Some("virtio".into());
        let mut xen = link(4, "eth9", None);
        xen.parent_bus = Some("xen".into());
        let links = vec![
            lo,
            link(2, "eth0", None),
            virtio,
            xen,
            link(5, "veth0", Some("veth")),
            link(6, "tap0", Some("tun")),
            link(7, "nk0", Some("netkit")),
            link(8, "mv0", Some("macvlan")),
            link(9, "vx0", Some("vxlan")),
        ];
        assert_eq!(verdict(&links, 2), None, "a PCI NIC");
        let refused = [
            (1, "loopback"),
            (3, "virtio_net"),
            (4, "xen-netfront"),
            (5, "veth"),
            (6, "tun/tap"),
            (7, "netkit"),
            (8, "macvlan"),
            (9, "vxlan"),
        ];
        for (i, why) in refused {
            assert_eq!(verdict(&links, i).as_deref(), Some(why), "ifindex {i}");
        }
        // A link that is gone (or in another namespace) is not assumed safe.
        assert_eq!(
            verdict(&links, 99).as_deref(),
            Some("a link in another namespace")
        );
    }

    #[test]
    fn stacked_devices_are_as_safe_as_what_is_below_them() {
        let mut links = vec![
            link(2, "eth0", None),
            link(3, "eth1", None),
            link(4, "bond0", Some("bond")),
            link(5, "bond0.100", Some("vlan")),
            link(6, "veth1", Some("veth")),
            link(7, "br0", Some("bridge")),
            link(8, "br0.7", Some("vlan")),
            link(9, "team0", Some("team")),
        ];
        links[0].master = Some(4);
        links[1].master = Some(4);
        links[3].lower = Some(4);
        links[4].master = Some(7);
        links[6].lower = Some(7);
        assert_eq!(verdict(&links, 4), None, "a bond of NICs");
        assert_eq!(verdict(&links, 5), None, "a VLAN on a bond of NICs");
        assert_eq!(verdict(&links, 9), None, "a team without ports");
        assert_eq!(
            verdict(&links, 7).as_deref(),
            Some("bridge over veth1 (veth)")
        );
        assert_eq!(
            verdict(&links, 8).as_deref(),
            Some("vlan over br0 (bridge over veth1 (veth))")
        );
        // One veth among the bond's ports is enough.
        links[4].master = Some(4);
        assert_eq!(
            verdict(&links, 4).as_deref(),
            Some("bond over veth1 (veth)")
        );
        // A VLAN whose lower device lives in another namespace cannot be checked.
        links[3].lower_elsewhere = true;
        assert_eq!(
            verdict(&links, 5).as_deref(),
            Some("vlan over a link in another namespace")
        );
        // A loop (not something the kernel allows, but netlink answers are data) ends.
        links[4].master = None;
        links[1].kind = Some("bond".into());
        links[1].master = Some(4);
        links[2].master = Some(3);
        let v = verdict(&links, 4);
        assert!(v.is_some_and(|v| v.contains("too deep")));
    }

    #[test]
    fn the_messages_name_the_interface_and_why() {
        assert_eq!(
            refusal("eth1", "veth"),
            "\"generic\" on eth1 (veth) would corrupt TCP checksums of CHECKSUM_PARTIAL packets; use \"native\" or \"auto\""
        );
        let m = no_fallback("eth0", "veth", "bpf_link_create failed: ERANGE");
        assert!(
            m.starts_with(
                "\"auto\" on eth0 (veth): native mode failed (bpf_link_create failed: ERANGE)"
            ),
            "{m}"
        );
        assert!(m.contains("so there is no fallback"), "{m}");
        assert!(!m.contains('\n'));
        assert!(veth_native_hint(libc::ERANGE).is_some_and(|h| h.contains("MTU")));
        assert_eq!(veth_native_hint(libc::EPERM), None);
    }
}
