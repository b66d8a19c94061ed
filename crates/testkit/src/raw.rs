//! Any method by its path with raw protobuf bytes: for the per-RPC token
//! table's tests and for fuzzing requests the typed clients cannot send.

use std::str::FromStr;

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use prost::Message;
use taskmesh_server::pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::TestServer;

/// Raw protobuf bytes both ways, to call any method by its path.
#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// How a method is called.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shape {
    Unary,
    ServerStream,
    Bidi,
}

/// Every method of every taskmesh service, from the descriptor set.
pub fn every_rpc() -> Vec<(String, Shape)> {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for m in &service.method {
                let shape = match (m.client_streaming(), m.server_streaming()) {
                    (false, false) => Shape::Unary,
                    (false, true) => Shape::ServerStream,
                    _ => Shape::Bidi,
                };
                out.push((
                    format!("/{}.{}/{}", file.package(), service.name(), m.name()),
                    shape,
                ));
            }
        }
    }
    assert!(
        out.len() >= 38,
        "the descriptor set lists {} methods",
        out.len()
    );
    out
}

/// Calls `path` with `body` and `token`; answers the status the call (or
/// its stream's first item) ends with, OK when it answered.
pub async fn call(
    s: &TestServer,
    path: &str,
    shape: Shape,
    token: Option<&str>,
    body: Vec<u8>,
) -> Status {
    let mut grpc = tonic::client::Grpc::new(s.channel().await);
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_str(path).unwrap();
    let result = match shape {
        Shape::Unary => {
            let mut req = Request::new(body);
            auth(&mut req, token);
            grpc.unary(req, path, Raw).await.map(|_| ())
        }
        Shape::ServerStream => {
            let mut req = Request::new(body);
            auth(&mut req, token);
            // Refusals come before the stream; an open stream was let in.
            grpc.server_streaming(req, path, Raw).await.map(|_| ())
        }
        Shape::Bidi => {
            let mut req = Request::new(tokio_stream::once(body));
            auth(&mut req, token);
            grpc.streaming(req, path, Raw).await.map(|_| ())
        }
    };
    result.err().unwrap_or_else(|| Status::ok(""))
}

fn auth<T>(req: &mut Request<T>, token: Option<&str>) {
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        req.metadata_mut().insert("authorization", v);
    }
}

/// Opens the bidi method `path`, sends `frames` (raw protobuf, one message
/// each) and answers the status the response stream ends with: OK for a
/// clean end.
pub async fn stream_end(
    s: &TestServer,
    path: &str,
    token: Option<&str>,
    frames: Vec<Vec<u8>>,
) -> Status {
    let mut grpc = tonic::client::Grpc::new(s.channel().await);
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_str(path).unwrap();
    let mut req = Request::new(tokio_stream::iter(frames));
    auth(&mut req, token);
    let mut stream = match grpc.streaming(req, path, Raw).await {
        Ok(response) => response.into_inner(),
        Err(status) => return status,
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return Status::ok(""),
            Err(status) => return status,
        }
    }
}
