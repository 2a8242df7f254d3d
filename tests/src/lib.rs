//! Helpers for edge-agent's end-to-end tests: ports, MQTT subscribers, child agents.
//!
//! The simulators themselves live in `edge_agent::sim` (the demo needs them too).

pub mod homeassistant;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// The agent crate's test helpers, shared: [`free_port`] for servers that bind their
/// own address (rumqttd, child processes), [`poll_until`] and [`wait_until`], the
/// bounded waits for state only visible by asking.
pub use edge_agent::testkit::{block_until, free_port, poll_until, wait_until};

/// Config TOML of the rig most end-to-end tests poll: a Modbus TCP bus `lan` at
/// `tcp` with meters `main` (SDM630, unit 1) and `sub` (SDM120, unit 2) every 20 ms.
/// Goes after a config's own tables (it only adds `[[buses]]` and `[[meters]]`).
pub fn lan_meters_toml(tcp: &str) -> String {
    lan_meters_toml_with(tcp, "sub", "20ms")
}

/// [`lan_meters_toml`] with another id for the SDM120 and another poll interval.
pub fn lan_meters_toml_with(tcp: &str, second: &str, interval: &str) -> String {
    format!(
        r#"[[buses]]
id = "lan"
type = "tcp"
address = "{tcp}"
timeout = "500ms"
frame_gap = "0ms"
[[meters]]
id = "main"
bus = "lan"
unit_id = 1
profile = "sdm630"
interval = "{interval}"
[[meters]]
id = "{second}"
bus = "lan"
unit_id = 2
profile = "sdm120"
interval = "{interval}"
"#
    )
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One message seen by a [`Subscriber`].
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// QoS of the delivery: the lower of the publish's and the subscription's.
    pub qos: u8,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// A real MQTT client (rumqttc) subscribed to a filter, collecting messages.
pub struct Subscriber {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl Subscriber {
    /// Connects (retrying until `limit`, the broker may still be starting) and subscribes.
    pub async fn connect(addr: SocketAddr, filter: &str, limit: Duration) -> Subscriber {
        let id = format!("test-{}", rand::random::<u32>());
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 100);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        let deadline = Instant::now() + limit;
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            qos: p.qos as u8,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if Instant::now() > deadline && tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Subscriber { client, rx }
    }

    /// The next message, or `None` after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Message> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Collects messages until `done` says so or `limit` passes; returns all seen.
    pub async fn collect_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[Message]) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while Instant::now() < deadline && !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(m) = self.next(left).await {
                seen.push(m);
            }
        }
        seen
    }
}

/// Counts state messages per meter id (the `meter` field of the JSON).
pub fn states_per_meter(messages: &[Message]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in messages.iter().filter(|m| m.topic.ends_with("/state")) {
        if let Some(meter) = m.json()["meter"].as_str() {
            *counts.entry(meter.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// The seq range of a store commit from the agent's debug log line
/// `committed seq A..=B` (target `edge_agent::store`): only readings in such a range
/// were accepted (flushed) when the line was written.
pub fn committed_range(line: &str) -> Option<(u64, u64)> {
    let rest = line.split("committed seq ").nth(1)?;
    let (a, b) = rest.trim().split_once("..=")?;
    let first = a.trim().parse().ok()?;
    let last = b.split_whitespace().next()?.parse().ok()?;
    Some((first, last))
}

/// Decodes a big-endian, high-word-first f32 from two registers, as Eastron serves it.
pub fn f32_from_words(hi: u16, lo: u16) -> f32 {
    f32::from_bits((u32::from(hi) << 16) | u32::from(lo))
}

/// A TCP proxy between the agent and its upstream broker, for fault injection:
/// dropping every connection (a flapping link) or silently stopping to forward
/// while keeping the connections open (a black hole).
pub struct Proxy {
    pub addr: SocketAddr,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// While set, nothing is forwarded and nothing is closed.
    black_hole: std::sync::atomic::AtomicBool,
    /// Bumped to close every open connection.
    generation: std::sync::atomic::AtomicU64,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicU64,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = std::sync::Arc::new(ProxyState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let state = shared.clone();
                tokio::spawn(async move {
                    let generation = state.generation.load(Ordering::SeqCst);
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, &state, generation) => {}
                        _ = pump(sr, cw, &state, generation) => {}
                    }
                    // Both halves drop here: the connection closes on both sides.
                });
            }
        });
        Proxy { addr, state }
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn drop_connections(&self) {
        self.state
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops (or resumes) forwarding without closing anything.
    pub fn set_black_hole(&self, on: bool) {
        self.state
            .black_hole
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn accepted(&self) -> u64 {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &ProxyState,
    generation: u64,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if state.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if state.black_hole.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        // Bytes read before a black hole starts are held back, not forwarded.
        while state.black_hole.load(Ordering::SeqCst)
            && state.generation.load(Ordering::SeqCst) == generation
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// An HTTP response read by [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; `Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.1 request over a fresh connection, sent with hyper's client. A test
/// controls the headers: `Host` is the address unless `headers` has one (a foreign
/// `Host` is how the DNS-rebinding tests speak). A response that comes before the whole
/// body was sent (a 413) is returned as it is.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    use http_body_util::{BodyExt, Full};
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{method} {path}: {e}"),
        )
    };
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| invalid(&e))?;
    // The connection task ends with an error when the server closes first, which a
    // refused body does by design; the answer comes through `send_request`.
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request = request.header("host", addr.to_string());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(hyper::body::Bytes::copy_from_slice(body)))
        .map_err(|e| invalid(&e))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| invalid(&e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), value)
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| invalid(&e))?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

/// A request with a body the server may refuse before reading it (a 413 on a declared
/// length), over a raw connection: the answer is read while the body is still being
/// sent. hyper's client reports such an exchange as a failed write, not the answer.
/// `Host` is the address unless `headers` has one.
pub async fn http_request_refused_early(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if !body.is_empty() && !chunked {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    wr.write_all(head.as_bytes()).await?;
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        // Errors here are expected when the server refuses the body and closes.
        if chunked {
            for chunk in body.chunks(64 * 1024) {
                let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
            let _ = wr.write_all(b"0\r\n\r\n").await;
        } else {
            let _ = wr.write_all(&body).await;
        }
        let _ = wr.flush().await;
        // Keep the write half open until the reader is done (a shutdown would end
        // the request early for some servers).
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        match rd.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                // Some servers keep the connection open despite `Connection: close`:
                // a response whose declared length has arrived is complete.
                if has_whole_body(&raw) {
                    break Ok(());
                }
            }
            Err(e) if !raw.is_empty() => {
                let _ = e;
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };
    writer.abort();
    result?;
    parse_http_response(&raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP response"))
}

/// Sends `raw` bytes as they are (a malformed request, several `Host` headers) and
/// reads the answer until the server closes or its declared length has arrived.
pub async fn http_raw(addr: SocketAddr, raw: &[u8]) -> std::io::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(raw).await?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if has_whole_body(&got) {
                    break;
                }
            }
            Err(_) if !got.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    parse_http_response(&got).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad HTTP response: {:?}", String::from_utf8_lossy(&got)),
        )
    })
}

/// True when `raw` holds a response head with `Content-Length` and that many body bytes.
fn has_whole_body(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&raw[..end]) else {
        return false;
    };
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() - (end + 4) >= len)
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).ok()?.trim(), 16)
                    .ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 || rest.len() < size {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// `GET path` with the default `Host`; panics on a connection error.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], &[])
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// An MQTT client for publishing to `addr`, with a task that drives its connection
/// (abort it when done).
pub fn mqtt_publisher(addr: SocketAddr, name: &str) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(
        format!("{name}-{}", rand::random::<u32>()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let task = tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                // Not yet connected, or the broker went away: retry without spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    (client, task)
}

/// Waits until `GET /readyz` answers 200, and returns the last answer.
pub async fn wait_ready(addr: SocketAddr, limit: Duration) -> HttpResponse {
    let last = poll_until(limit, || async {
        let r = http_request(addr, "GET", "/readyz", &[], &[]).await.ok();
        let ready = r.as_ref().is_some_and(|r| r.status == 200);
        (r, ready)
    })
    .await;
    last.unwrap_or_else(|| panic!("no HTTP server at {addr} within {limit:?}"))
}

/// A broker in a child process (the tests crate's `upstream-broker`, or Mosquitto), so
/// a test can stop it and start it again; killed on drop.
pub struct BrokerProcess(std::process::Child);

impl BrokerProcess {
    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_upstream-broker")`: only test
    /// targets see that variable) on `port` and waits for its `ready` line.
    pub fn start(binary: &str, port: u16) -> BrokerProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(binary)
            .arg(port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the upstream broker");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("broker says ready");
        assert_eq!(line.trim(), "ready", "upstream broker did not start");
        BrokerProcess(child)
    }

    /// A broker child started some other way (Mosquitto).
    pub fn from_child(child: std::process::Child) -> BrokerProcess {
        BrokerProcess(child)
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The config of an agent without meters (readings arrive by push): its store in
/// `store`, a 50 ms flush, the broker and HTTP server on loopback `mqtt` and `http`.
/// `mqtt_extra` and `http_extra` are lines added to those sections.
pub fn push_agent_toml(
    gateway: &str,
    store: &std::path::Path,
    mqtt: u16,
    http: u16,
    mqtt_extra: &str,
    http_extra: &str,
) -> String {
    format!(
        "gateway_id = \"{gateway}\"\n[store]\npath = \"{}\"\nflush_interval = \"50ms\"\n\
         [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n{mqtt_extra}\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n{http_extra}\n",
        store.display()
    )
}

/// An agent run in-process (`edge_agent::run_with`) from a config's TOML text, with
/// its HTTP and MQTT listeners on loopback. The HTTP listener is bound here and
/// handed to the agent: `http.listen` may say port 0.
pub struct InProcessAgent {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessAgent {
    /// Parses and validates `text`, starts the agent and waits until it is ready.
    pub async fn start(text: &str) -> InProcessAgent {
        let config = edge_agent::config::Config::from_toml(text).expect("config parses");
        config.validate().expect("config valid");
        let listener = std::net::TcpListener::bind(config.http.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .unwrap_or_else(|e| panic!("bind http.listen {}: {e}", config.http.listen));
        let http = listener.local_addr().expect("the HTTP listener's address");
        let mqtt = config.mqtt.listen;
        let stop = tokio_util::sync::CancellationToken::new();
        let hooks = edge_agent::Hooks {
            http_listener: Some(listener),
            ..edge_agent::Hooks::default()
        };
        let task = tokio::spawn(edge_agent::run_with(config, stop.clone(), hooks));
        let ready = wait_ready(http, Duration::from_secs(10)).await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        InProcessAgent {
            http,
            mqtt,
            stop,
            task,
        }
    }

    /// Stops the agent and checks that it ran and stopped cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("agent stops")
            .expect("agent task")
            .expect("agent ran cleanly");
    }
}

#[cfg(test)]
mod tests {
    use super::committed_range;

    #[test]
    fn committed_range_reads_the_store_log_line() {
        let line = "2026-11-26T08:00:00.000Z DEBUG edge_agent::store: committed seq 17..=42";
        assert_eq!(committed_range(line), Some((17, 42)));
        assert_eq!(
            committed_range("committed seq 5..=5 records=1"),
            Some((5, 5))
        );
        assert_eq!(committed_range("store open last_seq=9"), None);
        assert_eq!(committed_range("committed seq 5..=x"), None);
    }
}
