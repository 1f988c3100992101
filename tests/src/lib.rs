//! Test support for lb: lab harness (namespaces, veth, bridge) and helpers for end-to-end tests.

pub mod http;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod tls;
