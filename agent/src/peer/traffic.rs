//! What the peer connections carry, as QUIC counts it: every datagram and byte (pieces, control
//! messages, acknowledgements, packet headers) and every loss, over the connections open now and
//! those already closed. Piece bytes alone are the engine's `peer_bytes_*`; the difference is the
//! protocol's cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Sums of one or more connections' statistics.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    datagrams_received: u64,
    bytes_received: u64,
    datagrams_sent: u64,
    bytes_sent: u64,
    packets_lost: u64,
    bytes_lost: u64,
    ack_frames_received: u64,
    ack_frames_sent: u64,
    ping_frames_received: u64,
    stream_frames_received: u64,
    /// Flow control credit: MAX_DATA, MAX_STREAM_DATA and MAX_STREAMS frames.
    credit_frames_received: u64,
    /// Stream ends other than a finish: RESET_STREAM and STOP_SENDING frames.
    abort_frames_received: u64,
}

impl Totals {
    fn add(&mut self, s: &quinn::ConnectionStats) {
        self.datagrams_received += s.udp_rx.datagrams;
        self.bytes_received += s.udp_rx.bytes;
        self.datagrams_sent += s.udp_tx.datagrams;
        self.bytes_sent += s.udp_tx.bytes;
        self.packets_lost += s.path.lost_packets;
        self.bytes_lost += s.path.lost_bytes;
        self.ack_frames_received += s.frame_rx.acks;
        self.ack_frames_sent += s.frame_tx.acks;
        let rx = &s.frame_rx;
        self.ping_frames_received += rx.ping;
        self.stream_frames_received += rx.stream;
        self.credit_frames_received += rx.max_data + rx.max_stream_data + rx.max_streams_bidi + rx.max_streams_uni;
        self.abort_frames_received += rx.reset_stream + rx.stop_sending;
    }
}

/// The peer connections of this host, for its metrics (clones share them).
#[derive(Clone, Default)]
pub struct PeerTraffic {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    open: HashMap<usize, quinn::Connection>,
    closed: Totals,
}

impl std::fmt::Debug for PeerTraffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTraffic").finish_non_exhaustive()
    }
}

impl PeerTraffic {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection is being served.
    pub fn opened(&self, conn: &quinn::Connection) {
        self.lock().open.insert(conn.stable_id(), conn.clone());
    }

    /// A connection ended: its figures join the closed ones'.
    pub fn closed(&self, conn: &quinn::Connection) {
        let mut inner = self.lock();
        if inner.open.remove(&conn.stable_id()).is_some() {
            inner.closed.add(&conn.stats());
        }
    }

    fn totals(&self) -> (usize, Totals) {
        let inner = self.lock();
        let mut t = inner.closed;
        for c in inner.open.values() {
            t.add(&c.stats());
        }
        (inner.open.len(), t)
    }
}

impl Collector for PeerTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (open, t) = self.totals();
        let gauge = ConstGauge::new(open as i64);
        gauge.encode(encoder.encode_descriptor(
            "peer_connections",
            "Open QUIC connections to other hosts (one per pair, either direction)",
            None,
            gauge.metric_type(),
        )?)?;
        let counters: [(&str, &str, u64); 12] = [
            ("peer_udp_datagrams_received", "UDP datagrams received on peer connections", t.datagrams_received),
            (
                "peer_udp_bytes_received",
                "UDP payload bytes received on peer connections (pieces, control, acknowledgements, QUIC headers)",
                t.bytes_received,
            ),
            ("peer_udp_datagrams_sent", "UDP datagrams sent on peer connections", t.datagrams_sent),
            (
                "peer_udp_bytes_sent",
                "UDP payload bytes sent on peer connections (pieces, control, acknowledgements, QUIC headers)",
                t.bytes_sent,
            ),
            ("peer_packets_lost", "QUIC packets sent to other hosts and declared lost", t.packets_lost),
            ("peer_bytes_lost", "Bytes of QUIC packets sent to other hosts and declared lost", t.bytes_lost),
            ("peer_ack_frames_received", "QUIC acknowledgement frames received on peer connections", t.ack_frames_received),
            ("peer_ack_frames_sent", "QUIC acknowledgement frames sent on peer connections", t.ack_frames_sent),
            ("peer_ping_frames_received", "QUIC PING frames (keep-alives) received on peer connections", t.ping_frames_received),
            (
                "peer_stream_frames_received",
                "QUIC STREAM frames (pieces and messages) received on peer connections",
                t.stream_frames_received,
            ),
            (
                "peer_credit_frames_received",
                "QUIC flow control frames (MAX_DATA, MAX_STREAM_DATA, MAX_STREAMS) received on peer connections",
                t.credit_frames_received,
            ),
            (
                "peer_abort_frames_received",
                "QUIC RESET_STREAM and STOP_SENDING frames received on peer connections",
                t.abort_frames_received,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}
