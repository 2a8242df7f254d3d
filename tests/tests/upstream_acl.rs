//! Per-gateway security upstream: a real Mosquitto started with the example config
//! and ACL shipped in `packaging/mosquitto/` and a password file made with
//! `mosquitto_passwd`. Each gateway logs in as itself; the ACL lets gateway `gw`
//! publish only its own status, records and manifests and read only its own
//! commands. Mosquitto 2 acknowledges a publish the ACL refuses and drops it, so
//! the tests look at what a subscriber allowed to read everything receives: each
//! refused message is followed, on the same connection, by an allowed one, and once
//! that one has arrived the refused ones would have arrived before it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edge_agent::sync::wire;
use edge_agent_tests::{
    block_until, free_port, http_request, push_agent_toml, BrokerProcess, InProcessAgent,
};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// The accounts of the password file: two gateways, the verifier (the consumer side
/// the example ACL names) and an observer that this test's copy of the ACL lets
/// read everything, to see whatever the broker lets through.
const USERS: [(&str, &str); 4] = [
    ("gw-a", "gw-a-secret-3141"),
    ("gw-b", "gw-b-secret-2718"),
    ("verifier", "verifier-secret-1618"),
    ("observer", "observer-secret-1414"),
];

fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| *p)
        .unwrap_or_else(|| panic!("no account {user}"))
}

/// A program of the Debian package `mosquitto`, or a panic naming the package.
fn mosquitto_program(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: this test needs the Debian package `mosquitto` \
                 (apt-get install mosquitto)"
            )
        })
}

fn shipped(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/mosquitto")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Mosquitto on a free loopback port with `packaging/mosquitto/edge-agent.conf`
/// (its password and ACL file paths pointed into `dir`), the shipped ACL plus the
/// observer, and a password file of [`USERS`].
fn start_broker(dir: &Path) -> (BrokerProcess, u16) {
    let passwd = dir.join("edge-agent.passwd");
    for (i, (user, pass)) in USERS.iter().enumerate() {
        let mut cmd = Command::new(mosquitto_program("mosquitto_passwd"));
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd
            .arg("-b")
            .arg(&passwd)
            .args([user, pass])
            .stdout(Stdio::null())
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd -b for {user}: {status}");
    }
    let acl = dir.join("edge-agent.acl");
    let mut acl_text = shipped("edge-agent.acl");
    acl_text.push_str("\n# This test's observer: reads everything.\nuser observer\ntopic read #\n");
    std::fs::write(&acl, acl_text).expect("write the ACL");

    let port = free_port();
    let mut conf = String::new();
    let (mut has_passwd, mut has_acl) = (false, false);
    for line in shipped("edge-agent.conf").lines() {
        if line.starts_with("password_file ") {
            has_passwd = true;
            conf.push_str(&format!("password_file {}\n", passwd.display()));
        } else if line.starts_with("acl_file ") {
            has_acl = true;
            conf.push_str(&format!("acl_file {}\n", acl.display()));
        } else {
            conf.push_str(line);
            conf.push('\n');
        }
    }
    assert!(
        has_passwd && has_acl,
        "edge-agent.conf sets password_file and acl_file"
    );
    conf.push_str(&format!(
        "listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\n"
    ));
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // As root, Mosquitto drops to the user `mosquitto`, which cannot read the
        // files in this test's private directory.
        conf.push_str("user root\n");
    }
    let conf_path = dir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("write the Mosquitto config");
    let log = dir.join("mosquitto.log");
    let child = Command::new(mosquitto_program("mosquitto"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the broker log"))
        .spawn()
        .expect("start mosquitto");
    let broker = BrokerProcess::from_child(child);
    block_until(
        &format!("mosquitto listening on {port} (its log: {})", log.display()),
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    (broker, port)
}

/// What an MQTT client saw.
#[derive(Debug)]
enum Seen {
    ConnAck(ConnectReturnCode),
    SubAck,
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// The connection ended (refused, or broken); the client does not reconnect.
    Closed(String),
}

/// A rumqttc client logged in as `user` (no reconnect: every event is the test's).
struct Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
    /// Every message received so far.
    received: Vec<(String, Vec<u8>, bool)>,
}

impl Client {
    fn start(port: u16, id: &str, credentials: Option<(&str, &str)>) -> Client {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, pass)) = credentials {
            opts.set_credentials(user, pass);
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let seen = match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => Seen::ConnAck(c.code),
                    Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    },
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Seen::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Client {
            client,
            rx,
            task,
            received: Vec::new(),
        }
    }

    /// Logs in as `user` with its password and subscribes to `filters` (QoS 1),
    /// waiting for the broker's answers.
    async fn connect(port: u16, id: &str, user: &str, filters: &[&str]) -> Client {
        let mut c = Client::start(port, id, Some((user, password(user))));
        match c.next_event().await {
            Seen::ConnAck(ConnectReturnCode::Success) => {}
            other => panic!("{user} logs in: {other:?}"),
        }
        for filter in filters {
            c.client
                .subscribe(*filter, QoS::AtLeastOnce)
                .await
                .expect("queue subscribe");
            loop {
                match c.next_event().await {
                    Seen::SubAck => break,
                    Seen::Publish {
                        topic,
                        payload,
                        retain,
                    } => c.received.push((topic, payload, retain)),
                    other => panic!("{user} subscribes to {filter}: {other:?}"),
                }
            }
        }
        c
    }

    async fn next_event(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no MQTT event within {WAIT:?}"))
            .unwrap_or_else(|| Seen::Closed("event task ended".into()))
    }

    /// Receives until a message satisfies `done`; returns its index in `received`.
    async fn wait_for(&mut self, what: &str, done: impl FnMut(&str, &[u8], bool) -> bool) -> usize {
        self.wait_for_since(0, what, done).await
    }

    /// [`Client::wait_for`], for a message at index `since` of `received` or later.
    async fn wait_for_since(
        &mut self,
        since: usize,
        what: &str,
        mut done: impl FnMut(&str, &[u8], bool) -> bool,
    ) -> usize {
        let earlier = self.received.iter().skip(since);
        if let Some(i) = earlier.clone().position(|(t, p, r)| done(t, p, *r)) {
            return since + i;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("{what}: not within {WAIT:?}; received {:?}", self.topics())
                });
            match seen {
                Some(Seen::Publish {
                    topic,
                    payload,
                    retain,
                }) => {
                    let hit = done(&topic, &payload, retain);
                    self.received.push((topic, payload, retain));
                    if hit {
                        return self.received.len() - 1;
                    }
                }
                Some(Seen::Closed(e)) => panic!("{what}: connection ended: {e}"),
                None => panic!("{what}: the event task ended"),
                Some(_) => {}
            }
        }
    }

    fn topics(&self) -> Vec<&str> {
        self.received.iter().map(|(t, _, _)| t.as_str()).collect()
    }

    /// Publishes with QoS 1 (Mosquitto acknowledges refused publishes too).
    async fn publish(&self, topic: &str, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .expect("queue publish");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Does a record batch on `gw`'s records topic carry `seq`?
fn batch_has(payload: &[u8], gw: &str, seq: u64) -> bool {
    wire::decode(payload).is_ok_and(|b| b.gw == gw && b.records.iter().any(|r| r.seq == seq))
}

/// The real agent as gateway `gw-a`, logged in upstream with its own account: its
/// status, records and manifests pass and it reads its own resend commands, while a
/// client with its credentials publishes into gateway `gw-b`'s topics (and others)
/// and none of that reaches a subscriber, retained or live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_publishes_only_under_its_own_topics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_broker, port) = start_broker(dir.path());
    let mut observer = Client::connect(port, "observer", "observer", &["#"]).await;

    let mut text = push_agent_toml(
        "gw-a",
        &dir.path().join("store"),
        free_port(),
        0,
        "homeassistant_discovery = false",
        "",
    );
    text.push_str(&format!(
        "[upstream]\nhost = \"127.0.0.1\"\nport = {port}\nusername = \"gw-a\"\npassword = \"{}\"\n\
         reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n",
        password("gw-a")
    ));
    let agent = InProcessAgent::start(&text).await;
    let body =
        r#"{"meter":"pv","unit":"W","kind":"power","points":[{"ts":1795687200000,"value":1500}]}"#;
    let r = http_request(
        agent.http,
        "POST",
        "/api/v1/ingest",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
    .expect("push");
    assert_eq!(r.status, 200, "{}", r.text());
    let seq = r.json()["last_seq"].as_u64().expect("last_seq");

    // Its own traffic passes: the retained status and the pushed reading upstream.
    observer
        .wait_for("gw-a's status", |t, p, _| {
            t == "edge/gw-a/status" && p == b"online"
        })
        .await;
    observer
        .wait_for("gw-a's record", |t, p, _| {
            t == "edge/gw-a/records" && batch_has(p, "gw-a", seq)
        })
        .await;

    // A client with gw-a's credentials (another client id) writes where it may not.
    let rogue = Client::connect(port, "gw-a-rogue", "gw-a", &[]).await;
    let forged: &[(&str, bool)] = &[
        ("edge/gw-b/records", false),
        ("edge/gw-b/manifest", false),
        ("edge/gw-b/status", true),
        ("edge/gw-b/cmd/resend", false),
        ("edge/gw-a/cmd/resend", false),
        ("edge/gw-a/events", false),
        ("edge/gw-b", false),
        ("other/topic", true),
    ];
    for (topic, retain) in forged {
        rogue.publish(topic, *retain, b"forged").await;
    }
    // Then an allowed one on the same connection, after all of them.
    rogue.publish("edge/gw-a/manifest", false, b"marker").await;
    observer
        .wait_for("the rogue's allowed publish", |t, p, _| {
            t == "edge/gw-a/manifest" && p == b"marker"
        })
        .await;
    let leaked: Vec<&str> = observer
        .received
        .iter()
        .filter(|(_, p, _)| p == b"forged")
        .map(|(t, _, _)| t.as_str())
        .collect();
    assert!(
        leaked.is_empty(),
        "publishes outside edge/gw-a/ got through: {leaked:?}"
    );

    // Nothing forged was retained: a new subscriber gets gw-a's status only. The
    // broker sends every retained message of one subscription when it takes it.
    let mut late = Client::connect(port, "observer-late", "observer", &[]).await;
    late.client
        .subscribe("#", QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    late.wait_for("gw-a's retained status", |t, p, r| {
        t == "edge/gw-a/status" && p == b"online" && r
    })
    .await;
    let retained: Vec<&str> = late
        .received
        .iter()
        .filter(|(_, _, r)| *r)
        .map(|(t, _, _)| t.as_str())
        .collect();
    assert_eq!(retained, ["edge/gw-a/status"], "retained topics");

    // The agent reads its own commands: the verifier asks for the pushed record again.
    let verifier = Client::connect(port, "verifier", "verifier", &[]).await;
    let before = observer.received.len();
    verifier
        .publish(
            "edge/gw-a/cmd/resend",
            false,
            format!(r#"{{"from":{seq},"to":{seq}}}"#).as_bytes(),
        )
        .await;
    observer
        .wait_for_since(before, "gw-a's resent record", |t, p, _| {
            t == "edge/gw-a/records" && batch_has(p, "gw-a", seq)
        })
        .await;
    drop(rogue);
    agent.stop().await;
}

/// Each gateway reads only its own commands, whatever it subscribes to, and logs in
/// only with its own password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reads_only_its_own_commands() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_broker, port) = start_broker(dir.path());

    let mut a = Client::connect(
        port,
        "gw-a",
        "gw-a",
        &[
            "edge/gw-a/cmd/resend",
            "edge/gw-b/cmd/resend",
            "edge/+/cmd/resend",
            "edge/gw-b/#",
            "#",
        ],
    )
    .await;
    let mut b = Client::connect(port, "gw-b", "gw-b", &["edge/gw-b/cmd/resend"]).await;
    let verifier = Client::connect(port, "verifier", "verifier", &[]).await;

    // B's command first, then A's, on one connection: once A has its own, B's would
    // have reached A before it.
    verifier
        .publish("edge/gw-b/cmd/resend", false, br#"{"from":1,"to":5}"#)
        .await;
    verifier
        .publish("edge/gw-a/cmd/resend", false, br#"{"from":7,"to":9}"#)
        .await;
    b.wait_for("gw-b's command", |t, p, _| {
        t == "edge/gw-b/cmd/resend" && p == br#"{"from":1,"to":5}"#
    })
    .await;
    a.wait_for("gw-a's command", |t, p, _| {
        t == "edge/gw-a/cmd/resend" && p == br#"{"from":7,"to":9}"#
    })
    .await;
    let foreign: Vec<&str> = a
        .topics()
        .into_iter()
        .filter(|t| *t != "edge/gw-a/cmd/resend")
        .collect();
    assert!(foreign.is_empty(), "gw-a read {foreign:?}");
    assert!(
        b.topics().iter().all(|t| *t == "edge/gw-b/cmd/resend"),
        "gw-b read {:?}",
        b.topics()
    );

    // Credentials are per gateway: gw-a's password does not log in as gw-b, and
    // nobody gets in without an account.
    for (id, credentials) in [
        ("gw-b", Some(("gw-b", password("gw-a")))),
        ("anonymous", None),
    ] {
        let mut c = Client::start(port, id, credentials);
        match c.next_event().await {
            Seen::ConnAck(ConnectReturnCode::Success) => {
                panic!("{id} with {credentials:?} logged in")
            }
            other => println!("{id} with {credentials:?}: {other:?}"),
        }
    }
}
