//! No false failover under load: with adverts every 50 ms (Master_Down_Interval 180 ms at
//! priority 100) and both CPUs saturated by other processes for 60 s, the backup never takes
//! the VIP from a live master. Its own binary, so the load does not disturb other tests.
//!
//! For measuring rather than testing: LB_LOAD_HOGS (busy loops per CPU, default 2),
//! LB_LOAD_NICE (their nice value, default 0) and LB_LOAD_RT (vrrp.rt_priority for both
//! agents, default: the agent's default).

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use lb_tests::vrrp_lab::Pair;

const ADVERT_MS: u64 = 50;
const LOAD_SECS: u64 = 60;

/// Busy loops at the normal priority, twice as many as CPUs; killed when dropped.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(per_cpu: usize, nice: i32) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hogs(
            (0..cpus * per_cpu)
                .map(|_| {
                    Command::new("nice")
                        .args(["-n", &nice.to_string(), "sh", "-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a CPU hog")
                })
                .collect(),
        )
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

#[test]
fn saturated_cpus_for_60s_at_50ms_adverts_cause_no_failover() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<i32>().ok());
    let per_cpu = env("LB_LOAD_HOGS").unwrap_or(2) as usize;
    let nice = env("LB_LOAD_NICE").unwrap_or(0);
    let rt = env("LB_LOAD_RT")
        .map(|p| format!("rt_priority = {p}"))
        .unwrap_or_default();
    let Some((pair, _a1, _a2)) = Pair::new("vrrp_load", ADVERT_MS, &rt, &rt) else {
        return;
    };
    let lab = &pair.lab;
    let before = [0, 1].map(|i| lab.vrrp_status(&pair.configs[i]).unwrap());
    let hogs = Hogs::start(per_cpu, nice);
    let start = Instant::now();
    let mut lb2_master = 0;
    let mut lb2_vip = 0;
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(LOAD_SECS) {
        std::thread::sleep(Duration::from_millis(500));
        samples += 1;
        if lab.has_vip(1) {
            lb2_vip += 1;
        }
        if lab.vrrp_state(&pair.configs[1]) == "master" {
            lb2_master += 1;
        }
    }
    let load = load_average();
    drop(hogs);
    let after = [0, 1].map(|i| lab.vrrp_status(&pair.configs[i]).unwrap());
    let moved = |i: usize| {
        after[i]["transitions"].as_u64().unwrap() - before[i]["transitions"].as_u64().unwrap()
    };
    let heard = after[1]["adverts_received"].as_u64().unwrap()
        - before[1]["adverts_received"].as_u64().unwrap();
    println!(
        "{LOAD_SECS}s of {} busy loops at nice {nice} (load average {}): transitions lb1 {} lb2 {}; lb2 heard {heard} adverts (expected about {}); longest gap between adverts at lb2 {} ms (Master_Down_Interval {} ms); lb2 seen master in {lb2_master} and holding the VIP in {lb2_vip} of {samples} samples; rt_priority {}",
        std::thread::available_parallelism().map_or(2, |n| n.get()) * per_cpu,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        moved(0),
        moved(1),
        LOAD_SECS * 1000 / ADVERT_MS,
        after[1]["longest_advert_gap_ms"],
        3 * ADVERT_MS + ADVERT_MS * 156 / 256,
        after[0]["rt_priority"],
    );
    assert_eq!(moved(0), 0, "lb1 changed state under load: {}", after[0]);
    assert_eq!(moved(1), 0, "lb2 changed state under load: {}", after[1]);
    assert_eq!((lb2_master, lb2_vip), (0, 0));
    assert_eq!(after[0]["state"], "master");
    assert_eq!(after[1]["state"], "backup");
}
