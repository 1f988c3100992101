//! Panic mode: when probes fail everywhere for a reason on our side (a rotated CA file,
//! a rejected client certificate, 401/403), trust the apiservers over the probes rather
//! than blackhole the VIP.
//!
//! Envoy's panic threshold, narrowed: Envoy ignores health once too few hosts are
//! healthy, whatever the reason; here only backends whose probes fail for a reason on
//! the LB side are served, because a refused connect or a 503 is the backend telling us
//! something true. With every backend not ready (503), there is no panic: existing flows
//! are kept, new connections have nowhere to go, and VRRP tracking lowers the priority
//! so another LB may take the VIP.

use super::{probe::FailureClass, tracker::Health};

/// What the policy needs to know about one backend of a VIP.
#[derive(Debug, Clone, Copy)]
pub struct BackendView<'a> {
    pub name: &'a str,
    pub health: &'a Health,
    /// Drained by the operator or weight 0: it takes no new connections, panic or not.
    pub drained: bool,
}

impl BackendView<'_> {
    fn takes_new_connections(&self) -> bool {
        *self.health == Health::Up && !self.drained
    }

    fn lb_side(&self) -> bool {
        matches!(self.health, Health::Down(f) if f.class() == FailureClass::LbSide)
    }
}

/// Whether a VIP is in panic, and which backends that serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PanicDecision {
    /// Probes decide.
    Normal,
    /// The backends at these indices are served as if up; the others keep their state.
    Panic { served: Vec<usize>, reason: String },
}

impl PanicDecision {
    /// True when backend `i` is served as if up because of panic.
    pub fn serves(&self, i: usize) -> bool {
        matches!(self, PanicDecision::Panic { served, .. } if served.contains(&i))
    }

    /// The one-line reason, for logs and status; None when not in panic.
    pub fn reason(&self) -> Option<&str> {
        match self {
            PanicDecision::Normal => None,
            PanicDecision::Panic { reason, .. } => Some(reason),
        }
    }
}

/// Decides panic for one VIP from its backends (in the VIP's order).
///
/// In panic when no backend takes new connections (up and not drained) and at least one
/// undrained backend is down for a reason on the LB side; those are then served.
pub fn panic_mode(backends: &[BackendView]) -> PanicDecision {
    if backends.iter().any(BackendView::takes_new_connections) {
        return PanicDecision::Normal;
    }
    let lb_side: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].lb_side())
        .collect();
    // A drained backend stays drained: the operator's word beats the probes' and ours.
    let served: Vec<usize> = lb_side
        .iter()
        .copied()
        .filter(|&i| !backends[i].drained)
        .collect();
    if served.is_empty() {
        return PanicDecision::Normal;
    }
    let mut why: Vec<String> = Vec::new();
    for &i in &lb_side {
        if let Health::Down(f) = backends[i].health {
            let s = f.to_string();
            if !why.contains(&s) {
                why.push(s);
            }
        }
    }
    let who = if lb_side.len() == backends.len() {
        "every backend fails probes".to_string()
    } else {
        format!(
            "no backend is up and {} of {} fail probes",
            lb_side.len(),
            backends.len()
        )
    };
    let names: Vec<&str> = served.iter().map(|&i| backends[i].name).collect();
    let reason = format!(
        "{who} for a reason on the LB side ({}); serving {} as if healthy",
        why.join("; "),
        names.join(", ")
    );
    PanicDecision::Panic { served, reason }
}

#[cfg(test)]
mod tests {
    use super::super::probe::Failure;
    use super::*;

    fn untrusted() -> Health {
        Health::Down(Failure::CertNotTrusted("UnknownIssuer".into()))
    }

    const NAMES: [&str; 3] = ["master01", "master02", "master03"];

    fn views<'a>(hs: &'a [Health], drained: &[bool]) -> Vec<BackendView<'a>> {
        hs.iter()
            .enumerate()
            .map(|(i, h)| BackendView {
                name: NAMES[i],
                health: h,
                drained: drained.get(i).copied().unwrap_or(false),
            })
            .collect()
    }

    #[test]
    fn all_lb_side_serves_all() {
        let hs = [untrusted(), untrusted(), untrusted()];
        let d = panic_mode(&views(&hs, &[]));
        assert_eq!(
            d.reason(),
            Some(
                "every backend fails probes for a reason on the LB side \
                 (TLS: certificate not trusted: UnknownIssuer); \
                 serving master01, master02, master03 as if healthy"
            )
        );
        assert!((0..3).all(|i| d.serves(i)));
    }

    #[test]
    fn a_mix_of_lb_side_and_refused_serves_only_lb_side() {
        let hs = [
            untrusted(),
            Health::Down(Failure::Refused),
            Health::Down(Failure::Status(401)),
        ];
        let d = panic_mode(&views(&hs, &[]));
        assert_eq!(
            d,
            PanicDecision::Panic {
                served: vec![0, 2],
                reason: "no backend is up and 2 of 3 fail probes for a reason on the LB side \
                         (TLS: certificate not trusted: UnknownIssuer; status 401); \
                         serving master01, master03 as if healthy"
                    .into()
            }
        );
        assert!(!d.serves(1));
    }

    #[test]
    fn one_up_backend_means_no_panic() {
        let hs = [untrusted(), Health::Up, untrusted()];
        assert_eq!(panic_mode(&views(&hs, &[])), PanicDecision::Normal);
        // Unless the operator drained it: then nothing takes new connections.
        assert!(panic_mode(&views(&hs, &[false, true])).serves(0));
    }

    #[test]
    fn all_not_ready_means_no_panic() {
        // Existing flows are kept, new connections have nowhere to go, and VRRP tracking
        // lowers the priority: that is the backends' truth, not ours to override.
        let hs = [
            Health::Down(Failure::Status(503)),
            Health::Down(Failure::Status(503)),
            Health::Unknown,
        ];
        assert_eq!(panic_mode(&views(&hs, &[])), PanicDecision::Normal);
    }

    #[test]
    fn drained_backends_are_never_served() {
        let hs = [untrusted(), untrusted(), untrusted()];
        let d = panic_mode(&views(&hs, &[true, false, true]));
        assert_eq!(
            d,
            PanicDecision::Panic {
                served: vec![1],
                reason: "every backend fails probes for a reason on the LB side \
                         (TLS: certificate not trusted: UnknownIssuer); \
                         serving master02 as if healthy"
                    .into()
            }
        );
        assert_eq!(
            panic_mode(&views(&hs, &[true, true, true])),
            PanicDecision::Normal,
            "nothing to serve"
        );
    }

    #[test]
    fn no_backends_no_panic() {
        assert_eq!(panic_mode(&[]), PanicDecision::Normal);
    }
}
