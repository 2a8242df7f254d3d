//! An in-process [`Link`] for the state machine's tests: the test plays the broker
//! through a [`FakeBroker`] (connects, loses the link, sends, acknowledges, refuses
//! publishes), and sees what the machine published.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::link::{Link, LinkEvent};

/// A publish the machine handed to the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub topic: String,
    pub retain: bool,
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    connected: bool,
    /// Publishes are refused (a full request queue).
    full: bool,
    /// Accepted on the current connection and not sent yet.
    queued: VecDeque<Published>,
    /// Packet id of the last publish sent on the current connection.
    last_pkid: u16,
    subscribed: Vec<String>,
    resets: usize,
    /// Events the test pushed, and those the machine took.
    pushed: usize,
    taken: usize,
    /// What `disconnect` was asked to leave, if it was called.
    farewell: Option<Option<(String, Vec<u8>)>>,
}

/// The machine's side.
pub struct FakeLink {
    events: mpsc::UnboundedReceiver<LinkEvent>,
    own: mpsc::UnboundedSender<LinkEvent>,
    shared: Arc<Shared>,
}

/// The test's side.
#[derive(Clone)]
pub struct FakeBroker {
    events: mpsc::UnboundedSender<LinkEvent>,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever the machine calls the link.
    changed: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn pair() -> (FakeLink, FakeBroker) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        changed: Notify::new(),
    });
    let link = FakeLink {
        events: rx,
        own: tx.clone(),
        shared: shared.clone(),
    };
    (link, FakeBroker { events: tx, shared })
}

impl Link for FakeLink {
    fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) -> bool {
        let mut state = self.shared.state();
        let accepted = state.connected && !state.full;
        if accepted {
            state.queued.push_back(Published {
                topic: topic.to_string(),
                retain,
                payload,
            });
        }
        drop(state);
        self.shared.changed.notify_waiters();
        accepted
    }

    fn subscribe(&mut self, topic: &str) -> bool {
        let mut state = self.shared.state();
        if state.connected {
            state.subscribed.push(topic.to_string());
        }
        state.connected
    }

    async fn next_event(&mut self) -> Option<LinkEvent> {
        // Cancel-safe: nothing awaits after `recv`.
        let event = self.events.recv().await;
        if event.is_some() {
            self.shared.state().taken += 1;
            self.shared.changed.notify_waiters();
        }
        event
    }

    fn reset(&mut self) {
        let mut state = self.shared.state();
        state.connected = false;
        state.queued.clear();
        state.resets += 1;
        drop(state);
        self.shared.changed.notify_waiters();
    }

    fn disconnect(&mut self, farewell: Option<(String, Vec<u8>)>) {
        self.shared.state().farewell = Some(farewell);
        let _ = self.own.send(LinkEvent::Closed);
    }

    async fn stop(&mut self) {}
}

/// Longest a test waits for the machine to act (generous: CI runs under emulation).
const WAIT: Duration = Duration::from_secs(60);

impl FakeBroker {
    fn push(&self, event: LinkEvent) {
        // The machine holds the receiver until its task ends.
        if self.events.send(event).is_ok() {
            self.shared.state().pushed += 1;
        }
    }

    /// A connection comes up (ConnAck); packet ids start afresh.
    pub fn connect(&self) {
        let mut state = self.shared.state();
        state.connected = true;
        state.queued.clear();
        state.last_pkid = 0;
        drop(state);
        self.push(LinkEvent::Connected);
    }

    /// The connection is lost; what was not sent yet goes with it.
    pub fn lose(&self, reason: &str) {
        let mut state = self.shared.state();
        state.connected = false;
        state.queued.clear();
        drop(state);
        self.push(LinkEvent::Down {
            reason: reason.to_string(),
            retry_in: Duration::from_millis(100),
        });
    }

    /// Refuses (or accepts again) every publish, as a full request queue does.
    pub fn set_full(&self, full: bool) {
        self.shared.state().full = full;
    }

    /// Sends everything accepted so far, in order: each gets the next packet id.
    pub fn send_queued(&self) -> Vec<(u16, Published)> {
        let mut state = self.shared.state();
        let mut sent = Vec::new();
        while let Some(p) = state.queued.pop_front() {
            state.last_pkid = state.last_pkid % u16::MAX + 1;
            sent.push((state.last_pkid, p));
        }
        drop(state);
        for (pkid, _) in &sent {
            self.push(LinkEvent::Sent(*pkid));
        }
        sent
    }

    pub fn ack(&self, pkid: u16) {
        self.push(LinkEvent::Acked(pkid));
    }

    /// A packet that only says the broker is there (a ping response).
    pub fn heard(&self) {
        self.push(LinkEvent::Heard);
    }

    pub fn subscribed(&self) -> Vec<String> {
        self.shared.state().subscribed.clone()
    }

    pub fn resets(&self) -> usize {
        self.shared.state().resets
    }

    pub fn queued(&self) -> usize {
        self.shared.state().queued.len()
    }

    pub fn farewell(&self) -> Option<Option<(String, Vec<u8>)>> {
        self.shared.state().farewell.clone()
    }

    /// Waits until the machine has taken every event pushed so far. On a
    /// current-thread runtime it has then also handled them: it handles an event
    /// before it awaits anything else.
    pub async fn settle(&self) {
        self.wait_for("every event taken", |s| s.taken >= s.pushed)
            .await;
    }

    /// Waits until at least `n` publishes are accepted and not sent yet.
    pub async fn wait_queued(&self, n: usize) {
        self.wait_for(&format!("{n} publishes queued"), |s| s.queued.len() >= n)
            .await;
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&State) -> bool) {
        tokio::time::timeout(WAIT, async {
            loop {
                let changed = self.shared.changed.notified();
                if done(&self.shared.state()) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"));
    }
}
