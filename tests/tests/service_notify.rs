//! `lb_agent::app::service`, the agent's side of systemd's notification protocol, against a
//! socket of the test's own: what each function sends, that nothing is sent without
//! NOTIFY_SOCKET, and that a socket nobody listens on costs one warning and no failure.
//!
//! One test in this file on purpose: it sets NOTIFY_SOCKET for its process, which is safe
//! only while no other thread of the process reads the environment.

use std::{
    os::unix::net::UnixDatagram,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use lb_agent::app::service;

/// Every warning logged, for the warn-once check.
static WARNINGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            WARNINGS
                .get_or_init(Default::default)
                .lock()
                .unwrap()
                .push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

fn warnings() -> Vec<String> {
    WARNINGS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .clone()
}

/// Removes the test's directory, also when the test fails.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd counts it.
fn monotonic_usec() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 5s");
    String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
}

#[test]
fn each_function_sends_its_assignments_and_a_dead_socket_is_only_a_warning() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let dir =
        TempDir(std::env::temp_dir().join(format!("lb-service-notify-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Not started by a service manager: nothing is sent, nothing is logged.
    std::env::remove_var("NOTIFY_SOCKET");
    service::ready("serving");
    service::stopping("stopping");
    sock.set_nonblocking(true).unwrap();
    assert!(sock.recv(&mut [0u8; 64]).is_err(), "nothing sent");
    sock.set_nonblocking(false).unwrap();

    std::env::set_var("NOTIFY_SOCKET", &path);
    service::ready("serving kube-apiserver on eth0\n(XDP native mode)");
    assert_eq!(
        recv(&sock),
        "READY=1\nSTATUS=serving kube-apiserver on eth0 (XDP native mode)\n",
        "READY=1 with a one-line STATUS"
    );

    let before = monotonic_usec();
    service::reloading();
    let after = monotonic_usec();
    let msg = recv(&sock);
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{msg:?}");
    let usec: i64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("MONOTONIC_USEC= second: {msg:?}"))
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is CLOCK_MONOTONIC at the call ({before}..={after})"
    );
    assert_eq!(lines.len(), 2, "{msg:?}");

    service::status("reloading /etc/lb/lb.toml");
    assert_eq!(recv(&sock), "STATUS=reloading /etc/lb/lb.toml\n");
    service::stopping("SIGTERM: giving up the VIP, detaching");
    assert_eq!(
        recv(&sock),
        "STOPPING=1\nSTATUS=SIGTERM: giving up the VIP, detaching\n"
    );
    // NOTIFY_SOCKET stays set: an agent that re-executes itself notifies again.
    assert_eq!(
        std::env::var_os("NOTIFY_SOCKET").as_deref(),
        Some(path.as_os_str())
    );
    assert!(warnings().is_empty(), "{:?}", warnings());

    // Nobody listens any more: the calls return, and one warning says so.
    drop(sock);
    std::fs::remove_file(&path).unwrap();
    service::ready("serving");
    service::status("still serving");
    service::stopping("stopping");
    let w = warnings();
    assert_eq!(w.len(), 1, "one warning for three failures: {w:?}");
    assert!(
        w[0].contains("READY=1") && w[0].contains(path.to_str().unwrap()),
        "names what and where: {w:?}"
    );
    std::env::remove_var("NOTIFY_SOCKET");
}
