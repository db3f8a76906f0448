//! The protobuf codec of `ccpa.v1`, with buffers sized for its messages.
//!
//! tonic's default codec gives every call an 8 KiB encode buffer and an 8 KiB decode buffer.
//! This API's messages are a few hundred bytes, and the gateway is built to hold ten thousand
//! calls in flight. The buffers start at 512 bytes here and grow if a message needs more; what
//! that saved in the `flood` benchmark is in `docs/performance-history.md`.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of each call's encode and decode buffers.
const BUFFER_SIZE: usize = 512;
/// tonic's default: how much a streaming call encodes before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with small buffers. Named in `build.rs` (`codec_path`).
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
