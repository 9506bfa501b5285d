//! NAT behaviour discovery through real Linux NATs: `parley nat-check` in a client namespace,
//! `parley stun-server` in a server namespace, and between them a namespace that routes and
//! masquerades with iptables. Every namespace is deleted when its test ends, also on failure.
//!
//! Needs root, `ip` (iproute2) and `iptables`; CI runs as root. Without them these tests
//! fail with a message saying so: they never skip silently.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PARLEY: &str = env!("CARGO_BIN_EXE_parley");
/// `nat-check`'s wait for each answer; filtering tests under Linux wait it out twice.
const ANSWER_SECS: &str = "1";
/// How long `nat-check` may run before the test kills it and fails.
const CHECK_LIMIT: Duration = Duration::from_secs(30);
const NAMESPACE_PREFIX: &str = "pnat-";

#[test]
fn endpoint_independent_mapping_behind_plain_masquerade() {
    let net = Network::build("eim", Nat::Masquerade);
    let report = net.nat_check();
    assert!(report.contains("(behind a NAT)"), "{report}");
    // The NAT's public address; Linux keeps the client's source port when it is free.
    assert!(
        report.field("mapped address").starts_with("10.77.0.1:"),
        "{report}"
    );
    // One conntrack entry per destination, but each picks the same free public port, so
    // the mapping does not depend on the destination.
    assert_eq!(report.field("mapping"), "endpoint-independent", "{report}");
    // Conntrack translates back only replies from the exact address and port the client
    // sent to: an answer from another port of the same server is dropped.
    assert_eq!(
        report.field("filtering"),
        "address-and-port-dependent",
        "{report}"
    );
    assert_eq!(report.field("verdict"), "peer-to-peer likely", "{report}");
}

#[test]
fn symmetric_nat_behind_masquerade_random_fully() {
    let net = Network::build("sym", Nat::MasqueradeRandomFully);
    let report = net.nat_check();
    assert!(report.contains("(behind a NAT)"), "{report}");
    // --random-fully draws a new public port for every new destination.
    assert_eq!(
        report.field("mapping"),
        "address-and-port-dependent",
        "{report}"
    );
    assert_eq!(
        report.field("filtering"),
        "address-and-port-dependent",
        "{report}"
    );
    assert_eq!(
        report.field("verdict"),
        "peer-to-peer unlikely: a TURN relay will be needed",
        "{report}"
    );
}

#[test]
fn no_nat_on_the_servers_own_network() {
    let net = Network::build("direct", Nat::None);
    let report = net.nat_check();
    assert!(report.contains("no NAT"), "{report}");
    assert!(
        report.field("mapped address").starts_with("10.77.0.2:"),
        "{report}"
    );
    assert_eq!(report.field("mapping"), "endpoint-independent", "{report}");
    assert_eq!(
        report.field("filtering"),
        "endpoint-independent",
        "{report}"
    );
    assert_eq!(report.field("verdict"), "peer-to-peer likely", "{report}");
}

#[derive(Clone, Copy, PartialEq)]
enum Nat {
    /// The client sits on the server's network.
    None,
    /// `-j MASQUERADE`: what most Linux routers do.
    Masquerade,
    /// `-j MASQUERADE --random-fully`: a random public port per connection.
    MasqueradeRandomFully,
}

/// Namespaces `srv` (10.77.0.10 and .11), and either `cli` on the same link (10.77.0.2) or
/// `nat` (10.77.0.1 | 192.168.77.1) with `cli` (192.168.77.2) behind it. Running
/// `parley stun-server` in `srv`. Dropping it kills the server and deletes the namespaces.
struct Network {
    prefix: String,
    namespaces: Vec<String>,
    server: Option<Child>,
}

impl Network {
    fn build(case: &str, nat: Nat) -> Network {
        check_prerequisites();
        remove_stale_namespaces();
        let prefix = format!("{NAMESPACE_PREFIX}{}-{case}", std::process::id());
        let mut net = Network {
            prefix,
            namespaces: Vec::new(),
            server: None,
        };
        let roles: &[&str] = match nat {
            Nat::None => &["srv", "cli"],
            _ => &["srv", "nat", "cli"],
        };
        for role in roles {
            let ns = net.ns(role);
            // A namespace of this name can only be left over from a crashed run of ours.
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run("ip", &["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (srv, cli) = (net.ns("srv"), net.ns("cli"));
        // Interface names live inside the namespaces, so parallel tests do not collide.
        let (peer, peer_ns) = match nat {
            Nat::None => ("c0", cli.clone()),
            _ => ("n0", net.ns("nat")),
        };
        run(
            "ip",
            &[
                "link", "add", "s0", "netns", &srv, "type", "veth", "peer", "name", peer, "netns",
                &peer_ns,
            ],
        );
        net.ip(&srv, &["addr", "add", "10.77.0.10/24", "dev", "s0"]);
        net.ip(&srv, &["addr", "add", "10.77.0.11/24", "dev", "s0"]);
        net.ip(&srv, &["link", "set", "s0", "up"]);
        if nat == Nat::None {
            net.ip(&cli, &["addr", "add", "10.77.0.2/24", "dev", "c0"]);
            net.ip(&cli, &["link", "set", "c0", "up"]);
        } else {
            let natns = net.ns("nat");
            run(
                "ip",
                &[
                    "link", "add", "c0", "netns", &cli, "type", "veth", "peer", "name", "n1",
                    "netns", &natns,
                ],
            );
            net.ip(&natns, &["addr", "add", "10.77.0.1/24", "dev", "n0"]);
            net.ip(&natns, &["addr", "add", "192.168.77.1/24", "dev", "n1"]);
            net.ip(&natns, &["link", "set", "n0", "up"]);
            net.ip(&natns, &["link", "set", "n1", "up"]);
            net.ip(&cli, &["addr", "add", "192.168.77.2/24", "dev", "c0"]);
            net.ip(&cli, &["link", "set", "c0", "up"]);
            net.ip(&cli, &["route", "add", "default", "via", "192.168.77.1"]);
            net.exec(
                &natns,
                &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
            );
            let mut rule = vec![
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "n0",
                "-j",
                "MASQUERADE",
            ];
            if nat == Nat::MasqueradeRandomFully {
                rule.push("--random-fully");
            }
            net.exec(&natns, &rule);
        }
        net.start_stun_server();
        net
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn exec(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn start_stun_server(&mut self) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("srv"), PARLEY, "stun-server"])
            .args([
                "--listen",
                "10.77.0.10:3478",
                "--alternate-ip",
                "10.77.0.11",
            ])
            .args(["--alternate-port", "3479"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("`ip netns exec … parley stun-server` starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        self.server = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut log = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("STUN server listening") => return,
                Ok(line) => {
                    log.push_str(&line);
                    log.push('\n');
                }
                Err(_) => break,
            }
        }
        panic!("parley stun-server did not start within 10 s:\n{log}");
    }

    /// Runs `parley nat-check` in `cli` and returns what it printed.
    fn nat_check(&self) -> Report {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("cli"), PARLEY, "nat-check"])
            .args(["10.77.0.10:3478", "--timeout-secs", ANSWER_SECS])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("`ip netns exec … parley nat-check` starts");
        let deadline = Instant::now() + CHECK_LIMIT;
        while child.try_wait().expect("nat-check's status").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("parley nat-check ran longer than {CHECK_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("nat-check's output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "parley nat-check failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Report(stdout)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in self.namespaces.iter().rev() {
            if let Ok(out) = Command::new("ip").args(["netns", "del", ns]).output()
                && !out.status.success()
            {
                eprintln!(
                    "could not delete namespace {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// The text `nat-check` printed.
struct Report(String);

impl Report {
    /// The value of a `name:   value` line.
    fn field(&self, name: &str) -> &str {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{}", self.0))
    }

    fn contains(&self, s: &str) -> bool {
        self.0.contains(s)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn check_prerequisites() {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    assert!(
        uid.as_deref().is_ok_and(|u| u.trim_ascii() == b"0"),
        "the NAT tests create network namespaces and need root (CI runs as root); \
         run them as root, e.g. `sudo -E cargo test -p parley --test nat`"
    );
    for (tool, package) in [("ip", "iproute2"), ("iptables", "iptables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            found,
            "the NAT tests need `{tool}` (Debian package {package}); scripts/test.sh installs it"
        );
    }
}

/// Deletes namespaces that runs of this test which were killed left behind.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
