//! The gRPC codec of the generated stubs: tonic-prost's encoder, and a decoder that hands prost
//! the message as one contiguous slice.
//!
//! tonic gathers each message into one buffer before decoding it, but tonic-prost decodes
//! through that buffer's generic `Buf` view, which costs a bounds check and a call per varint
//! and per field; a `&[u8]` is prost's fast path (measured: the client's decoding of a
//! `domain.info` result; README "Remote calls", Figures). The bytes and the format are the same.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::{
    codec::{BufferSettings, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::ProstEncoder;

/// What `tonic_prost_build` names as the codec of every method (`build.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder(PhantomData)
    }
}

/// Decodes a message from the contiguous bytes tonic gathered for it.
#[derive(Debug, Clone, Copy)]
pub struct SliceDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        let decoded = if buf.chunk().len() == len {
            let decoded = U::decode(buf.chunk());
            buf.advance(len);
            decoded
        } else {
            // Not gathered in one piece (tonic does gather; this keeps it correct if not).
            U::decode(buf)
        };
        // As tonic-prost: an undecodable message is an internal error of the far side.
        decoded.map(Some).map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
