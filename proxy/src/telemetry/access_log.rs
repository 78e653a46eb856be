//! The access log: one line per request, written when its response body is finished or
//! abandoned, under the tracing target `remora_proxy::access` (`--access-log`).

use std::net::SocketAddr;
use std::time::Instant;

use http::{header, Method, Request};
use tracing::info;

use crate::metrics::{Direction, Protocol};

/// One access-log line, written when the response body is finished or abandoned.
pub struct AccessLog {
    direction: &'static str,
    protocol: Protocol,
    target: SocketAddr,
    method: Method,
    authority: String,
    path: String,
    pub(crate) status: u16,
    start: Instant,
    pub(crate) bytes: u64,
    /// Tries the request took: 1 unless it was retried (0: answered by the proxy itself).
    pub(crate) tries: u32,
}

impl AccessLog {
    /// The line of a request the proxy terminates (HTTP/1, or HTTP/2 that is not relayed) to
    /// `target`, from its head.
    pub fn new<B>(
        direction: Direction,
        protocol: Protocol,
        target: SocketAddr,
        request: &Request<B>,
        start: Instant,
    ) -> Self {
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.as_str())
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|host| host.to_str().ok())
            })
            .unwrap_or("")
            .to_string();
        Self {
            direction: direction.as_str(),
            protocol,
            target,
            method: request.method().clone(),
            authority,
            path: request.uri().path().to_string(),
            status: 0,
            start,
            bytes: 0,
            tries: 1,
        }
    }

    /// The line of a relayed HTTP/2 request (see `serve::h2_relay`), from the fields its header
    /// block had (`authority`: `:authority`, else `Host`): the same fields as a terminated
    /// request's.
    pub fn relayed(
        direction: Direction,
        target: SocketAddr,
        method: Option<&[u8]>,
        authority: Option<&[u8]>,
        path: Option<&[u8]>,
        start: Instant,
    ) -> Self {
        let text =
            |value: Option<&[u8]>| String::from_utf8_lossy(value.unwrap_or_default()).into_owned();
        let path = path.unwrap_or_default();
        let path = path.split(|&byte| byte == b'?').next().unwrap_or_default();
        Self {
            direction: direction.as_str(),
            protocol: Protocol::h2,
            target,
            method: method
                .and_then(|method| Method::from_bytes(method).ok())
                .unwrap_or_else(|| Method::from_bytes(b"-").expect("a token")),
            authority: text(authority),
            path: text(Some(path)),
            status: 0,
            start,
            bytes: 0,
            tries: 1,
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        info!(
            target: "remora_proxy::access",
            direction = self.direction,
            protocol = ?self.protocol,
            destination = %self.target,
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            status = self.status,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            tries = self.tries,
        );
    }
}
