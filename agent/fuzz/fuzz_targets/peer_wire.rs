//! Decodes arbitrary bytes as the peer protocol's messages, as a host reads them from another
//! host's QUIC stream (`agent/src/peer/wire.rs`): it must never panic, and whatever decodes must
//! encode to a frame that decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shoal_agent::peer::wire;
use shoal_proto::peer::{PeerRequest, PieceHeader, PieceUpdate};

fuzz_target!(|data: &[u8]| {
    // The whole input as one frame's body, as each message type.
    round_trip::<PeerRequest>(data);
    round_trip::<PieceHeader>(data);
    round_trip::<PieceUpdate>(data);
    // The input as a stream of frames, as `wire::read` takes them: a request, then piece headers
    // or updates.
    let mut rest = data;
    let mut first = true;
    while let Some((header, after)) = rest.split_first_chunk::<4>() {
        let Ok(len) = wire::frame_len(*header) else { return };
        let Some(body) = after.get(..len) else { return };
        if first {
            round_trip::<PeerRequest>(body);
        } else {
            round_trip::<PieceHeader>(body);
            round_trip::<PieceUpdate>(body);
        }
        rest = &after[len..];
        first = false;
    }
});

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(body: &[u8]) {
    let Ok(m) = wire::decode::<M>(body) else { return };
    let frame = wire::encode(&m);
    let header: [u8; 4] = frame[..4].try_into().unwrap();
    let len = wire::frame_len(header).expect("a re-encoded message fits a frame");
    assert_eq!(len, frame.len() - 4, "the frame header announces its body");
    let again = wire::decode::<M>(&frame[4..]).expect("a re-encoded message decodes");
    assert_eq!(again, m, "a decoded message re-encodes to itself");
}
