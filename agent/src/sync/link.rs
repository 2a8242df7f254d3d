//! The broker connection as the sync sees it: a small trait, so the state machine
//! can be driven without a network (tests use an in-process double), with rumqttc's
//! implementation in [`super::rumqtt`].

use std::future::Future;
use std::time::Duration;

/// What the connection reports, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A connection is up (ConnAck). Each is a new clean session: nothing published
    /// on an earlier one is sent again, and packet ids start afresh.
    Connected,
    /// A publish went out with this packet id. Publishes go out in the order
    /// [`Link::publish`] accepted them, so the n-th `Sent` of a connection is its
    /// n-th accepted publish (there is no other ack token).
    Sent(u16),
    /// The broker acknowledged the publish with this packet id (PubAck).
    Acked(u16),
    /// A message on a subscribed topic.
    Message { topic: String, payload: Vec<u8> },
    /// Any other packet from the broker (a ping response, a SubAck): the link lives.
    Heard,
    /// The disconnect asked for by [`Link::disconnect`] went out.
    Closed,
    /// The connection failed or was lost; the next attempt starts after `retry_in`.
    Down { reason: String, retry_in: Duration },
}

impl LinkEvent {
    /// Whether the event is a packet from the broker (what the keepalive watchdog
    /// listens for).
    pub fn is_incoming(&self) -> bool {
        matches!(
            self,
            LinkEvent::Connected
                | LinkEvent::Acked(_)
                | LinkEvent::Message { .. }
                | LinkEvent::Heard
        )
    }
}

/// A connection to the upstream broker that connects (and reconnects) by itself.
pub trait Link: Send + 'static {
    /// Queues a QoS 1 publish on the current connection. `false` when it cannot be
    /// queued: the request queue is full, or there is no connection (the caller
    /// tries again later).
    fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) -> bool;

    /// Subscribes to `topic` with QoS 1 on the current connection; `false` when it
    /// cannot be queued.
    fn subscribe(&mut self, topic: &str) -> bool;

    /// The next event. Cancel-safe (it is raced against other work); `None` once the
    /// link has ended.
    fn next_event(&mut self) -> impl Future<Output = Option<LinkEvent>> + Send + '_;

    /// Drops the current connection at once (a silent link); the next attempt starts
    /// without a backoff. Events of the dropped connection may still follow, before
    /// the next [`LinkEvent::Connected`].
    fn reset(&mut self);

    /// Leaves cleanly: publishes `farewell` (topic, payload) retained at most once,
    /// if given, then disconnects; [`LinkEvent::Closed`] follows once it went out.
    fn disconnect(&mut self, farewell: Option<(String, Vec<u8>)>);

    /// Ends the link; nothing of it runs after this returns.
    fn stop(&mut self) -> impl Future<Output = ()> + Send + '_;
}
