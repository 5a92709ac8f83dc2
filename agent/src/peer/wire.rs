//! Framing of the peer protocol: each message is a 4-byte big-endian length then a prost message.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// Largest message accepted; piece bytes travel outside messages, so these stay small.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer message of {0} bytes is larger than the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("peer message does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("peer stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("peer stream: {0}")]
    Write(#[from] quinn::WriteError),
}

/// One framed message.
pub fn encode<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    // Encoding into a buffer of the right capacity cannot fail.
    let _ = m.encode(&mut buf);
    buf.freeze()
}

/// The length a frame header announces, refusing oversized ones.
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes the body of one frame (the bytes its header announced). Sans-IO, so the peer
/// protocol's decoding is tested and fuzzed without a QUIC stream (`agent/fuzz`).
pub fn decode<M: Message + Default>(body: &[u8]) -> Result<M, WireError> {
    if body.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge(body.len()));
    }
    Ok(M::decode(body)?)
}

/// Reads one message from a QUIC stream.
pub async fn read<M: Message + Default>(recv: &mut quinn::RecvStream) -> Result<M, WireError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await?;
    let mut body = vec![0u8; frame_len(header)?];
    recv.read_exact(&mut body).await?;
    decode(&body)
}

/// Longest [`read_end`] waits for a stream's end.
const END_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads the end of a stream whose last message was read. A stream dropped before its end was
/// read makes QUIC send the other side a STOP_SENDING frame even when nothing more was coming: a
/// packet of its own (and its acknowledgement) per request and direction, about 1,400 of them
/// crossing each node's downlink in a 32-node fan-out of 8 MiB.
pub async fn read_end(recv: &mut quinn::RecvStream) {
    let _ = tokio::time::timeout(END_WAIT, recv.read_to_end(0)).await;
}

/// Writes one message to a QUIC stream.
pub async fn write<M: Message>(send: &mut quinn::SendStream, m: &M) -> Result<(), WireError> {
    send.write_all(&encode(m)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::peer::{GetPiece, PeerRequest, PieceHeader, PieceUpdate, Refusal};

    #[test]
    fn frames_round_trip_and_oversized_frames_are_refused() {
        let m = PeerRequest {
            request: Some(shoal_proto::peer::peer_request::Request::GetPiece(GetPiece {
                task_id: "t".into(),
                number: 7,
                registry: "r".into(),
                queued: true,
            })),
        };
        let f = encode(&m);
        let len = frame_len([f[0], f[1], f[2], f[3]]).unwrap();
        assert_eq!(len, f.len() - 4);
        assert_eq!(PeerRequest::decode(&f[4..]).unwrap(), m);
        assert!(matches!(frame_len(((MAX_MESSAGE + 1) as u32).to_be_bytes()), Err(WireError::TooLarge(_))));
        assert!(PeerRequest::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }

    #[test]
    fn decode_reads_a_frame_body_and_refuses_malformed_or_oversized_ones() {
        let header = PieceHeader { number: 3, offset: 1 << 22, length: 1 << 22, blake3: "ab".into(), error: String::new(), refusal: 0 };
        let f = encode(&header);
        assert_eq!(decode::<PieceHeader>(&f[4..]).unwrap(), header);
        let update =
            PieceUpdate { numbers: vec![0, 1, 5], done: true, task_length: 9, error: String::new(), refusal: Refusal::Busy as i32 };
        assert_eq!(decode::<PieceUpdate>(&encode(&update)[4..]).unwrap(), update);
        assert_eq!(decode::<PeerRequest>(&[]).unwrap(), PeerRequest { request: None });
        // A truncated field and a string that is not UTF-8 are errors, not panics.
        assert!(matches!(decode::<PieceHeader>(&f[4..f.len() - 1]), Err(WireError::Decode(_))));
        assert!(matches!(decode::<PieceHeader>(&[0x22, 0x01, 0xff]), Err(WireError::Decode(_))));
        assert!(matches!(decode::<PieceUpdate>(&vec![0; MAX_MESSAGE + 1]), Err(WireError::TooLarge(_))));
    }
}
