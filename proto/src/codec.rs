//! The gRPC codec of every `kiln.v1` service and client: prost's, except that a message that
//! does not decode is answered `INVALID_ARGUMENT` naming the message, where prost's codec says
//! `INTERNAL` (gRPC's word for a fault of the side that reports it). A peer that sends garbage
//! is told so, and the operator's logs and metrics do not count it as a server fault.
//!
//! Framing faults below the message (a bad compression flag, a truncated frame) keep tonic's
//! codes, which gRPC prescribes.

use tonic::codec::{BufferSettings, DecodeBuf};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Encodes `T` and decodes `U` as prost does; see the module's description.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// Decodes `U`, calling a message that does not parse an invalid argument.
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            // prost's decoder fails only on the message's bytes, and says so as INTERNAL.
            if status.code() == Code::Internal {
                Status::invalid_argument(format!(
                    "malformed {} message: {}",
                    message_name::<U>(),
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// `FromClient` for `kiln_proto::v1::FromClient`: the name the .proto file gives it.
fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_are_the_protos() {
        assert_eq!(message_name::<crate::v1::FromClient>(), "FromClient");
    }
}
