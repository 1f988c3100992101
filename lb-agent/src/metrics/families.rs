//! What `/metrics` says: the families, built afresh for each scrape from the same report
//! `lb-agent status` prints (the pinned maps plus the keeper's answer), so the two never
//! disagree and nothing is counted twice.

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info, MetricType, TypedMetric},
    registry::{Registry, Unit},
};

use crate::status::Report;

/// Label pairs, in the order given.
type Labels = Vec<(&'static str, String)>;

/// A family whose values are set, not counted: one metric per label set of the report.
struct Series<M> {
    rows: Vec<(Labels, M)>,
    kind: MetricType,
}

impl<M: EncodeMetric> Series<M> {
    fn new(kind: MetricType) -> Self {
        Self {
            rows: Vec::new(),
            kind,
        }
    }
    fn push(&mut self, labels: Labels, m: M) {
        self.rows.push((labels, m));
    }
}

impl<M: EncodeMetric + std::fmt::Debug> std::fmt::Debug for Series<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.rows).finish()
    }
}

impl<M: EncodeMetric> EncodeMetric for Series<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, m) in &self.rows {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// A histogram from counts kept elsewhere (the keeper's probe latencies).
#[derive(Debug)]
pub struct ConstHistogram {
    pub sum: f64,
    pub count: u64,
    /// (upper bound, count in that bucket alone), +Inf (f64::MAX) last; the encoder adds
    /// them up.
    pub buckets: Vec<(f64, u64)>,
}

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One for the current value of `all`, 0 for the others: the `state` label convention.
fn one_hot<'a>(
    s: &mut Series<ConstGauge<i64>>,
    base: &Labels,
    current: &str,
    all: impl IntoIterator<Item = &'a str>,
) {
    for v in all {
        let mut l = base.clone();
        l.push(("state", v.to_string()));
        s.push(l, ConstGauge::new(i64::from(v == current)));
    }
}

/// The registry for one scrape.
pub fn registry(r: &Report, reloads: &super::Reloads) -> Registry {
    let mut reg = Registry::default();
    let gauge = || Series::<ConstGauge<i64>>::new(MetricType::Gauge);
    let counter = || Series::<ConstCounter<u64>>::new(MetricType::Counter);

    reg.register(
        "lb_build",
        "The lb-agent serving this endpoint",
        Info::new(vec![("version", crate::VERSION.to_string())]),
    );

    let (mut up, mut state, mut flows) = (gauge(), gauge(), gauge());
    let (mut packets, mut bytes, mut new_flows) = (counter(), counter(), counter());
    let (mut failures, mut transitions) = (counter(), counter());
    let mut probe_seconds = Series::<ConstHistogram>::new(MetricType::Histogram);
    let (mut vip_flows, mut snat_in_use, mut snat_ports) = (gauge(), gauge(), gauge());
    for v in &r.vips {
        let vl: Labels = vec![("vip", v.name.clone())];
        vip_flows.push(vl.clone(), ConstGauge::new(v.flows as i64));
        if v.mode == "nat" {
            // One SNAT port per NAT connection, out of the VIP's range.
            snat_in_use.push(vl.clone(), ConstGauge::new(v.flows as i64));
            if let Some((lo, hi)) = v.snat_ports.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (lo.parse::<i64>(), hi.parse::<i64>()) {
                    snat_ports.push(vl.clone(), ConstGauge::new(hi - lo + 1));
                }
            }
        }
        for b in &v.backends {
            let bl: Labels = vec![("vip", v.name.clone()), ("backend", b.name.clone())];
            up.push(bl.clone(), ConstGauge::new(i64::from(b.state == "up")));
            one_hot(&mut state, &bl, &b.state, ["up", "down", "drain"]);
            flows.push(bl.clone(), ConstGauge::new(b.flows as i64));
            for (dir, p, by) in [
                ("to_backend", b.packets, b.bytes),
                ("reply", b.reply_packets, b.reply_bytes),
            ] {
                let mut l = bl.clone();
                l.push(("direction", dir.to_string()));
                packets.push(l.clone(), ConstCounter::new(p));
                bytes.push(l, ConstCounter::new(by));
            }
            new_flows.push(bl.clone(), ConstCounter::new(b.new_flows));
            if let Some(h) = &b.health {
                transitions.push(bl.clone(), ConstCounter::new(h.transitions));
                for (reason, n) in &h.probe_failures {
                    let mut l = bl.clone();
                    l.push(("reason", reason.clone()));
                    failures.push(l, ConstCounter::new(*n));
                }
                if let Some(lat) = &h.probe_latency {
                    probe_seconds.push(
                        bl.clone(),
                        ConstHistogram {
                            sum: lat.sum_seconds,
                            count: lat.count,
                            buckets: lat.per_bucket(),
                        },
                    );
                }
            }
        }
    }
    reg.register(
        "lb_backend_up",
        "1 when the backend takes new connections (probes pass, not drained)",
        up,
    );
    reg.register(
        "lb_backend_state",
        "1 for the backend's current state: up, down or drain",
        state,
    );
    reg.register(
        "lb_backend_flows",
        "Connections in the flow table to the backend",
        flows,
    );
    reg.register(
        "lb_backend_packets",
        "Packets forwarded, by direction (to_backend: client to backend; reply)",
        packets,
    );
    reg.register_with_unit(
        "lb_backend",
        "Bytes forwarded, by direction",
        Unit::Bytes,
        bytes,
    );
    reg.register(
        "lb_backend_new_flows",
        "Connections the backend was picked for",
        new_flows,
    );
    reg.register_with_unit(
        "lb_backend_probe_duration",
        "How long the backend's health probes took",
        Unit::Seconds,
        probe_seconds,
    );
    reg.register(
        "lb_backend_probe_failures",
        "Failed health probes, by reason",
        failures,
    );
    reg.register(
        "lb_backend_transitions",
        "Health changes of the backend (up to down and back) since the agent started",
        transitions,
    );
    reg.register(
        "lb_flows",
        "Connections in the flow table, by VIP",
        vip_flows,
    );
    reg.register(
        "lb_flow_table_capacity",
        "Connections the flow table holds (agent.max_flows)",
        ConstGauge::new(r.flow_table.capacity as i64),
    );
    reg.register(
        "lb_snat_ports_in_use",
        "SNAT ports held by NAT connections, by VIP",
        snat_in_use,
    );
    reg.register(
        "lb_snat_ports",
        "SNAT ports in the VIP's range (snat_ports)",
        snat_ports,
    );

    let mut reasons = counter();
    for (name, n) in &r.counters {
        reasons.push(vec![("reason", name.clone())], ConstCounter::new(*n));
    }
    reg.register(
        "lb_dataplane_packets",
        "Packets (or socket-mode connect() calls) by what the data plane did with them",
        reasons,
    );

    if let Some(v) = &r.vrrp {
        let vrid = || vec![("vrid", v.virtual_router_id.to_string())];
        let mut st = gauge();
        one_hot(
            &mut st,
            &vrid(),
            &v.state,
            ["init", "backup", "master", "fault"],
        );
        reg.register(
            "lb_vrrp_state",
            "1 for the VRRP instance's current state",
            st,
        );
        let mut prio = gauge();
        for (kind, p) in [
            ("base", v.base_priority),
            ("effective", v.effective_priority),
        ] {
            let mut l = vrid();
            l.push(("kind", kind.to_string()));
            prio.push(l, ConstGauge::new(i64::from(p)));
        }
        reg.register(
            "lb_vrrp_priority",
            "VRRP priority: configured (base) and advertised (effective)",
            prio,
        );
        for (name, help, n) in [
            (
                "lb_vrrp_transitions",
                "VRRP state changes since the agent started",
                v.transitions,
            ),
            ("lb_vrrp_adverts_sent", "VRRP adverts sent", v.adverts_sent),
            (
                "lb_vrrp_adverts_received",
                "VRRP adverts received from the peer",
                v.adverts_received,
            ),
        ] {
            let mut s = counter();
            s.push(vrid(), ConstCounter::new(n));
            reg.register(name, help, s);
        }
        let mut bad = counter();
        for (reason, n) in &v.bad_packets {
            let mut l = vrid();
            l.push(("reason", reason.clone()));
            bad.push(l, ConstCounter::new(*n));
        }
        reg.register(
            "lb_vrrp_bad_adverts",
            "VRRP packets rejected, by reason",
            bad,
        );
    }

    let mut results = counter();
    for (result, n) in [("ok", reloads.ok), ("refused", reloads.refused)] {
        results.push(vec![("result", result.to_string())], ConstCounter::new(n));
    }
    reg.register("lb_config_reloads", "Config reloads, by result", results);
    reg.register_with_unit(
        "lb_config_last_reload_timestamp",
        "When the running config was loaded (Unix time)",
        Unit::Seconds,
        ConstGauge::new(reloads.last_unix as i64),
    );
    reg
}
