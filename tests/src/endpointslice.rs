//! lb-stub's fake EndpointSlice API: the `kubernetes` Service's one slice, which a test sets
//! through the stub's admin port, listed and watched as a kube-apiserver does (a list with a
//! resourceVersion, then newline-delimited JSON events from a version on, BOOKMARKs when
//! asked for).

use std::{net::Ipv4Addr, sync::Mutex};

use serde_json::{json, Value};
use tokio::sync::watch;

/// The collection lb-agent lists and watches (it adds the `kubernetes` label selector).
pub const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

/// The slice's endpoints, all ready, at one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub addresses: Vec<Ipv4Addr>,
    pub port: u16,
}

struct Inner {
    rv: u64,
    slice: Slice,
    /// Every event so far (version, JSON line without its newline), oldest first.
    events: Vec<(u64, String)>,
}

/// The slice and its history.
pub struct Store {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

fn slice_json(rv: u64, s: &Slice) -> Value {
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": "kubernetes"},
        },
        "addressType": "IPv4",
        "endpoints": s.addresses.iter().map(|a| json!({
            "addresses": [a.to_string()],
            "conditions": {"ready": true},
        })).collect::<Vec<_>>(),
        "ports": [{"name": "https", "port": s.port, "protocol": "TCP"}],
    })
}

impl Store {
    /// A slice at version 1.
    pub fn new(slice: Slice) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                slice,
                events: Vec::new(),
            }),
            changed: watch::channel(1).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the slice (a MODIFIED event for the watches); its new version.
    pub fn set(&self, slice: Slice) -> u64 {
        let mut i = self.lock();
        i.rv += 1;
        let rv = i.rv;
        let event = json!({"type": "MODIFIED", "object": slice_json(rv, &slice)}).to_string();
        i.events.push((rv, event));
        i.slice = slice;
        drop(i);
        self.changed.send_replace(rv);
        rv
    }

    /// The slice and its version.
    pub fn get(&self) -> (u64, Slice) {
        let i = self.lock();
        (i.rv, i.slice.clone())
    }

    /// The list answer.
    pub fn list(&self) -> Value {
        let i = self.lock();
        json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": i.rv.to_string()},
            "items": [slice_json(i.rv, &i.slice)],
        })
    }

    /// The events after version `rv`, with their versions.
    pub fn events_after(&self, rv: u64) -> Vec<(u64, String)> {
        self.lock()
            .events
            .iter()
            .filter(|(v, _)| *v > rv)
            .cloned()
            .collect()
    }

    /// A BOOKMARK at the current version.
    pub fn bookmark(&self) -> String {
        let rv = self.lock().rv;
        json!({"type": "BOOKMARK", "object": {"kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}}})
        .to_string()
    }

    /// Changes whenever the slice does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Parses the admin interface's `addresses=A,B,C` (empty: no endpoint).
pub fn parse_addresses(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    s.split(',')
        .filter(|a| !a.is_empty())
        .map(|a| a.parse().map_err(|_| format!("bad address {a:?}")))
        .collect()
}

/// A kube-apiserver's Status object, for refusals.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_a_new_version_and_an_event() {
        let s = Store::new(Slice {
            addresses: vec![Ipv4Addr::new(198, 18, 0, 11)],
            port: 6443,
        });
        let l = s.list();
        assert_eq!(l["metadata"]["resourceVersion"], "1");
        assert_eq!(l["items"][0]["endpoints"][0]["addresses"][0], "198.18.0.11");
        assert_eq!(l["items"][0]["ports"][0]["name"], "https");
        let rx = s.subscribe();
        let rv = s.set(Slice {
            addresses: parse_addresses("198.18.0.11,198.18.0.12").unwrap(),
            port: 6443,
        });
        assert_eq!(rv, 2);
        assert_eq!(*rx.borrow(), 2);
        let ev = s.events_after(1);
        assert_eq!(ev.len(), 1);
        let v: Value = serde_json::from_str(&ev[0].1).unwrap();
        assert_eq!(v["type"], "MODIFIED");
        assert_eq!(v["object"]["endpoints"].as_array().unwrap().len(), 2);
        assert!(s.events_after(2).is_empty());
        assert!(parse_addresses("").unwrap().is_empty());
        assert!(parse_addresses("1.2.3").is_err());
        let b: Value = serde_json::from_str(&s.bookmark()).unwrap();
        assert_eq!(b["object"]["metadata"]["resourceVersion"], "2");
    }
}
