//! The state machine driven through [`super::fake`], without a network: each test
//! is named after the transition it makes happen.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::fake::{self, FakeBroker, FakeLink};
use super::phase::ACKED_SLOTS_PER_WINDOW;
use super::*;
use crate::config::{ByteSize, HumanDuration};
use crate::store::bench::sample_payload;

const GW: &str = "gw1";

fn config() -> UpstreamConfig {
    UpstreamConfig {
        host: "127.0.0.1".into(),
        port: 1,
        batch_records: 100,
        batch_bytes: ByteSize(64 << 10),
        inflight_batches: 4,
        // Long: only the watchdog's own test lets the link go silent.
        keep_alive: HumanDuration(Duration::from_secs(3600)),
        manifest_interval: HumanDuration(Duration::from_secs(3600)),
        ..UpstreamConfig::default()
    }
}

fn open_store(dir: &tempfile::TempDir) -> Arc<Store> {
    Arc::new(crate::store::testing::open(&crate::store::testing::config(
        dir,
    )))
}

/// Appends `n` readings and syncs them (the upstream sends synced records only).
fn fill(store: &Store, n: u64) {
    if n == 0 {
        return;
    }
    let base = store.last_seq();
    store
        .append(
            (base..base + n)
                .map(|i| sample_payload("main", i))
                .collect(),
        )
        .expect("append");
    store.sync().expect("sync");
}

/// A machine over a store of `records` readings, running on its own task.
struct Rig {
    broker: FakeBroker,
    status: watch::Receiver<SyncStatus>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    store: Arc<Store>,
    topics: UpstreamTopics,
    _committed: broadcast::Sender<Arc<Vec<Record>>>,
    _dir: tempfile::TempDir,
}

fn machine(store: Arc<Store>, cfg: &UpstreamConfig) -> (Machine<FakeLink>, FakeBroker) {
    let (link, broker) = fake::pair();
    let topics = UpstreamTopics::new("edge", GW);
    let (machine, _status) = Machine::new(store, cfg, GW, topics, link).expect("machine");
    (machine, broker)
}

fn rig(records: u64, cfg: UpstreamConfig) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir);
    fill(&store, records);
    let (link, broker) = fake::pair();
    let topics = UpstreamTopics::new("edge", GW);
    let (machine, status) =
        Machine::new(store.clone(), &cfg, GW, topics.clone(), link).expect("machine");
    let (committed, rx) = broadcast::channel(16);
    let stop = CancellationToken::new();
    let task = tokio::spawn(machine.run(rx, stop.clone()));
    Rig {
        broker,
        status,
        stop,
        task,
        store,
        topics,
        _committed: committed,
        _dir: dir,
    }
}

impl Rig {
    async fn wait(&mut self, what: &str, f: impl Fn(&SyncStatus) -> bool) -> SyncStatus {
        tokio::time::timeout(Duration::from_secs(60), self.status.wait_for(|s| f(s)))
            .await
            .unwrap_or_else(|_| panic!("{what} within 60 s"))
            .expect("the machine runs")
            .clone()
    }

    /// Sends the batches accepted so far and returns (packet id, seqs) of each.
    fn send_batches(&self) -> Vec<(u16, Vec<u64>)> {
        self.broker
            .send_queued()
            .into_iter()
            .filter(|(_, p)| p.topic == self.topics.records)
            .map(|(pkid, p)| {
                let seqs = wire::decode_batch(&p.payload)
                    .expect("a batch")
                    .iter()
                    .map(|r| r.seq)
                    .collect();
                (pkid, seqs)
            })
            .collect()
    }

    async fn stop(self) -> SyncStatus {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the machine stops within 60 s")
            .expect("the machine's task ends cleanly");
        let status = self.status.borrow().clone();
        status
    }
}

#[tokio::test]
async fn offline_to_catching_up_on_connack() {
    let mut rig = rig(300, config());
    assert_eq!(rig.status.borrow().state, SyncState::Offline);

    rig.broker.connect();
    let status = rig
        .wait("catching up", |s| s.state == SyncState::CatchingUp)
        .await;
    assert_eq!((status.connects, status.backlog), (1, 300));
    // Announced online, listening for resend commands, and the window filled from
    // the first seq after the cursor.
    // Three batches of 100, the window (4) has room for all.
    rig.broker.wait_queued(1 + 3).await;
    let sent = rig.broker.send_queued();
    assert_eq!(sent[0].1.topic, rig.topics.status);
    assert_eq!(
        (sent[0].1.payload.as_slice(), sent[0].1.retain),
        (&b"online"[..], true)
    );
    assert_eq!(rig.broker.subscribed(), vec![rig.topics.resend.clone()]);
    let first = wire::decode_batch(&sent[1].1.payload).expect("a batch");
    assert_eq!(first.first().map(|r| r.seq), Some(1));
    rig.stop().await;
}

#[tokio::test]
async fn offline_to_live_on_connack_at_most_a_batch_behind() {
    let mut rig = rig(100, config());
    rig.broker.connect();
    let status = rig.wait("live", |s| s.state == SyncState::Live).await;
    assert_eq!((status.connects, status.backlog), (1, 100));
    rig.stop().await;
}

#[tokio::test]
async fn catching_up_to_live_on_caught_up() {
    let mut rig = rig(300, config());
    rig.broker.connect();
    rig.wait("catching up", |s| s.state == SyncState::CatchingUp)
        .await;
    let mut seqs = Vec::new();
    // Batches go out as the window has room: acknowledge each as it is sent.
    while seqs.len() < 300 {
        rig.broker.wait_queued(1).await;
        for (pkid, batch) in rig.send_batches() {
            seqs.extend(batch);
            rig.broker.ack(pkid);
        }
    }
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "in order, once each");
    let status = rig
        .wait("live at the end of the backlog", |s| {
            s.state == SyncState::Live && s.cursor == 300
        })
        .await;
    assert_eq!((status.backlog, status.delivered), (0, 300));
    assert_eq!(rig.store.sync_mark(MARK_CURSOR).expect("cursor"), 300);
    rig.stop().await;
}

#[tokio::test]
async fn live_to_catching_up_on_fell_behind() {
    let mut rig = rig(0, config());
    rig.broker.connect();
    rig.wait("live", |s| s.state == SyncState::Live).await;
    // More than a batch arrives at once; nothing is acknowledged yet.
    fill(&rig.store, 250);
    let status = rig
        .wait("catching up", |s| s.state == SyncState::CatchingUp)
        .await;
    assert_eq!(status.backlog, 250);
    rig.stop().await;
}

#[tokio::test]
async fn catching_up_to_offline_on_loss_then_replays_from_the_cursor() {
    let mut rig = rig(300, config());
    rig.broker.connect();
    rig.broker.wait_queued(1 + 3).await;
    let batches = rig.send_batches();
    assert_eq!(batches.len(), 3, "three batches of 100");
    // Only the first is acknowledged before the link goes.
    rig.broker.ack(batches[0].0);
    rig.wait("cursor at 100", |s| s.cursor == 100).await;
    rig.broker.lose("connection reset");
    let status = rig.wait("offline", |s| s.state == SyncState::Offline).await;
    assert_eq!(
        status.last_error.as_deref(),
        Some("connection reset (retry in 100 ms)")
    );
    // Acknowledgements of the lost connection mean nothing now.
    rig.broker.ack(batches[1].0);
    rig.broker.ack(batches[2].0);

    rig.broker.connect();
    rig.wait("connected again", |s| s.connects == 2).await;
    rig.broker.wait_queued(1 + 2).await;
    let again = rig.send_batches();
    assert_eq!(again[0].1.first(), Some(&101), "resumes after the cursor");
    assert_eq!(rig.status.borrow().cursor, 100, "stale acks moved nothing");
    assert_eq!(rig.status.borrow().last_error, None);
    rig.stop().await;
}

#[tokio::test]
async fn on_ack_out_of_order_moves_the_cursor_over_the_acknowledged_prefix_only() {
    let mut rig = rig(300, config());
    rig.broker.connect();
    rig.broker.wait_queued(1 + 3).await;
    let batches = rig.send_batches();
    rig.broker.ack(batches[1].0);
    rig.broker.ack(batches[2].0);
    // The cursor cannot pass the first batch: no write starts.
    rig.broker.settle().await;
    let status = rig.status.borrow().clone();
    assert_eq!((status.cursor, status.cursor_writes), (0, 0));
    rig.broker.ack(batches[0].0);
    let status = rig.wait("cursor at 300", |s| s.cursor == 300).await;
    assert_eq!(status.delivered, 300);
    rig.stop().await;
}

#[tokio::test]
async fn catching_up_keeps_its_place_while_the_link_refuses_publishes() {
    let mut rig = rig(300, config());
    rig.broker.set_full(true);
    rig.broker.connect();
    rig.wait("catching up", |s| s.state == SyncState::CatchingUp)
        .await;
    assert_eq!(rig.broker.queued(), 0, "everything refused");
    rig.broker.set_full(false);
    // Any wake lets the machine try again.
    rig.broker.heard();
    rig.broker.wait_queued(3).await;
    let batches = rig.send_batches();
    assert_eq!(
        batches[0].1.first(),
        Some(&1),
        "the refused batch goes first"
    );
    rig.stop().await;
}

#[tokio::test]
async fn live_to_offline_on_stop_says_offline_and_persists_the_cursor() {
    let mut rig = rig(50, config());
    rig.broker.connect();
    rig.broker.wait_queued(2).await;
    let batches = rig.send_batches();
    rig.broker.ack(batches[0].0);
    rig.wait("delivered", |s| s.cursor == 50).await;
    let store = rig.store.clone();
    let (broker, topics) = (rig.broker.clone(), rig.topics.clone());
    let status = rig.stop().await;
    assert_eq!(status.state, SyncState::Offline);
    assert_eq!(
        broker.farewell(),
        Some(Some((topics.status.clone(), b"offline".to_vec())))
    );
    assert_eq!(store.sync_mark(MARK_CURSOR).expect("cursor"), 50);
}

/// The watchdog's clock: with paused time, the machine sees exactly how long the
/// broker has been silent.
#[tokio::test(start_paused = true)]
async fn live_to_offline_on_silent_link() {
    let cfg = UpstreamConfig {
        keep_alive: HumanDuration(Duration::from_secs(10)),
        ..config()
    };
    let mut rig = rig(0, cfg);
    rig.broker.connect();
    rig.wait("live", |s| s.state == SyncState::Live).await;
    // Silent for less than 1.25 × keepalive: still live.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        (rig.broker.resets(), rig.status.borrow().state),
        (0, SyncState::Live)
    );
    // A ping response restarts the clock.
    rig.broker.heard();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        (rig.broker.resets(), rig.status.borrow().state),
        (0, SyncState::Live)
    );
    // 12.5 s after the last packet, the link is dropped.
    let status = rig.wait("offline", |s| s.state == SyncState::Offline).await;
    assert_eq!(rig.broker.resets(), 1);
    assert_eq!(
        status.last_error.as_deref(),
        Some("link silent (keepalive watchdog)")
    );
    rig.stop().await;
}

/// A batch read ahead goes out only if it still starts at the next seq to send: one
/// read before a reconnect rewound the sync to its cursor is thrown away.
#[tokio::test]
async fn catching_up_to_offline_throws_away_the_batch_read_ahead() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir);
    fill(&store, 300);
    let cfg = config();
    let (max_records, max_bytes) = (cfg.batch_records, cfg.batch_bytes.0 as usize);
    let (mut machine, broker) = machine(store.clone(), &cfg);
    broker.connect();
    machine.on_event(LinkEvent::Connected);
    let window = |m: &Machine<FakeLink>| {
        m.phase
            .session()
            .map(|s| (s.next, s.slots.len(), s.awaiting_outgoing.len()))
    };
    assert_eq!(window(&machine), Some((1, 0, 1)), "online announced");

    let first = read_batch(&store, GW, 1, max_records, max_bytes).expect("read");
    let second = read_batch(&store, GW, 101, max_records, max_bytes).expect("read");
    assert_eq!(first.seqs, (1..=100).collect::<Vec<_>>());
    assert_eq!(first.covered_to, 100);
    // What goes out: the read batch with the schemas the connection still needs.
    let mut published = first.payload.clone();
    wire::append_schemas(&mut published, &[]);
    let sent = wire::decode_batch(&published).expect("a batch");
    assert_eq!(
        sent.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    assert!(sent.iter().all(|r| r.gw == GW && r.kind == "reading"));

    assert!(machine.enqueue(first));
    assert_eq!(window(&machine), Some((101, 1, 2)), "published");

    // The link drops: the window goes, and the replay starts again after the
    // cursor (0).
    broker.lose("test");
    machine.on_event(LinkEvent::Down {
        reason: "test".into(),
        retry_in: Duration::ZERO,
    });
    assert_eq!(window(&machine), None);
    let offline = read_batch(&store, GW, 101, max_records, max_bytes).expect("read");
    assert!(machine.enqueue(offline), "nothing refused offline");
    broker.connect();
    machine.on_event(LinkEvent::Connected);
    assert_eq!(window(&machine), Some((1, 0, 1)));
    assert!(machine.enqueue(second), "nothing refused");
    assert_eq!(
        window(&machine),
        Some((1, 0, 1)),
        "the stale batch did not move the sync on"
    );

    // Read again from the rewound position, it goes out.
    let again = read_batch(&store, GW, 1, max_records, max_bytes).expect("read");
    assert!(machine.enqueue(again));
    assert_eq!(window(&machine), Some((101, 1, 2)));
}

#[test]
fn phase_transitions_keep_the_session_and_drop_it_only_on_loss() {
    let now = tokio::time::Instant::now();
    let mut phase = Phase::new(now);
    assert_eq!(phase.label(), SyncState::Offline);
    phase.on_sent(1);
    assert!(!phase.on_ack(1), "offline: no window to acknowledge");

    phase.on_connected(41, true, now);
    assert_eq!(phase.label(), SyncState::CatchingUp);
    let session = phase.session_mut().expect("connected");
    assert_eq!(session.next, 42);
    session.slots.push_back(Slot {
        last: 50,
        acked: false,
        seqs: (42..=50).collect(),
    });
    session.awaiting_outgoing.push_back(Tag::Slot(0));
    phase.on_sent(7);
    phase.on_caught_up();
    assert_eq!(phase.label(), SyncState::Live);
    assert!(phase.on_ack(7), "the window moved with the session");
    assert!(phase.session().expect("connected").slots[0].acked);
    phase.on_fell_behind();
    assert_eq!(phase.label(), SyncState::CatchingUp);
    phase.on_cursor(50);
    assert!(phase.session().expect("connected").slots.is_empty());

    let later = now + Duration::from_secs(3);
    phase.on_disconnected(later);
    assert_eq!(phase.label(), SyncState::Offline);
    assert!(phase.session().is_none());
    // A failed attempt while offline keeps the time it went offline.
    let retry = later + Duration::from_secs(2);
    phase.on_disconnected(retry);
    assert_eq!(phase.offline_for(retry), Some(Duration::from_secs(2)));
    phase.on_caught_up();
    assert_eq!(
        phase.label(),
        SyncState::Offline,
        "caught up only when connected"
    );
}

/// A trickle of one-reading batches, acknowledged at once, whose cursor waits for
/// the next journal sync: acknowledged batches do not fill the window, so the next
/// reading goes out without waiting for that sync; unacknowledged ones do.
#[test]
fn acknowledged_batches_waiting_for_the_cursor_leave_room_in_the_window() {
    let now = tokio::time::Instant::now();
    let mut phase = Phase::new(now);
    phase.on_connected(0, true, now);
    let window = 8;
    let session = phase.session_mut().expect("connected");
    for seq in 1..=window as u64 {
        session.slots.push_back(Slot {
            last: seq,
            acked: true,
            seqs: vec![seq],
        });
    }
    assert!(
        session.has_room(window, 100),
        "acknowledged, waiting for the cursor"
    );
    for seq in window as u64 + 1..(window * ACKED_SLOTS_PER_WINDOW) as u64 {
        session.slots.push_back(Slot {
            last: seq,
            acked: true,
            seqs: vec![seq],
        });
    }
    assert!(session.has_room(window, 100));
    let last = (window * ACKED_SLOTS_PER_WINDOW) as u64;
    session.slots.push_back(Slot {
        last,
        acked: true,
        seqs: vec![last],
    });
    assert!(!session.has_room(window, 100), "bounded all the same");
    phase.on_cursor(last);
    let session = phase.session_mut().expect("connected");
    for seq in last + 1..=last + window as u64 {
        session.slots.push_back(Slot {
            last: seq,
            acked: false,
            seqs: vec![seq],
        });
    }
    assert!(
        !session.has_room(window, 100),
        "a window of batches in flight"
    );
    // Full batches acknowledged: a window of them at most, as a kill re-sends them.
    let last = last + window as u64;
    phase.on_cursor(last);
    let session = phase.session_mut().expect("connected");
    for i in 0..window as u64 {
        let first = last + 1 + i * 100;
        session.slots.push_back(Slot {
            last: first + 99,
            acked: true,
            seqs: (first..first + 100).collect(),
        });
        assert_eq!(
            session.has_room(window, 100),
            i + 1 < window as u64,
            "{} full batches",
            i + 1
        );
    }
}
