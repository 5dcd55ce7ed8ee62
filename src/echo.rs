//! brpc's example `EchoService`, so stock brpc echo clients and servers can talk to trustwire.
//!
//! `package example; service EchoService { rpc Echo(EchoRequest) returns (EchoResponse); }`
//! with `message EchoRequest { required string message = 1; }` (EchoResponse alike).

use prost::Message;

use crate::rpc::{Request, Response, Server, Status};

/// The service's full name.
pub const SERVICE: &str = "example.EchoService";
/// Its one method.
pub const METHOD: &str = "Echo";

/// `EchoRequest` and `EchoResponse` share this shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMessage {
    #[prost(string, optional, tag = "1")]
    pub message: Option<String>,
}

/// Encodes an echo request or response carrying `text`.
pub fn encode(text: &str) -> Vec<u8> {
    EchoMessage { message: Some(text.to_string()) }.encode_to_vec()
}

/// Decodes the `message` field of an echo request or response.
pub fn decode(payload: &[u8]) -> Result<String, prost::DecodeError> {
    Ok(EchoMessage::decode(payload)?.message.unwrap_or_default())
}

/// Answers with the request's payload and attachment, as brpc's example echo server does.
pub async fn handler(req: Request) -> Result<Response, Status> {
    Ok(Response { payload: req.payload, attachment: req.attachment })
}

/// Registers `example.EchoService/Echo` on `server`.
pub fn register(server: &mut Server) {
    server.register(SERVICE, METHOD, handler);
}
