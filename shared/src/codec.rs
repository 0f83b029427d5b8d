//! The protobuf codec every braid service and client uses: prost's, except
//! that a message that does not decode is the caller's error
//! (`InvalidArgument`), not the server's (`Internal`, tonic-prost's choice).
//! `build.rs` wires it into the generated code with `codec_path`.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// prost encoding, with decode errors mapped to `InvalidArgument`.
#[derive(Debug, Clone)]
pub struct BraidCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for BraidCodec<T, U> {
    fn default() -> Self {
        BraidCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for BraidCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BraidDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BraidDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`, refusing a malformed message as the sender's error.
#[derive(Debug, Clone)]
pub struct BraidDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for BraidDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| Status::invalid_argument(format!("malformed protobuf message: {e}")))
    }
}
