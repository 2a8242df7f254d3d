//! A real Modbus TCP server (tokio-modbus's server skeleton) serving a register
//! image, with per-unit behaviour for failure tests and request counters.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;

/// How the server treats requests for one unit id. Unit ids not listed never
/// get an answer, like a gateway with nothing behind that address.
#[derive(Debug, Clone)]
pub enum Unit {
    /// Serve the register image.
    Serve,
    /// Answer every request with this exception.
    Exception(ExceptionCode),
    /// Answer with one word fewer than requested.
    Short,
    /// Answer the first `n` requests after `delay` with stale data (every word of the
    /// image plus one), then serve normally.
    LateFirst(usize, Duration),
}

pub struct Image {
    pub input: Vec<u16>,
    pub holding: Vec<u16>,
}

struct State {
    image: Mutex<Image>,
    units: HashMap<u8, Unit>,
    requests: Mutex<HashMap<u8, usize>>,
    connections: AtomicUsize,
}

#[derive(Clone)]
struct ImageService(Arc<State>);

type Reply = Result<Option<Response>, ExceptionCode>;

fn read(table: &[u16], addr: u16, cnt: u16) -> Result<Vec<u16>, ExceptionCode> {
    let start = usize::from(addr);
    let end = start + usize::from(cnt);
    table
        .get(start..end)
        .map(<[u16]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

impl ImageService {
    fn answer(&self, request: &Request<'_>) -> Reply {
        let image = self.0.image.lock().expect("image lock");
        match *request {
            Request::ReadInputRegisters(addr, cnt) => {
                read(&image.input, addr, cnt).map(|w| Some(Response::ReadInputRegisters(w)))
            }
            Request::ReadHoldingRegisters(addr, cnt) => {
                read(&image.holding, addr, cnt).map(|w| Some(Response::ReadHoldingRegisters(w)))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

fn stale(r: Response) -> Response {
    let bump = |w: Vec<u16>| w.into_iter().map(|x| x.wrapping_add(1)).collect();
    match r {
        Response::ReadInputRegisters(w) => Response::ReadInputRegisters(bump(w)),
        Response::ReadHoldingRegisters(w) => Response::ReadHoldingRegisters(bump(w)),
        other => other,
    }
}

impl Service for ImageService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let n = {
            let mut counts = self.0.requests.lock().expect("count lock");
            let c = counts.entry(req.slave).or_insert(0);
            *c += 1;
            *c
        };
        let reply: Reply = match self.0.units.get(&req.slave) {
            None => Ok(None),
            Some(Unit::Serve) => self.answer(&req.request),
            Some(Unit::Exception(code)) => Err(*code),
            Some(Unit::Short) => self.answer(&req.request).map(|r| {
                r.map(|r| match r {
                    Response::ReadInputRegisters(mut w) => {
                        w.pop();
                        Response::ReadInputRegisters(w)
                    }
                    Response::ReadHoldingRegisters(mut w) => {
                        w.pop();
                        Response::ReadHoldingRegisters(w)
                    }
                    other => other,
                })
            }),
            Some(Unit::LateFirst(late, delay)) => {
                let reply = self.answer(&req.request);
                if n <= *late {
                    // A stale answer: different data, so a test sees if it is taken.
                    let reply = reply.map(|r| r.map(stale));
                    let delay = *delay;
                    return Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        reply
                    });
                }
                reply
            }
        };
        Box::pin(std::future::ready(reply))
    }
}

/// The same service on the master side of a pseudo-terminal, as an RTU device.
pub struct RtuTestServer {
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl RtuTestServer {
    pub fn start(master: tokio_serial::SerialStream, image: Image, units: &[(u8, Unit)]) -> Self {
        let state = Arc::new(State {
            image: Mutex::new(image),
            units: units.iter().cloned().collect(),
            requests: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
        });
        let service = ImageService(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = tokio_modbus::server::rtu::Server::new(master)
                .serve_forever(service)
                .await;
        });
        RtuTestServer { state, task }
    }

    pub fn requests(&self, unit: u8) -> usize {
        self.state
            .requests
            .lock()
            .expect("count lock")
            .get(&unit)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for RtuTestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(image: Image, units: &[(u8, Unit)]) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            image: Mutex::new(image),
            units: units.iter().cloned().collect(),
            requests: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
        });
        let service = ImageService(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = move |stream, socket_addr| {
                let service = service.clone();
                service.0.connections.fetch_add(1, Ordering::SeqCst);
                async move {
                    accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(service.clone())))
                }
            };
            let _ = server.serve(&on_connected, |_err| {}).await;
        });
        TestServer { addr, state, task }
    }

    /// Requests received for a unit id so far.
    pub fn requests(&self, unit: u8) -> usize {
        self.state
            .requests
            .lock()
            .expect("count lock")
            .get(&unit)
            .copied()
            .unwrap_or(0)
    }

    /// Serves another register image from now on (a device replaced or reconfigured).
    pub fn set_image(&self, image: Image) {
        *self.state.image.lock().expect("image lock") = image;
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Modbus TCP gateway that holds a reply back across a reconnect, as a TCP-to-RTU
/// gateway can: the first request it gets is not answered on its connection; its
/// reply (with stale data: every word plus one) is handed to the next connection,
/// just before the answer to that connection's first request. Then it serves the
/// input registers of its image. Only function 0x04 is served.
pub struct ReplayGateway {
    pub addr: SocketAddr,
    replayed: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Where the gateway is with the held reply.
enum Held {
    /// The next request's reply is held back.
    Waiting,
    /// A reply held from connection `n`.
    From(usize, Vec<u8>),
    /// The held reply was handed on.
    Done,
}

fn mbap(transaction: [u8; 2], unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = transaction.to_vec();
    out.extend_from_slice(&[0, 0]);
    // PDUs built here are at most 5 + 2 * 125 bytes.
    out.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

impl ReplayGateway {
    pub async fn start(input: Vec<u16>) -> ReplayGateway {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let replayed = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Held::Waiting));
        let input = Arc::new(input);
        let counter = Arc::clone(&replayed);
        let task = tokio::spawn(async move {
            let mut connection = 0usize;
            let mut tasks = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                connection += 1;
                let this = connection;
                let (held, input, counter) = (held.clone(), input.clone(), counter.clone());
                tasks.spawn(async move {
                    let mut header = [0u8; 7];
                    while stream.read_exact(&mut header).await.is_ok() {
                        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
                        let mut pdu = vec![0u8; len.saturating_sub(1)];
                        if stream.read_exact(&mut pdu).await.is_err() || pdu.len() != 5 {
                            return;
                        }
                        let start = usize::from(u16::from_be_bytes([pdu[1], pdu[2]]));
                        let count = usize::from(u16::from_be_bytes([pdu[3], pdu[4]]));
                        let Some(words) = input.get(start..start + count) else {
                            return;
                        };
                        let reply = |bump: u16| {
                            let mut out = vec![pdu[0], (2 * count) as u8];
                            for w in words {
                                out.extend_from_slice(&w.wrapping_add(bump).to_be_bytes());
                            }
                            mbap([header[0], header[1]], header[6], &out)
                        };
                        let mut bytes = Vec::new();
                        {
                            let mut held = held.lock().expect("held lock");
                            match &*held {
                                Held::Waiting => {
                                    *held = Held::From(this, reply(1));
                                    continue;
                                }
                                Held::From(from, stale) if *from != this => {
                                    bytes.extend_from_slice(stale);
                                    *held = Held::Done;
                                    counter.fetch_add(1, Ordering::SeqCst);
                                }
                                _ => {}
                            }
                        }
                        bytes.extend_from_slice(&reply(0));
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ReplayGateway {
            addr,
            replayed,
            task,
        }
    }

    /// Held replies handed to a later connection so far.
    pub fn replayed(&self) -> usize {
        self.replayed.load(Ordering::SeqCst)
    }
}

impl Drop for ReplayGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}
