//! Test support for lb: lab harness (namespaces, veth, bridge) and helpers for end-to-end tests.

pub mod bench;
pub mod cgroup;
pub mod endpointslice;
pub mod fixture;
pub mod flood;
pub mod http;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod socket_lab;
pub mod systemd;
pub mod tls;
pub mod vrrp_lab;
