//! Parsers for what the bench reads: wrk's report, /proc/stat, /proc/PID/stat and status,
//! and a BPF map's fdinfo.

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// What one wrk run reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Wrk {
    /// Completed requests.
    pub requests: u64,
    /// Run time in seconds.
    pub seconds: f64,
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles (`--latency`), microseconds.
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Socket errors: connect, read, write, timeout.
    pub socket_errors: [u64; 4],
    /// Responses other than 2xx or 3xx.
    pub non_2xx: u64,
}

impl Wrk {
    /// Every failure wrk counted.
    pub fn errors(&self) -> u64 {
        self.socket_errors.iter().sum::<u64>() + self.non_2xx
    }
}

/// A wrk duration ("530.00us", "1.55ms", "2.00s", "1.00m") in microseconds.
pub fn duration_us(s: &str) -> Result<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e6)
    } else {
        bail!("{s:?} is not a wrk duration");
    };
    let v: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a wrk duration"))?;
    Ok(v * mul)
}

/// Parses wrk's report (run with `--latency`).
pub fn wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let (mut seen_total, mut seen_rps, mut pcts) = (false, false, 0);
    for line in out.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        if let Some(rest) = t.strip_prefix("Requests/sec:") {
            w.rps = rest.trim().parse().context("Requests/sec")?;
            seen_rps = true;
        } else if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            w.requests = words[0].parse().context("request count")?;
            w.seconds = duration_us(words[3].trim_end_matches(','))? / 1e6;
            seen_total = true;
        } else if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                    bail!("socket errors: {part:?}");
                };
                let i = match k {
                    "connect" => 0,
                    "read" => 1,
                    "write" => 2,
                    "timeout" => 3,
                    _ => bail!("socket errors: {k:?}"),
                };
                w.socket_errors[i] = v.parse().context("socket error count")?;
            }
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = rest.trim().parse().context("non-2xx count")?;
        } else if words.len() == 2 && words[0].ends_with('%') {
            let v = duration_us(words[1])?;
            match words[0] {
                "50%" => w.p50_us = v,
                "75%" => w.p75_us = v,
                "90%" => w.p90_us = v,
                "99%" => w.p99_us = v,
                _ => continue,
            }
            pcts += 1;
        }
    }
    if !seen_total || !seen_rps {
        bail!("not a wrk report:\n{out}");
    }
    if pcts != 4 {
        bail!("wrk report without the latency distribution (run with --latency):\n{out}");
    }
    Ok(w)
}

/// The whole machine's CPU time from the first line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuTicks {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
}

impl CpuTicks {
    /// Busy ticks between `earlier` and self.
    pub fn busy_since(&self, earlier: &CpuTicks) -> u64 {
        self.busy.saturating_sub(earlier.busy)
    }
}

/// Parses the aggregate "cpu" line of /proc/stat.
pub fn proc_stat(text: &str) -> Result<CpuTicks> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no aggregate cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<u64>())
        .collect::<Result<_, _>>()
        .context("/proc/stat cpu line")?;
    if v.len() < 8 {
        bail!("/proc/stat cpu line has {} fields: {line:?}", v.len());
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already inside user and nice.
    Ok(CpuTicks {
        busy: v[0] + v[1] + v[2] + v[5] + v[6] + v[7],
        idle: v[3] + v[4],
    })
}

/// utime + stime of a process from /proc/PID/stat, in clock ticks.
pub fn pid_stat_cpu(text: &str) -> Result<u64> {
    // comm may hold spaces and parentheses: fields are counted after its closing one.
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .context("/proc/PID/stat without comm")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // after comm: state(3) ... utime(14) stime(15), 1-based over the whole line.
    if f.len() < 13 {
        bail!("/proc/PID/stat too short: {text:?}");
    }
    let utime: u64 = f[11].parse().context("utime")?;
    let stime: u64 = f[12].parse().context("stime")?;
    Ok(utime + stime)
}

/// A field in kB (VmRSS, VmHWM) from /proc/PID/status.
pub fn status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What /proc/PID/fdinfo says of a BPF map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Bytes charged to the map (the kernel's estimate of its memory).
    pub memlock: u64,
}

/// Parses a BPF map fd's fdinfo.
pub fn map_fdinfo(text: &str) -> Result<MapInfo> {
    let get = |k: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .with_context(|| format!("fdinfo has no {k}"))?
            .trim()
            .parse()
            .with_context(|| format!("fdinfo {k}"))
    };
    Ok(MapInfo {
        map_type: get("map_type")? as u32,
        key_size: get("key_size")? as u32,
        value_size: get("value_size")? as u32,
        max_entries: get("max_entries")? as u32,
        memlock: get("memlock")?,
    })
}

/// Counters of /proc/net/netstat or /proc/net/snmp ("TcpExt:" header lines followed by
/// value lines), keyed "TcpExt:TCPSynRetrans", "Tcp:RetransSegs"...
pub fn net_counters(text: &str) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let (Some((h, names)), Some((v, values))) =
            (pair[0].split_once(':'), pair[1].split_once(':'))
        else {
            continue;
        };
        if h != v
            || names
                .split_whitespace()
                .next()
                .is_some_and(|n| n.parse::<i64>().is_ok())
        {
            continue;
        }
        for (n, x) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(x) = x.parse::<u64>() {
                out.insert(format!("{h}:{n}"), x);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPALIVE: &str = "Running 2s test @ http://127.0.0.1:16443/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   187.83us  367.13us   4.91ms   94.41%
    Req/Sec    31.65k     6.03k   41.87k    75.00%
  Latency Distribution
     50%  109.00us
     75%  161.00us
     90%  265.00us
     99%    2.13ms
  126031 requests in 2.00s, 18.03MB read
Requests/sec:  62947.36
Transfer/sec:      9.00MB
";

    #[test]
    fn wrk_keepalive_report() {
        let w = wrk(KEEPALIVE).unwrap();
        assert_eq!(w.requests, 126031);
        assert_eq!(w.seconds, 2.0);
        assert_eq!(w.rps, 62947.36);
        assert_eq!(w.p50_us, 109.0);
        assert_eq!(w.p75_us, 161.0);
        assert_eq!(w.p90_us, 265.0);
        assert_eq!(w.p99_us, 2130.0);
        assert_eq!(w.errors(), 0);
    }

    #[test]
    fn wrk_report_with_errors_and_slow_tail() {
        let out = "Running 10s test @ http://198.18.0.100:6443/
  2 threads and 32 connections
  Latency Distribution
     50%  473.00us
     75%  556.00us
     90%  678.00us
     99%     1.01s
  30957 requests in 10.10s, 4.28MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:   3065.04
Transfer/sec:      2.04MB
";
        let w = wrk(out).unwrap();
        assert_eq!(w.requests, 30957);
        assert_eq!(w.seconds, 10.1);
        assert_eq!(w.p99_us, 1_010_000.0);
        assert_eq!(w.socket_errors, [0, 12, 0, 3]);
        assert_eq!(w.non_2xx, 5);
        assert_eq!(w.errors(), 20);
    }

    #[test]
    fn wrk_report_without_latency_or_garbage_is_an_error() {
        let no_latency: String = KEEPALIVE
            .lines()
            .filter(|l| !l.contains('%') || l.contains("Stdev"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(wrk(&no_latency)
            .unwrap_err()
            .to_string()
            .contains("--latency"));
        assert!(wrk("unable to connect to 198.18.0.100:6443 Connection refused").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration_us("530.00us").unwrap(), 530.0);
        assert_eq!(duration_us("1.55ms").unwrap(), 1550.0);
        assert_eq!(duration_us("2.00s").unwrap(), 2e6);
        assert_eq!(duration_us("1.50m").unwrap(), 90e6);
        assert!(duration_us("fast").is_err());
    }

    #[test]
    fn proc_stat_cpu_line() {
        let t = "cpu  100 5 50 1000 20 3 7 2 9 0\ncpu0 50 2 25 500 10 1 3 1 0 0\nintr 1\n";
        let c = proc_stat(t).unwrap();
        assert_eq!(c.busy, 100 + 5 + 50 + 3 + 7 + 2);
        assert_eq!(c.idle, 1020);
        let later = CpuTicks {
            busy: c.busy + 40,
            idle: c.idle,
        };
        assert_eq!(later.busy_since(&c), 40);
        assert!(proc_stat("intr 1\n").is_err());
        assert!(proc_stat("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn pid_stat_with_odd_comm() {
        let t = "4242 (lb agent (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                 123 45 0 0 20 0 3 0 999 1000000 200 18446744073709551615";
        assert_eq!(pid_stat_cpu(t).unwrap(), 168);
        assert!(pid_stat_cpu("4242 (x) S 1").is_err());
    }

    #[test]
    fn netstat_counters() {
        let t = "TcpExt: SyncookiesSent PAWSTimewait TCPSynRetrans\nTcpExt: 0 31 62\n\
                 IpExt: InNoRoutes\nIpExt: 4\n\
                 Tcp: RtoAlgorithm RetransSegs MaxConn\nTcp: 1 83 -1\n";
        let c = net_counters(t);
        assert_eq!(c["TcpExt:PAWSTimewait"], 31);
        assert_eq!(c["TcpExt:TCPSynRetrans"], 62);
        assert_eq!(c["IpExt:InNoRoutes"], 4);
        assert_eq!(c["Tcp:RetransSegs"], 83);
        assert!(
            !c.contains_key("Tcp:MaxConn"),
            "negative values are skipped"
        );
        assert!(!c.contains_key("TcpExt:0"), "a value line is not a header");
    }

    #[test]
    fn status_and_fdinfo() {
        let s = "Name:\tlb-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(s, "VmRSS"), Some(10240));
        assert_eq!(status_kib(s, "VmHWM"), Some(20480));
        assert_eq!(status_kib(s, "VmSwap"), None);
        let f = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\nmap_type:\t9\nkey_size:\t16\n\
                 value_size:\t24\nmax_entries:\t262144\nmap_flags:\t0x0\nmap_extra:\t0x0\n\
                 memlock:\t27262976\nmap_id:\t7\nfrozen:\t0\n";
        let m = map_fdinfo(f).unwrap();
        assert_eq!(
            m,
            MapInfo {
                map_type: 9,
                key_size: 16,
                value_size: 24,
                max_entries: 262144,
                memlock: 27262976
            }
        );
        assert!(map_fdinfo("pos:\t0\n").is_err());
    }
}
