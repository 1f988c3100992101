//! The `kubernetes` Service's EndpointSlices as the apiserver sends them (a list, then watch
//! events), and what the agent takes from them: the ready IPv4 endpoints, each with the
//! port of its slice's port named "https" (or of its only port). Pure: fed bytes, it says
//! what the apiservers are now.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use serde::Deserialize;

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    items: Option<Vec<EndpointSlice>>,
}

#[derive(Deserialize)]
struct EndpointSlice {
    #[serde(default)]
    metadata: Meta,
    #[serde(rename = "addressType", default)]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    ports: Option<Vec<Port>>,
}

#[derive(Deserialize)]
struct Endpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Conditions,
}

#[derive(Deserialize, Default)]
struct Conditions {
    /// Unset means ready (the API's rule: consumers treat unknown as ready).
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct Port {
    name: Option<String>,
    port: Option<i64>,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

#[derive(Deserialize, Default)]
struct Status {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

/// The endpoints a slice contributes: its ready IPv4 addresses at its apiserver port.
fn members(s: &EndpointSlice) -> BTreeSet<SocketAddrV4> {
    let name = &s.metadata.name;
    if s.address_type != "IPv4" {
        log::debug!(
            "EndpointSlice {name}: addressType {:?} skipped (lb serves IPv4 only)",
            s.address_type
        );
        return BTreeSet::new();
    }
    let ports = s.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("https"))
        .or(match ports {
            [only] => Some(only),
            _ => None,
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0);
    let Some(port) = port else {
        log::debug!(
            "EndpointSlice {name}: no port named \"https\" and not exactly one port: skipped"
        );
        return BTreeSet::new();
    };
    let mut out = BTreeSet::new();
    for e in s.endpoints.as_deref().unwrap_or_default() {
        if e.conditions.ready == Some(false) {
            continue;
        }
        for a in &e.addresses {
            match a.parse::<Ipv4Addr>() {
                Ok(ip) => {
                    out.insert(SocketAddrV4::new(ip, port));
                }
                Err(_) => log::debug!("EndpointSlice {name}: address {a:?} skipped (not IPv4)"),
            }
        }
    }
    out
}

/// One watch event, as far as the agent cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// ADDED or MODIFIED: this slice's endpoints are now these.
    Slice {
        name: String,
        members: BTreeSet<SocketAddrV4>,
        resource_version: String,
    },
    /// DELETED.
    Deleted {
        name: String,
        resource_version: String,
    },
    /// BOOKMARK: nothing changed up to this version.
    Bookmark { resource_version: String },
    /// ERROR: the watch cannot go on (410 Gone: the version is too old); list again.
    Error { code: i64, message: String },
}

/// Parses one line of a watch's stream.
pub fn parse_event(line: &[u8]) -> Result<Event, String> {
    let raw: RawEvent =
        serde_json::from_slice(line).map_err(|e| format!("a watch event that is not one: {e}"))?;
    let slice = |o: serde_json::Value| {
        serde_json::from_value::<EndpointSlice>(o)
            .map_err(|e| format!("a {} event without an EndpointSlice: {e}", raw.kind))
    };
    Ok(match raw.kind.as_str() {
        "ADDED" | "MODIFIED" => {
            let s = slice(raw.object)?;
            Event::Slice {
                members: members(&s),
                name: s.metadata.name,
                resource_version: s.metadata.resource_version,
            }
        }
        "DELETED" => {
            let s = slice(raw.object)?;
            Event::Deleted {
                name: s.metadata.name,
                resource_version: s.metadata.resource_version,
            }
        }
        "BOOKMARK" => Event::Bookmark {
            resource_version: slice(raw.object)?.metadata.resource_version,
        },
        "ERROR" => {
            let s: Status = serde_json::from_value(raw.object).unwrap_or_default();
            Event::Error {
                code: s.code,
                message: s.message,
            }
        }
        other => return Err(format!("a watch event of unknown type {other:?}")),
    })
}

/// The slices the agent knows of, by name, and the version they are at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slices {
    by_name: BTreeMap<String, BTreeSet<SocketAddrV4>>,
    /// The resource version to watch from.
    pub resource_version: String,
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The slices moved to a new version (the apiservers may or may not have changed).
    Moved,
    /// The watch cannot go on: list again (why).
    Relist(String),
}

impl Slices {
    /// The slices of a list answer.
    pub fn from_list(body: &[u8]) -> Result<Self, String> {
        let list: List = serde_json::from_slice(body)
            .map_err(|e| format!("an EndpointSlice list that is not one: {e}"))?;
        if list.metadata.resource_version.is_empty() {
            return Err("an EndpointSlice list without a resourceVersion".into());
        }
        let mut by_name = BTreeMap::new();
        for s in list.items.unwrap_or_default() {
            by_name.insert(s.metadata.name.clone(), members(&s));
        }
        Ok(Self {
            by_name,
            resource_version: list.metadata.resource_version,
        })
    }

    /// Applies a watch event.
    pub fn apply(&mut self, ev: Event) -> Step {
        let rv = match ev {
            Event::Slice {
                name,
                members,
                resource_version,
            } => {
                self.by_name.insert(name, members);
                resource_version
            }
            Event::Deleted {
                name,
                resource_version,
            } => {
                self.by_name.remove(&name);
                resource_version
            }
            Event::Bookmark { resource_version } => resource_version,
            Event::Error { code, message } => {
                return Step::Relist(format!("the watch ended with error {code}: {message}"))
            }
        };
        // An event without a version would make the next watch start from nowhere.
        if !rv.is_empty() {
            self.resource_version = rv;
        }
        Step::Moved
    }

    /// The apiservers: every slice's endpoints together.
    pub fn members(&self) -> BTreeSet<SocketAddrV4> {
        self.by_name.values().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// What a kube-apiserver answers for the `kubernetes` Service (trimmed).
    const LIST: &str = r#"{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1",
        "metadata":{"resourceVersion":"1207"},
        "items":[{"metadata":{"name":"kubernetes","namespace":"default","resourceVersion":"1100",
            "labels":{"kubernetes.io/service-name":"kubernetes"}},
          "addressType":"IPv4",
          "endpoints":[{"addresses":["192.0.2.11"],"conditions":{"ready":true}},
                       {"addresses":["192.0.2.12"],"conditions":{}},
                       {"addresses":["192.0.2.13"],"conditions":{"ready":false}}],
          "ports":[{"name":"https","port":6443,"protocol":"TCP"}]}]}"#;

    #[test]
    fn a_list_gives_the_ready_endpoints_at_the_https_port() {
        let s = Slices::from_list(LIST.as_bytes()).unwrap();
        assert_eq!(s.resource_version, "1207");
        assert_eq!(
            s.members(),
            [addr("192.0.2.11:6443"), addr("192.0.2.12:6443")].into()
        );
        let empty =
            Slices::from_list(br#"{"metadata":{"resourceVersion":"5"},"items":[]}"#).unwrap();
        assert!(empty.members().is_empty());
        assert!(Slices::from_list(br#"{"items":[]}"#).is_err(), "no version");
        assert!(Slices::from_list(b"<html>").is_err());
    }

    #[test]
    fn ports_addresses_and_families() {
        let slice = |ports: &str, family: &str, addresses: &str| {
            let list = format!(
                r#"{{"metadata":{{"resourceVersion":"1"}},"items":[{{"metadata":{{"name":"s"}},
                "addressType":"{family}","endpoints":[{{"addresses":[{addresses}]}}],"ports":{ports}}}]}}"#
            );
            Slices::from_list(list.as_bytes()).unwrap().members()
        };
        let one = r#"[{"port":443}]"#;
        assert_eq!(
            slice(one, "IPv4", r#""192.0.2.11""#),
            [addr("192.0.2.11:443")].into(),
            "the only port, unnamed"
        );
        let two = r#"[{"name":"metrics","port":10259},{"name":"https","port":6443}]"#;
        assert_eq!(
            slice(two, "IPv4", r#""192.0.2.11""#),
            [addr("192.0.2.11:6443")].into()
        );
        let no_https = r#"[{"name":"a","port":1},{"name":"b","port":2}]"#;
        assert!(slice(no_https, "IPv4", r#""192.0.2.11""#).is_empty());
        assert!(slice("[]", "IPv4", r#""192.0.2.11""#).is_empty());
        assert!(slice("null", "IPv4", r#""192.0.2.11""#).is_empty());
        assert!(slice(one, "IPv6", r#""2001:db8::11""#).is_empty());
        assert_eq!(
            slice(one, "IPv4", r#""2001:db8::11", "192.0.2.12""#),
            [addr("192.0.2.12:443")].into(),
            "a stray non-IPv4 address is skipped"
        );
    }

    #[test]
    fn events() {
        let ev = |s: &str| parse_event(s.as_bytes()).unwrap();
        let modified = ev(r#"{"type":"MODIFIED","object":{"kind":"EndpointSlice",
            "metadata":{"name":"kubernetes","resourceVersion":"1300"},"addressType":"IPv4",
            "endpoints":[{"addresses":["192.0.2.11"]},{"addresses":["192.0.2.14"]}],
            "ports":[{"name":"https","port":6443}]}}"#);
        assert_eq!(
            modified,
            Event::Slice {
                name: "kubernetes".into(),
                members: [addr("192.0.2.11:6443"), addr("192.0.2.14:6443")].into(),
                resource_version: "1300".into()
            }
        );
        let mut s = Slices::from_list(LIST.as_bytes()).unwrap();
        assert_eq!(s.apply(modified), Step::Moved);
        assert_eq!(s.resource_version, "1300");
        assert_eq!(
            s.members(),
            [addr("192.0.2.11:6443"), addr("192.0.2.14:6443")].into()
        );
        // A second slice adds its endpoints; deleting it takes them away again.
        let added = ev(
            r#"{"type":"ADDED","object":{"metadata":{"name":"kubernetes-2","resourceVersion":"1301"},
            "addressType":"IPv4","endpoints":[{"addresses":["192.0.2.15"]}],"ports":[{"name":"https","port":6443}]}}"#,
        );
        s.apply(added);
        assert_eq!(s.members().len(), 3);
        let bookmark = ev(
            r#"{"type":"BOOKMARK","object":{"kind":"EndpointSlice","metadata":{"resourceVersion":"1400"}}}"#,
        );
        assert_eq!(
            bookmark,
            Event::Bookmark {
                resource_version: "1400".into()
            }
        );
        s.apply(bookmark);
        assert_eq!(s.resource_version, "1400");
        assert_eq!(s.members().len(), 3);
        s.apply(ev(r#"{"type":"DELETED","object":{"metadata":{"name":"kubernetes-2","resourceVersion":"1401"}}}"#));
        assert_eq!(s.members().len(), 2);
        assert_eq!(s.resource_version, "1401");
        // 410 Gone: list again.
        let gone = ev(
            r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure",
            "message":"too old resource version: 1 (1207)","reason":"Expired","code":410}}"#,
        );
        assert_eq!(
            s.apply(gone),
            Step::Relist(
                "the watch ended with error 410: too old resource version: 1 (1207)".into()
            )
        );
        assert_eq!(s.resource_version, "1401", "unchanged");
        assert!(parse_event(b"{\"type\":\"SURPRISE\",\"object\":{}}").is_err());
        assert!(parse_event(b"not json").is_err());
    }
}
