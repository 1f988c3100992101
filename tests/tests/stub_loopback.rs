//! lb-stub and lb-loadgen against each other on 127.0.0.1 only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const STUB: &str = env!("CARGO_BIN_EXE_lb-stub");
const LOADGEN: &str = env!("CARGO_BIN_EXE_lb-loadgen");

/// Kills the child on drop, so a failed assertion never leaves a stub running.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the cert directory on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running stub; fields drop in order, so the process dies before its certs are removed.
struct Stub {
    _child: ChildGuard,
    dir: TempDir,
    port: u16,
    admin: u16,
}

impl Stub {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn ca(&self, file: &str) -> String {
        self.dir.0.join(file).display().to_string()
    }

    /// Plain-HTTP GET on the admin port; returns status and body.
    fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    fn stats(&self) -> Value {
        let (status, body) = self.admin_get("/stats");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn loadgen(&self, args: &[&str]) -> Value {
        let out = Command::new(LOADGEN)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lb-loadgen {args:?}: {:?}",
            out.status
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "exactly one JSON line: {stdout}");
        serde_json::from_str(&stdout).unwrap()
    }
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gen_certs(dir: &Path) {
    let status = Command::new(STUB)
        .args(["gen-certs", "--dir"])
        .arg(dir)
        .args(["--san", "127.0.0.1", "--san", "apiserver.test"])
        .status()
        .unwrap();
    assert!(status.success());
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "other-ca.crt",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
}

/// Starts a stub on free loopback ports; retries because another process may grab a port
/// between our probe and the stub's bind.
fn start_stub(test: &str, name: &str) -> Stub {
    start_stub_with(test, name, &[])
}

/// Like `start_stub`, with `extra` arguments to `lb-stub serve`.
fn start_stub_with(test: &str, name: &str, extra: &[&str]) -> Stub {
    let dir = TempDir(std::env::temp_dir().join(format!("lb-stub-{test}-{}", std::process::id())));
    gen_certs(&dir.0);
    for _ in 0..5 {
        let (port, admin) = (free_port(), free_port());
        let mut child = ChildGuard(
            Command::new(STUB)
                .args(["serve", "--name", name, "--listen"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--admin-listen")
                .arg(format!("127.0.0.1:{admin}"))
                .arg("--cert")
                .arg(dir.0.join("server.crt"))
                .arg("--key")
                .arg(dir.0.join("server.key"))
                .args(extra)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[stub] {line}");
                let _ = tx.send(line);
            }
        });
        let want = format!("lb-stub {name} listening on 127.0.0.1:{port}");
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line == want => break true,
                Ok(_) => continue,
                Err(_) => break false,
            }
        };
        if ready {
            return Stub {
                _child: child,
                dir,
                port,
                admin,
            };
        }
    }
    panic!("lb-stub did not start");
}

#[test]
fn count_mode_stats_and_readyz_mode() {
    let stub = start_stub("count", "master01");
    let out = stub.loadgen(&[
        "--url",
        &stub.url("/version"),
        "--ca",
        &stub.ca("ca.crt"),
        "--count",
        "20",
        "--concurrency",
        "4",
    ]);
    assert_eq!(out["mode"], "count");
    assert_eq!(out["ok"], 20, "{out}");
    assert_eq!(out["failed"], 0, "{out}");
    assert_eq!(out["backends"]["master01"], 20, "{out}");

    let stats = stub.stats();
    assert_eq!(stats["name"], "master01");
    assert_eq!(stats["requests"]["/version"], 20, "{stats}");
    assert_eq!(stats["requests_total"], 20, "{stats}");
    assert_eq!(stats["connections"], 20, "{stats}");
    assert_eq!(stats["tls_handshakes"], 20, "{stats}");

    let readyz =
        |stub: &Stub| stub.loadgen(&["--url", &stub.url("/readyz"), "--ca", &stub.ca("ca.crt")]);
    assert_eq!(readyz(&stub)["ok"], 1);
    let (status, body) = stub.admin_get("/mode?readyz=503");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["readyz"],
        "503"
    );
    let out = readyz(&stub);
    assert_eq!(out["failed"], 1, "{out}");
    assert_eq!(out["errors"]["status 503"], 1, "{out}");
    // Liveness is independent of readiness.
    let out = stub.loadgen(&["--url", &stub.url("/livez"), "--insecure"]);
    assert_eq!(out["ok"], 1, "{out}");
    assert_eq!(stub.admin_get("/mode?readyz=bogus").0, 400);
    assert_eq!(stub.admin_get("/nope").0, 404);
}

#[test]
fn wrong_ca_and_hang_modes_fail_cleanly() {
    let stub = start_stub("hang", "master02");
    let out = stub.loadgen(&[
        "--url",
        &stub.url("/version"),
        "--ca",
        &stub.ca("other-ca.crt"),
        "--count",
        "3",
    ]);
    assert_eq!(
        (out["ok"].as_u64(), out["failed"].as_u64()),
        (Some(0), Some(3)),
        "{out}"
    );
    let reason = out["errors"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    assert!(reason.starts_with("tls: "), "{reason}");
    // Wrong SNI name is also a verification failure.
    let out = stub.loadgen(&[
        "--url",
        &stub.url("/version"),
        "--ca",
        &stub.ca("ca.crt"),
        "--server-name",
        "not-in-cert",
    ]);
    assert_eq!(out["failed"], 1, "{out}");

    stub.admin_get("/mode?readyz=hang");
    let out = stub.loadgen(&[
        "--url",
        &stub.url("/readyz"),
        "--insecure",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(out["errors"]["response timeout"], 1, "{out}");

    stub.admin_get("/mode?accept=hang");
    let out = stub.loadgen(&[
        "--url",
        &stub.url("/version"),
        "--insecure",
        "--timeout",
        "300ms",
        "--count",
        "2",
        "--concurrency",
        "2",
    ]);
    assert_eq!(out["errors"]["tls timeout"], 2, "{out}");

    stub.admin_get("/mode?accept=normal&readyz=200");
    let out = stub.loadgen(&["--url", &stub.url("/readyz"), "--insecure"]);
    assert_eq!(out["ok"], 1, "{out}");
    let stats = stub.stats();
    assert_eq!(stats["accept"], "normal");
    assert_eq!(stats["requests"]["/readyz"], 2, "{stats}");
}

#[test]
fn long_mode_reconnects_after_close_all() {
    let stub = start_stub("long", "master03");
    let args: Vec<String> = [
        "--url",
        &stub.url("/version"),
        "--ca",
        &stub.ca("ca.crt"),
        "--connections",
        "3",
        "--interval",
        "50ms",
        "--duration",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let loadgen = Command::new(LOADGEN)
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(stub.stats()["active_connections"], 3);
    let (status, body) = stub.admin_get("/close-all");
    assert_eq!(status, 200, "{body}");
    let out = loadgen.wait_with_output().unwrap();
    assert!(out.status.success());
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["mode"], "long");
    let conns = out["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 3);
    for c in conns {
        assert_eq!(c["backend_first"], "master03", "{c}");
        assert!(c["requests_ok"].as_u64().unwrap() >= 10, "{c}");
        // Each connection notices the close on its next request, exactly once, then reconnects.
        assert_eq!(c["requests_failed"], 1, "{c}");
        assert_eq!(c["reconnects"], 1, "{c}");
        let at = c["failures"][0]["at_ms"].as_u64().unwrap();
        assert!((500..2000).contains(&at), "{c}");
    }
    assert_eq!(stub.stats()["tls_handshakes"], 6);
}

#[test]
fn gap_mode_reports_outage() {
    let stub = start_stub("gap", "master04");
    let run = |stub: &Stub, extra: &[&str]| {
        let mut args = vec![
            "--url".to_string(),
            stub.url("/readyz"),
            "--insecure".into(),
            "--gap".into(),
            "--interval".into(),
            "100ms".into(),
            "--timeout".into(),
            "200ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        stub.loadgen(&args)
    };
    let out = run(&stub, &["--duration", "500ms", "--new-connection"]);
    assert_eq!(out["mode"], "gap");
    assert_eq!(out["failed"], 0, "{out}");
    assert!(out["ok"].as_u64().unwrap() >= 3, "{out}");
    assert!(out["max_gap_ms"].as_f64().unwrap() < 1000.0, "{out}");

    // readyz goes 503 for a while in the middle of the run.
    let admin = stub.admin;
    let flipper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        http_get(admin, "/mode?readyz=503");
        std::thread::sleep(Duration::from_millis(600));
        http_get(admin, "/mode?readyz=200");
    });
    let out = run(&stub, &["--duration", "1500ms"]);
    flipper.join().unwrap();
    assert!(out["failed"].as_u64().unwrap() >= 3, "{out}");
    let max_gap = out["max_gap_ms"].as_f64().unwrap();
    assert!((500.0..1500.0).contains(&max_gap), "{out}");
    // Scheduling jitter on a loaded machine may add short gaps; the outage must be among them.
    let outage = out["gaps"].as_array().unwrap().iter().any(|g| {
        let len = g["end_ms"].as_f64().unwrap() - g["start_ms"].as_f64().unwrap();
        len >= 500.0 && g["start_ms"].as_f64().unwrap() >= 200.0
    });
    assert!(outage, "{out}");
}

#[test]
fn watch_streams_bookmarks_until_close_all() {
    use lb_tests::http::read_head;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let stub = start_stub("watch", "master05");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = lb_tests::tls::client_config(Some(Path::new(&stub.ca("ca.crt")))).unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stub.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut conn = tokio::io::BufReader::new(tls);
        conn.write_all(b"GET /watch?interval_ms=20 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        conn.flush().await.unwrap();
        let head = read_head(&mut conn).await.unwrap().unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
        assert!(head.contains("X-Backend: master05"), "{head}");
        let mut seqs = Vec::new();
        while seqs.len() < 3 {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            // Chunk-size lines such as "3c" are skipped; payload lines are JSON objects.
            if line.starts_with('{') {
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["type"], "BOOKMARK");
                assert_eq!(v["backend"], "master05");
                seqs.push(v["seq"].as_u64().unwrap());
            }
        }
        assert_eq!(seqs, [1, 2, 3]);

        let (status, body) = http_get(stub.admin, "/close-all");
        assert_eq!((status, body.as_str()), (200, r#"{"closed":1}"#));
        // The stream must end promptly (EOF or reset), not keep delivering bookmarks forever.
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            let mut line = String::new();
            loop {
                line.clear();
                match conn.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "watch not closed by /close-all");
    });
    assert_eq!(stub.stats()["requests"]["/watch"], 1);
}

#[test]
fn bad_arguments_exit_nonzero() {
    for args in [
        &["--url", "https://127.0.0.1:1/"][..],
        &["--url", "https://localhost:1/", "--insecure"],
        &["--url", "https://127.0.0.1:1/", "--insecure", "--gap"],
        &[
            "--url",
            "https://127.0.0.1:1/",
            "--ca",
            "/nonexistent/ca.crt",
        ],
    ] {
        let out = Command::new(LOADGEN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    }
    let out = Command::new(STUB)
        .args(["serve", "--listen", "127.0.0.1:1", "--name", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// lb-agent's discovery against the stub's EndpointSlice API with a bearer token (e2e_discovery
/// uses a client certificate): the list, each change as a watch event, and a refusal.
#[test]
fn discovery_follows_the_stubs_endpointslice_with_a_token() {
    use lb_agent::{
        config::{DiscoveryConfig, HealthConfig},
        discovery::{self, Follow, Found},
    };
    use tokio::sync::{mpsc, watch};

    let stub = start_stub_with("slices", "master01", &["--api-token", "s3cret"]);
    let kubeconfig = |token: &str| {
        let path = stub.dir.0.join(format!("kubeconfig-{token}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context:\n    user: u\n\
                 users:\n- name: u\n  user:\n    token: {token}\n"
            ),
        )
        .unwrap();
        path
    };
    let (status, _) =
        stub.admin_get("/endpointslice?addresses=198.18.0.11,198.18.0.12,198.18.0.13");
    assert_eq!(status, 200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let follow = |token: &str| Follow {
        vip: "api".into(),
        discovery: DiscoveryConfig {
            kubeconfig: kubeconfig(token),
        },
        health: HealthConfig {
            ca_file: stub.dir.0.join("ca.crt"),
            ..Default::default()
        },
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", stub.port).parse().unwrap();
    let (specs, specs_rx) = watch::channel(vec![follow("s3cret")]);
    let (_reachable, reachable_rx) = watch::channel(discovery::Reachable::from([(
        "api".to_string(),
        vec![addr],
    )]));
    let (found_tx, mut found) = mpsc::channel::<Found>(16);
    let shared = discovery::Shared::default();
    let (_stop, stop_rx) = watch::channel(false);
    let task = rt.spawn(discovery::run(
        specs_rx,
        reachable_rx,
        found_tx,
        shared.clone(),
        stop_rx,
    ));
    let next = |found: &mut mpsc::Receiver<Found>| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), found.recv())
                .await
                .expect("discovery finds something in time")
                .unwrap()
        })
    };
    let listed = |f: &Found| -> Vec<String> { f.backends.iter().map(|a| a.to_string()).collect() };
    let f = next(&mut found);
    assert_eq!(
        listed(&f),
        ["198.18.0.11:6443", "198.18.0.12:6443", "198.18.0.13:6443"]
    );
    assert_eq!(f.resource_version, "2");
    assert_eq!(f.via, addr.to_string());
    // A change is a watch event.
    stub.admin_get("/endpointslice?addresses=198.18.0.11,198.18.0.13");
    let f = next(&mut found);
    assert_eq!(listed(&f), ["198.18.0.11:6443", "198.18.0.13:6443"]);
    assert_eq!(f.resource_version, "3");
    stub.admin_get("/endpointslice?addresses=");
    assert!(next(&mut found).backends.is_empty());
    let st = shared.lock().unwrap()["api"].clone();
    assert!(st.state.starts_with("watching via 127.0.0.1:"), "{st:?}");
    let stats = stub.stats();
    assert_eq!(
        stats["requests"]["/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"], 2,
        "one list, one watch: {stats}"
    );

    // The wrong token: refused, said in the status.
    specs.send_replace(vec![follow("wrong")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = shared
            .lock()
            .unwrap()
            .get("api")
            .cloned()
            .unwrap_or_default();
        if st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("status 401"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no 401 in {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    task.abort();
}
