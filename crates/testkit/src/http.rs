//! Plain HTTP/1.1 by hand, for what the server answers outside gRPC (the
//! page, gRPC-web, /metrics): exactly the bytes sent, the headers as they
//! came back.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `head` and `body` on a new connection and reads the answer to
/// its end: the headers (lowercased) and the body (de-chunked).
pub async fn http1(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (String, Vec<u8>) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end")
        + 4;
    let headers = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let body = dechunk(&headers, &raw[split..]);
    (headers, body)
}

pub fn dechunk(headers: &str, body: &[u8]) -> Vec<u8> {
    if !headers.contains("transfer-encoding: chunked") {
        return body.to_vec();
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
        rest = &rest[line_end + 2 + size + 2..];
    }
}

/// `GET path`, the connection closed after.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (String, Vec<u8>) {
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    http1(addr, &head, b"").await
}
