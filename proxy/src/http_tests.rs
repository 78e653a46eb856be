//! Byte-level conformance tests of the HTTP/1 path: a raw-TCP client and a scripted raw-TCP
//! upstream on either side of `serve_http1`, so every byte each peer sends is fixed and every
//! byte it receives is checked.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::Endpoint;
use crate::metrics::{Direction, Metrics};
use crate::outbound::Destination;
use crate::proxy::{Context, Proxy};
use crate::serve::detect::{detect, Rewound};
use crate::serve::http::serve_http1;

/// The longest any single step may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing happened within {WAIT:?}"),
    }
}

/// A proxy of its own per test, so metrics start at zero.
pub(crate) fn new_proxy() -> &'static Proxy {
    proxy_with(|_| ())
}

/// A proxy with the test defaults, changed by `configure`.
pub(crate) fn proxy_with(configure: impl FnOnce(&mut Proxy)) -> &'static Proxy {
    let mut proxy = Box::new(Proxy {
        connect_timeout: Duration::from_secs(2),
        keepalive: None,
        opaque_ports: Default::default(),
        proxy_ports: [15001, 15006],
        access_log: false,
        h2_relay: false,
        metrics: Metrics::new(),
        server_first: Default::default(),
        drain: Default::default(),
        workers: crate::runtime::workers::Workers::new(1).0,
        ready: Default::default(),
        discovery: None,
        inbound_rate_limit: None,
        identity: Default::default(),
        inbound_mtls: Default::default(),
    });
    configure(&mut proxy);
    Box::leak(proxy)
}

/// The context of a connection in `direction`, as that side makes it.
pub(crate) fn context(proxy: &'static Proxy, direction: Direction) -> Context {
    match direction {
        Direction::Outbound => crate::outbound::context(proxy),
        Direction::Inbound => crate::inbound::context(proxy),
    }
}

/// A loopback listener whose every connection `serve_http1` forwards to `target`.
async fn start_proxy(target: SocketAddr, direction: Direction) -> (SocketAddr, &'static Proxy) {
    let proxy = new_proxy();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Through detection, as the listener does, so the handler starts from the bytes
                // detection already read.
                if let Ok((_, first)) = detect(&stream).await {
                    let stream = Rewound::new(stream.into(), first);
                    let destination = Destination::Forward(Endpoint::new(target));
                    serve_http1(stream, target, destination, context(proxy, direction)).await;
                }
            });
        }
    });
    (addr, proxy)
}

/// A client connection through a fresh outbound proxy in front of `upstream`, and the proxy's
/// address for more.
async fn client_of(upstream: &Upstream) -> (Wire, SocketAddr) {
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    (Wire::connect(proxy).await, proxy)
}

/// A start line and header fields as they were on the wire.
#[derive(Debug, Clone)]
struct Head {
    /// Everything up to and including the blank line.
    raw: Vec<u8>,
    start: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn parse(raw: Vec<u8>) -> Self {
        let text = &raw[..raw.len() - 4];
        let mut lines = text.split(|&b| b == b'\n').map(|line| match line {
            [rest @ .., b'\r'] => rest,
            line => line,
        });
        let start = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
        let headers = lines
            .map(|line| {
                let colon = line
                    .iter()
                    .position(|&b| b == b':')
                    .unwrap_or_else(|| panic!("header line without a colon: {line:?}"));
                let name = String::from_utf8_lossy(&line[..colon]).into_owned();
                let value = line[colon + 1..].trim_ascii().to_vec();
                (name, value)
            })
            .collect();
        Self {
            raw,
            start,
            headers,
        }
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(have, _)| have.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .collect()
    }

    fn get(&self, name: &str) -> Option<String> {
        self.all(name).into_iter().next()
    }

    fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }

    fn names(&self) -> Vec<String> {
        self.headers.iter().map(|(name, _)| name.clone()).collect()
    }

    fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {:?}", self.start))
    }

    fn version(&self) -> &str {
        if self.start.starts_with("HTTP/") {
            self.start.split(' ').next().unwrap_or_default()
        } else {
            self.start.rsplit(' ').next().unwrap_or_default()
        }
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length")
            .map(|value| value.parse().expect("a numeric Content-Length"))
    }

    fn is_chunked(&self) -> bool {
        self.all("transfer-encoding")
            .iter()
            .any(|value| value.to_ascii_lowercase().contains("chunked"))
    }
}

/// A request or response: its head and its decoded body.
#[derive(Debug, Clone)]
struct Message {
    head: Head,
    body: Vec<u8>,
    /// Trailer fields of a chunked body.
    trailers: Vec<(String, Vec<u8>)>,
}

impl Message {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One side of a TCP connection with a read buffer, every read bounded by [`WAIT`].
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn connect(addr: SocketAddr) -> Self {
        Self::new(
            within("connecting", TcpStream::connect(addr))
                .await
                .unwrap(),
        )
    }

    /// Reads more into the buffer; 0 at the end of the stream (a reset counts as the end).
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 64 * 1024];
        let n = within("reading", self.stream.read(&mut chunk))
            .await
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn write(&mut self, bytes: &[u8]) {
        within("writing", self.stream.write_all(bytes))
            .await
            .unwrap();
    }

    /// A head, or None when the peer closed before sending any byte of one.
    async fn read_head(&mut self) -> Option<Head> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Some(Head::parse(raw));
            }
            if self.fill().await == 0 {
                assert!(
                    self.buf.is_empty(),
                    "the stream ended inside a head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await > 0,
                "the stream ended after {} of {n} body bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return line[..end].to_vec();
            }
            assert!(self.fill().await > 0, "the stream ended inside a line");
        }
    }

    async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// Decodes a chunked body into (body, trailers); chunk extensions are skipped.
    async fn chunked(&mut self) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut body = Vec::new();
        loop {
            let line = String::from_utf8(self.line().await).expect("an ASCII chunk size line");
            let size = line.split_once(';').map_or(line.as_str(), |(size, _)| size);
            let size = usize::from_str_radix(size.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
            if size == 0 {
                break;
            }
            body.extend(self.take(size).await);
            assert_eq!(self.take(2).await, b"\r\n", "a chunk must end with CRLF");
        }
        let mut trailers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                return (body, trailers);
            }
            let colon = line.iter().position(|&b| b == b':').expect("a trailer");
            trailers.push((
                String::from_utf8_lossy(&line[..colon]).into_owned(),
                line[colon + 1..].trim_ascii().to_vec(),
            ));
        }
    }

    async fn body(&mut self, head: Head, framed_by_close: bool) -> Message {
        let (body, trailers) = if head.is_chunked() {
            self.chunked().await
        } else if let Some(length) = head.content_length() {
            (self.take(length).await, Vec::new())
        } else if framed_by_close {
            (self.read_to_end().await, Vec::new())
        } else {
            Default::default()
        };
        Message {
            head,
            body,
            trailers,
        }
    }

    /// The next request, or None when the peer closed between requests.
    async fn read_request(&mut self) -> Option<Message> {
        let head = self.read_head().await?;
        Some(self.body(head, false).await)
    }

    /// The next response (an interim 1xx one included) to a request with `method`.
    async fn read_response(&mut self, method: &str) -> Message {
        let head = self
            .read_head()
            .await
            .expect("a response, not the end of the stream");
        let status = head.status();
        if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            return Message {
                head,
                body: Vec::new(),
                trailers: Vec::new(),
            };
        }
        self.body(head, true).await
    }

    /// Sends `request` and reads the final response (interim 1xx responses skipped).
    async fn exchange(&mut self, request: &[u8]) -> Message {
        self.write(request).await;
        let method = std::str::from_utf8(request)
            .ok()
            .and_then(|text| text.split(' ').next())
            .unwrap_or("GET")
            .to_string();
        loop {
            let response = self.read_response(&method).await;
            if response.head.status() >= 200 {
                return response;
            }
        }
    }

    /// True when the peer closes (or resets) within `limit` without sending anything more;
    /// false when the connection is still open and quiet after `limit`.
    async fn closes_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(limit, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Err(_)) | Ok(Ok(0)) => true,
            Ok(Ok(n)) => panic!(
                "unexpected bytes from the peer: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
        }
    }
}

/// A request the upstream received, and on which of its accepted connections (0, 1, …).
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    request: Message,
}

/// A scripted upstream server on loopback.
struct Upstream {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn conns(&self) -> Vec<usize> {
        self.seen().iter().map(|seen| seen.conn).collect()
    }
}

/// One accepted upstream connection, handed to the script.
struct UpstreamConn {
    wire: Wire,
    index: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl UpstreamConn {
    /// The next request (recorded), or None once the proxy closed the connection.
    async fn next(&mut self) -> Option<Message> {
        let request = self.wire.read_request().await?;
        self.seen.lock().unwrap().push(Seen {
            conn: self.index,
            request: request.clone(),
        });
        Some(request)
    }

    /// Writes without failing the script when the proxy has gone (some tests make it go).
    async fn send(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(WAIT, self.wire.stream.write_all(bytes)).await;
    }
}

/// An upstream that runs `script` on every connection it accepts.
async fn upstream<F, Fut>(script: F) -> Upstream
where
    F: Fn(UpstreamConn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (counter, log) = (accepts.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let index = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(script(UpstreamConn {
                wire: Wire::new(stream),
                index,
                seen: log.clone(),
            }));
        }
    });
    Upstream {
        addr,
        accepts,
        seen,
    }
}

/// A keep-alive upstream answering every request with `reply(connection index, request)`.
async fn replying<R>(reply: R) -> Upstream
where
    R: Fn(usize, &Message) -> Vec<u8> + Send + Sync + 'static,
{
    let reply = Arc::new(reply);
    upstream(move |mut conn| {
        let reply = reply.clone();
        async move {
            while let Some(request) = conn.next().await {
                let bytes = reply(conn.index, &request);
                conn.send(&bytes).await;
            }
        }
    })
    .await
}

/// A chunked `200` whose body is `body`, with an `X-Checksum` trailer.
const WITH_TRAILER: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
    4\r\nbody\r\n0\r\nX-Checksum: abc123\r\n\r\n";

/// `200 OK` with a Content-Length body.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n").into_bytes()
}

/// The request target of a request line.
fn target_of(request: &Message) -> String {
    request
        .head
        .start
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// `n` bytes that are not periodic at any power of two, so a dropped or repeated block shows.
pub(crate) fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// `body` in chunks of growing, odd sizes.
fn chunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 100);
    let mut rest = body;
    let mut size = 1;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        out.extend(format!("{n:x}\r\n").into_bytes());
        out.extend(&rest[..n]);
        out.extend(b"\r\n");
        rest = &rest[n..];
        size = (size * 3 + 7) % 70_001;
    }
    out.extend(b"0\r\n\r\n");
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// A loopback address that was just free: nothing listens on it, so a connect is refused.
pub(crate) async fn closed_port() -> SocketAddr {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    closed.local_addr().unwrap()
}

pub(crate) fn metric(proxy: &Proxy, line_prefix: &str) -> Option<u64> {
    proxy
        .metrics
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(line_prefix)?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Framing and connection reuse

#[tokio::test]
async fn keep_alive_answers_three_requests_over_one_upstream_connection() {
    let upstream = replying(|_, request| ok(&format!("hello {}", target_of(request)))).await;
    let (mut client, _) = client_of(&upstream).await;
    for path in ["/one", "/two", "/three"] {
        let response = client.exchange(&get(path)).await;
        assert_eq!(response.head.start, "HTTP/1.1 200 OK");
        assert_eq!(response.text(), format!("hello {path}"));
        assert_eq!(
            response.head.content_length(),
            Some(6 + path.len()),
            "a Content-Length response keeps its length"
        );
        assert!(!response.head.is_chunked());
    }
    assert_eq!(
        upstream.accepts(),
        1,
        "one upstream connection for all three"
    );
    assert_eq!(upstream.conns(), [0, 0, 0]);
    let seen = upstream.seen();
    assert_eq!(seen[0].request.head.start, "GET /one HTTP/1.1");
    assert_eq!(
        seen[0].request.head.get("host").as_deref(),
        Some("example.test")
    );
    assert!(
        !client.closes_within(Duration::from_millis(100)).await,
        "the client connection stays open"
    );
}

#[tokio::test]
async fn chunked_response_with_extensions_reaches_the_client_intact() {
    let upstream = replying(|_, _| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;x=y\r\nhello\r\n1\r\n,\r\n6;name=\"quoted\"\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    for _ in 0..2 {
        let response = client.exchange(&get("/chunked")).await;
        assert_eq!(response.head.status(), 200);
        assert_eq!(response.text(), "hello, world0123456789");
        // Framing is the proxy's choice; an unknown length to an HTTP/1.1 client is chunked.
        assert!(response.head.is_chunked() || response.head.content_length() == Some(22));
    }
    assert_eq!(
        upstream.accepts(),
        1,
        "a chunked response leaves the connection reusable"
    );
}

#[tokio::test]
async fn empty_chunked_response_is_an_empty_body_and_the_connection_is_reused() {
    let upstream = replying(|_, request| {
        if target_of(request) == "/empty" {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()
        } else {
            ok("after")
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client.exchange(&get("/empty")).await;
    assert_eq!(response.head.status(), 200);
    assert!(response.body.is_empty());
    assert_eq!(client.exchange(&get("/after")).await.text(), "after");
    assert_eq!(upstream.accepts(), 1);
}

/// The upstream side decodes the trailers and hyper's server writes them to a client that sent
/// `TE: trailers`.
#[tokio::test]
async fn chunked_trailers_reach_a_client_that_sent_te_trailers() {
    let upstream = replying(|_, _| WITH_TRAILER.to_vec()).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(b"GET /t HTTP/1.1\r\nHost: example.test\r\nTE: trailers\r\n\r\n")
        .await;
    assert_eq!(response.text(), "body");
    assert!(response.head.is_chunked());
    let trailers: Vec<_> = response
        .trailers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), String::from_utf8_lossy(value)))
        .collect();
    assert_eq!(
        trailers,
        [("x-checksum".to_string(), "abc123".into())],
        "trailers"
    );
    let seen = upstream.seen();
    assert_eq!(
        seen[0].request.head.get("te").as_deref(),
        Some("trailers"),
        "TE is forwarded: the upstream may then send trailers"
    );
    // The connection still works after a body with trailers.
    assert_eq!(client.exchange(&get("/next")).await.text(), "body");
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn close_delimited_response_is_complete_and_the_next_request_dials_again() {
    let upstream = upstream(|mut conn| async move {
        if conn.next().await.is_some() {
            let body = format!("close-delimited body from connection {}", conn.index);
            conn.send(
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}").as_bytes(),
            )
            .await;
        }
        // Dropping the connection ends the body.
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let first = client.exchange(&get("/a")).await;
    assert_eq!(first.text(), "close-delimited body from connection 0");
    let second = client.exchange(&get("/b")).await;
    assert_eq!(second.text(), "close-delimited body from connection 1");
    assert_eq!(upstream.accepts(), 2);
}

#[tokio::test]
async fn head_response_has_headers_and_no_body_and_the_connection_stays_usable() {
    let upstream = replying(|_, request| {
        if request.head.start.starts_with("HEAD /chunked") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        } else if request.head.start.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n".to_vec()
        } else {
            ok("after head")
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let head = client
        .exchange(b"HEAD /h HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    assert_eq!(head.head.status(), 200);
    assert_eq!(head.head.content_length(), Some(1234));
    assert_eq!(head.head.get("content-type").as_deref(), Some("text/plain"));
    assert!(
        !client.closes_within(Duration::from_millis(100)).await,
        "no body bytes after a HEAD response, and the connection stays open"
    );
    let after = client.exchange(&get("/after")).await;
    assert_eq!(after.text(), "after head");
    let chunked = client
        .exchange(b"HEAD /chunked HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    assert_eq!(chunked.head.status(), 200);
    assert_eq!(client.exchange(&get("/after")).await.text(), "after head");
    assert_eq!(upstream.accepts(), 1);
    assert_eq!(upstream.seen()[0].request.head.start, "HEAD /h HTTP/1.1");
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body_and_reuse_the_connection() {
    let upstream = replying(|_, request| match target_of(request).as_str() {
        "/204" => b"HTTP/1.1 204 No Content\r\nX-Id: 1\r\n\r\n".to_vec(),
        "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
        _ => ok("last"),
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let no_content = client.exchange(&get("/204")).await;
    assert_eq!(no_content.head.start, "HTTP/1.1 204 No Content");
    assert!(
        !no_content.head.is_chunked(),
        "204 has no Transfer-Encoding"
    );
    assert!(
        !no_content.head.has("content-length"),
        "204 has no Content-Length"
    );
    assert_eq!(no_content.head.get("x-id").as_deref(), Some("1"));
    let not_modified = client
        .exchange(b"GET /304 HTTP/1.1\r\nHost: example.test\r\nIf-None-Match: \"v1\"\r\n\r\n")
        .await;
    assert_eq!(not_modified.head.start, "HTTP/1.1 304 Not Modified");
    assert!(
        !not_modified.head.is_chunked(),
        "304 has no Transfer-Encoding"
    );
    assert_eq!(not_modified.head.get("etag").as_deref(), Some("\"v1\""));
    assert_eq!(
        upstream.seen()[1]
            .request
            .head
            .get("if-none-match")
            .as_deref(),
        Some("\"v1\"")
    );
    assert_eq!(client.exchange(&get("/last")).await.text(), "last");
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn early_hints_do_not_displace_the_final_response() {
    let upstream = replying(|_, _| {
        let mut bytes =
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec();
        bytes.extend(ok("final"));
        bytes
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    for _ in 0..2 {
        // `exchange` skips any interim response the proxy chooses to pass on.
        let response = client.exchange(&get("/hints")).await;
        assert_eq!(response.head.status(), 200);
        assert_eq!(response.text(), "final");
    }
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn chunked_trailers_without_te_leave_the_body_intact() {
    let upstream = replying(|_, _| WITH_TRAILER.to_vec()).await;
    let (mut client, _) = client_of(&upstream).await;
    for _ in 0..2 {
        let response = client.exchange(&get("/t")).await;
        assert_eq!(response.text(), "body");
        // Trailers may be dropped for a client that did not ask for them (RFC 9110 §6.5.1).
    }
    assert_eq!(upstream.accepts(), 1);
}

// ---------------------------------------------------------------------------------------------
// Request bodies

#[tokio::test]
async fn post_content_length_body_reaches_the_upstream_byte_exact() {
    let upstream = replying(|_, request| ok(&request.body.len().to_string())).await;
    let (mut client, _) = client_of(&upstream).await;
    let body = pattern(100 * 1024);
    let mut request = format!(
        "POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend(&body);
    let response = client.exchange(&request).await;
    assert_eq!(response.text(), "102400");
    let seen = upstream.seen();
    assert_eq!(seen[0].request.head.start, "POST /upload HTTP/1.1");
    assert_eq!(seen[0].request.head.content_length(), Some(body.len()));
    assert!(!seen[0].request.head.is_chunked());
    assert!(seen[0].request.body == body, "the body differs");
    assert_eq!(client.exchange(&get("/after")).await.text(), "0");
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn post_chunked_body_reaches_the_upstream_decoded() {
    let upstream = replying(|_, request| ok(&request.body.len().to_string())).await;
    let (mut client, _) = client_of(&upstream).await;
    let body = pattern(50_000);
    let mut request =
        b"POST /chunks HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    request.extend(chunk(&body));
    let response = client.exchange(&request).await;
    assert_eq!(response.text(), "50000");
    let seen = upstream.seen();
    assert!(seen[0].request.body == body, "the body differs");
    // Framing toward the upstream is the proxy's choice, but it must be exactly one of them.
    assert!(
        seen[0].request.head.is_chunked() != seen[0].request.head.has("content-length"),
        "exactly one of chunked and Content-Length: {:?}",
        seen[0].request.head.names()
    );
    assert_eq!(client.exchange(&get("/after")).await.text(), "0");
    assert_eq!(upstream.accepts(), 1);
}

/// Sends an `Expect: 100-continue` POST, waits for `100 Continue` before the body, and returns
/// the final response. An upstream that sends `100 Continue` does so after a pause, and the
/// client's must come after it: the proxy passes the upstream's on rather than answering itself.
async fn post_expecting_continue(upstream_sends_continue: bool) -> (Message, Upstream) {
    let continued = Arc::new(AtomicUsize::new(0));
    let sent = continued.clone();
    let upstream = upstream(move |mut conn| {
        let sent = sent.clone();
        async move {
            while let Some(head) = conn.wire.read_head().await {
                if upstream_sends_continue {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                    conn.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                let request = conn.wire.body(head, false).await;
                conn.seen.lock().unwrap().push(Seen {
                    conn: conn.index,
                    request: request.clone(),
                });
                conn.send(&ok(&format!("got {}", request.text()))).await;
            }
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    client
        .write(b"POST /expect HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
        .await;
    let interim = client.read_response("POST").await;
    assert_eq!(interim.head.start, "HTTP/1.1 100 Continue");
    if upstream_sends_continue {
        assert_eq!(
            continued.load(Ordering::SeqCst),
            1,
            "the client got 100 Continue before the upstream sent it"
        );
    }
    client.write(b"hello world").await;
    let last = client.read_response("POST").await;
    assert!(
        !client.closes_within(Duration::from_millis(50)).await,
        "nothing after the final response"
    );
    assert_eq!(client.exchange(&get("/after")).await.text(), "got ");
    (last, upstream)
}

/// An upstream that ignores `Expect` (an HTTP/1.0 one, or a server that reads the body
/// regardless) gets the body after [`crate::client::h1::CONTINUE_WAIT`], as from a client that
/// stops waiting.
#[tokio::test]
async fn expect_continue_to_an_upstream_that_sends_no_100_goes_on_after_a_wait() {
    let (last, upstream) = post_expecting_continue(false).await;
    assert_eq!(last.head.status(), 200, "{:?}", last.head.start);
    assert_eq!(last.text(), "got hello world");
    assert_eq!(upstream.seen()[0].request.body, b"hello world");
    assert_eq!(
        upstream.seen()[0].request.head.get("expect").as_deref(),
        Some("100-continue")
    );
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn expect_continue_is_relayed_from_the_upstream_with_one_final_response() {
    let (last, upstream) = post_expecting_continue(true).await;
    // The upstream's 100 reaches the client once, then the final response.
    assert_eq!(last.head.status(), 200, "{:?}", last.head.start);
    assert_eq!(last.text(), "got hello world");
    assert_eq!(upstream.seen()[0].request.body, b"hello world");
    assert_eq!(upstream.accepts(), 1);
}

/// An upload of `size` bytes whose body goes out from a task of its own (write errors end it
/// quietly) while the returned wire reads the answer.
async fn start_upload(proxy: SocketAddr, size: usize) -> (Wire, tokio::task::JoinHandle<()>) {
    let stream = within("connecting", TcpStream::connect(proxy))
        .await
        .unwrap()
        .into_std()
        .unwrap();
    let mut writer = TcpStream::from_std(stream.try_clone().unwrap()).unwrap();
    let reader = TcpStream::from_std(stream).unwrap();
    let sending = tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: {size}\r\n\r\n"
        );
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let block = pattern(64 * 1024);
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len());
            if writer.write_all(&block[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
    });
    (Wire::new(reader), sending)
}

/// A 64 MiB upload (far more than the socket buffers hold, so the proxy cannot finish writing
/// it first) to an upstream that reads the request head only and answers `response` at once,
/// then closes with the body unread (`close`) or holds the connection without reading on.
/// Returns the client's response, the upstream and the proxy.
async fn upload_answered_early(
    response: &'static [u8],
    close: bool,
) -> (Message, Upstream, SocketAddr) {
    let upstream = upstream(move |mut conn| async move {
        if conn.wire.read_head().await.is_some() {
            conn.send(response).await;
            if !close {
                tokio::time::sleep(WAIT * 2).await;
            }
        }
    })
    .await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    let (mut client, sending) = start_upload(proxy, 64 << 20).await;
    let response = client.read_response("POST").await;
    sending.abort();
    (response, upstream, proxy)
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_reaches_the_client_when_the_server_closes() {
    let (response, _, _) = upload_answered_early(
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
        true,
    )
    .await;
    assert_eq!(response.head.status(), 413, "{:?}", response.head.start);
    assert_eq!(response.text(), "too large");
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_does_not_wait_for_a_server_that_stopped_reading() {
    let (response, upstream, proxy) = upload_answered_early(
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nlog in",
        false,
    )
    .await;
    assert_eq!(response.head.status(), 401, "{:?}", response.head.start);
    assert_eq!(response.text(), "log in");
    // That connection still expects the rest of the body: it is not reused.
    let mut next = Wire::connect(proxy).await;
    assert_eq!(next.exchange(&get("/next")).await.head.status(), 401);
    assert_eq!(upstream.accepts(), 2);
}

#[tokio::test]
async fn an_early_success_answer_still_gets_the_whole_body() {
    // A server that starts its answer at once and finishes it after reading the whole body.
    let upstream = upstream(|mut conn| async move {
        let Some(head) = conn.wire.read_head().await else {
            return;
        };
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let request = conn.wire.body(head, false).await;
        let count = request.body.len().to_string();
        conn.send(&chunk(count.as_bytes())).await;
    })
    .await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    let (mut client, _sending) = start_upload(proxy, 8 << 20).await;
    let response = client.read_response("POST").await;
    assert_eq!(response.head.status(), 200, "{:?}", response.head.start);
    assert_eq!(response.text(), (8 << 20).to_string());
}

#[tokio::test]
async fn chunked_request_with_trailers_reaches_the_upstream_body_intact() {
    let upstream = replying(|_, request| ok(&request.text())).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(
            b"POST /t HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n",
        )
        .await;
    assert_eq!(response.text(), "abcde");
    assert_eq!(client.exchange(&get("/after")).await.text(), "");
    assert_eq!(upstream.accepts(), 1);
}

// ---------------------------------------------------------------------------------------------
// Pipelining, pooling and lost connections

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = upstream(|mut conn| async move {
        while let Some(request) = conn.next().await {
            let path = target_of(&request);
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            conn.send(&ok(&path)).await;
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let mut both = get("/slow");
    both.extend(get("/fast"));
    client.write(&both).await;
    assert_eq!(client.read_response("GET").await.text(), "/slow");
    assert_eq!(client.read_response("GET").await.text(), "/fast");
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn upstream_closing_an_idle_connection_is_not_a_502() {
    // Each upstream connection serves one response (without saying so) and closes.
    let upstream = upstream(|mut conn| async move {
        if conn.next().await.is_some() {
            conn.send(&ok(&format!("conn {}", conn.index))).await;
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    assert_eq!(client.exchange(&get("/1")).await.text(), "conn 0");
    // Idle long enough for the close to arrive before the next request.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = client.exchange(&get("/2")).await;
    assert_eq!(second.head.status(), 200, "{}", second.text());
    assert_eq!(second.text(), "conn 1");
    // And with no pause at all: the close races the next request.
    let third = client.exchange(&get("/3")).await;
    assert_eq!(third.head.status(), 200, "{}", third.text());
    assert_eq!(third.text(), "conn 2");
    assert_eq!(upstream.accepts(), 3);
}

#[tokio::test]
async fn upstream_connection_close_header_makes_the_next_request_dial_again() {
    let upstream = replying(|conn, _| {
        format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 6\r\n\r\nconn {conn}")
            .into_bytes()
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let first = client.exchange(&get("/1")).await;
    assert_eq!(first.text(), "conn 0");
    assert!(
        !first.head.has("connection"),
        "the upstream's Connection: close concerns only its hop"
    );
    // The upstream keeps its socket open: the proxy must not send a second request on it.
    assert_eq!(client.exchange(&get("/2")).await.text(), "conn 1");
    assert_eq!(upstream.conns(), [0, 1]);
}

#[tokio::test]
async fn upstream_garbage_is_a_502_and_the_proxy_keeps_serving() {
    let upstream = upstream(|mut conn| async move {
        if conn.next().await.is_none() {
            return;
        }
        match conn.index {
            0 => conn.send(b"garbage that is not HTTP\r\n\r\n").await,
            1 => {
                conn.send(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
            }
            2 => {
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
                    .await
            }
            _ => conn.send(&ok("healthy")).await,
        }
        // Stay open: the error must come from the bytes, not from a close.
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    let (proxy, proxy_state) = start_proxy(upstream.addr, Direction::Outbound).await;
    for attempt in 0..3 {
        let mut client = Wire::connect(proxy).await;
        let response = client.exchange(&get("/bad")).await;
        assert_eq!(response.head.status(), 502, "attempt {attempt}");
        assert!(
            response.text().contains(&upstream.addr.to_string()),
            "the 502 names the destination: {:?}",
            response.text()
        );
    }
    let mut client = Wire::connect(proxy).await;
    assert_eq!(client.exchange(&get("/good")).await.text(), "healthy");
    assert_eq!(
        metric(
            proxy_state,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"http1\",status_code=\"502\",tls=\"false\",client_id=\"\"}"
        ),
        Some(3)
    );
}

#[tokio::test]
async fn refused_destination_is_a_502_naming_it() {
    let target = closed_port().await;
    let (proxy, proxy_state) = start_proxy(target, Direction::Outbound).await;
    let mut client = Wire::connect(proxy).await;
    let response = client.exchange(&get("/x")).await;
    assert_eq!(response.head.start, "HTTP/1.1 502 Bad Gateway");
    assert!(
        response.text().contains(&target.to_string()),
        "the body names {target}: {:?}",
        response.text()
    );
    assert_eq!(
        response.head.get("content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(response.head.content_length(), Some(response.body.len()));
    // The client connection survives a 502 and the next request gets one too.
    assert_eq!(client.exchange(&get("/y")).await.head.status(), 502);
    assert_eq!(
        metric(
            proxy_state,
            "remora_proxy_connect_errors_total{direction=\"outbound\"}"
        ),
        Some(2)
    );
}

/// Clients such as `printf … | nc -N` shut down their write side once the request is sent.
/// Whether to answer them is a choice (nginx treats the FIN as an abort too, its 499); this
/// test states the friendlier behaviour.
#[tokio::test]
async fn client_half_close_after_its_request_still_gets_the_response() {
    let upstream = upstream(|mut conn| async move {
        while conn.next().await.is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            conn.send(&ok("half-closed")).await;
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    client.write(&get("/half")).await;
    client.stream.shutdown().await.unwrap();
    let response = client.read_response("GET").await;
    assert_eq!(response.head.status(), 200);
    assert_eq!(response.text(), "half-closed");
}

#[tokio::test]
async fn upstream_connections_are_pooled_across_client_connections() {
    let upstream = upstream(|mut conn| async move {
        while conn.next().await.is_some() {
            // Slow enough that two clients' requests overlap.
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.send(&ok("pooled")).await;
        }
    })
    .await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    // Two clients at once need two upstream connections...
    let mut first = Wire::connect(proxy).await;
    let mut second = Wire::connect(proxy).await;
    let close = b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n";
    first.write(close).await;
    second.write(close).await;
    for client in [&mut first, &mut second] {
        assert_eq!(client.read_response("GET").await.text(), "pooled");
        assert!(client.closes_within(WAIT).await);
    }
    assert_eq!(upstream.accepts(), 2);
    // ...and once they are gone, later clients reuse those instead of dialling.
    for _ in 0..3 {
        let mut client = Wire::connect(proxy).await;
        assert_eq!(client.exchange(close).await.text(), "pooled");
        assert!(client.closes_within(WAIT).await);
    }
    assert_eq!(upstream.accepts(), 2);
}

#[tokio::test]
async fn upstream_closing_a_pooled_connection_is_not_a_502() {
    // Each upstream connection serves one response (without saying so), then closes while it
    // sits in the pool.
    let upstream = upstream(|mut conn| async move {
        if conn.next().await.is_some() {
            conn.send(&ok(&format!("conn {}", conn.index))).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    let close = b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n";
    for expected in ["conn 0", "conn 1"] {
        let mut client = Wire::connect(proxy).await;
        let response = client.exchange(close).await;
        assert_eq!(response.head.status(), 200, "{}", response.text());
        assert_eq!(response.text(), expected);
        assert!(client.closes_within(WAIT).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(upstream.accepts(), 2);
}

// ---------------------------------------------------------------------------------------------
// Request targets and headers

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop_and_end_to_end_ones_pass() {
    let upstream = replying(|_, _| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-Bar: hidden\r\n\
          Keep-Alive: timeout=10\r\nX-Resp-OdD: Yes\r\nSet-Cookie: a=1\r\nConnection: x-bar\r\n\
          Proxy-Connection: keep-alive\r\nSet-Cookie: b=2\r\n\r\nok"
            .to_vec()
    })
    .await;
    let (mut client, proxy) = client_of(&upstream).await;
    let response = client
        .exchange(
            b"GET /h HTTP/1.1\r\nHost: example.test\r\nConnection: close, X-Foo\r\nX-Foo: secret\r\n\
              Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-OdD-CaSe: Mixed Value\r\n\
              X-Multi: one\r\nX-Multi: two\r\n\r\n",
        )
        .await;
    assert_eq!(response.text(), "ok");
    for hidden in ["x-bar", "keep-alive", "proxy-connection"] {
        assert!(
            !response.head.has(hidden),
            "{hidden} reached the client: {:?}",
            response.head.names()
        );
    }
    assert!(
        response
            .head
            .all("connection")
            .iter()
            .all(|value| value.eq_ignore_ascii_case("close")),
        "the upstream's Connection value reached the client: {:?}",
        response.head.all("connection")
    );
    assert_eq!(response.head.all("x-resp-odd"), ["Yes"]);
    assert_eq!(response.head.all("set-cookie"), ["a=1", "b=2"]);
    assert!(
        client.closes_within(WAIT).await,
        "the client's Connection: close closes its own connection"
    );

    let request = &upstream.seen()[0].request;
    for hidden in ["connection", "x-foo", "keep-alive", "proxy-connection"] {
        assert!(
            !request.head.has(hidden),
            "{hidden} reached the upstream: {:?}",
            request.head.names()
        );
    }
    assert!(
        !contains(&request.head.raw, b"secret"),
        "a header named by Connection reached the upstream"
    );
    assert_eq!(request.head.all("x-odd-case"), ["Mixed Value"]);
    assert_eq!(request.head.all("x-multi"), ["one", "two"]);
    assert_eq!(request.head.all("host"), ["example.test"]);

    // The client's close did not close the upstream connection: the next client reuses it.
    let mut next = Wire::connect(proxy).await;
    assert_eq!(next.exchange(&get("/again")).await.text(), "ok");
    assert_eq!(upstream.conns(), [0, 0]);
}

#[tokio::test]
async fn request_target_with_query_is_forwarded_byte_exact() {
    let upstream = replying(|_, _| ok("")).await;
    let (mut client, _) = client_of(&upstream).await;
    let target = "/p/a%2Fb;m=1/%7Euser?x=1&y=%20z&e=&flag&u=%C3%A9&s=a+b&q=%3F%26";
    client.exchange(&get(target)).await;
    assert_eq!(
        upstream.seen()[0].request.head.start,
        format!("GET {target} HTTP/1.1")
    );
}

/// Pins today's behaviour: an absolute-form target is forwarded as received.
#[tokio::test]
async fn absolute_form_request_target_is_forwarded_as_received() {
    let upstream = replying(|_, _| ok("abs")).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(
            b"GET http://example.test:8080/abs?q=1 HTTP/1.1\r\nHost: example.test:8080\r\n\r\n",
        )
        .await;
    assert_eq!(response.text(), "abs");
    let request = &upstream.seen()[0].request;
    assert_eq!(
        request.head.start,
        "GET http://example.test:8080/abs?q=1 HTTP/1.1"
    );
    assert_eq!(request.head.all("host"), ["example.test:8080"]);
}

#[tokio::test]
async fn obs_text_header_values_pass_byte_exact_both_ways() {
    let upstream = replying(|_, _| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Obs: r\xe9ponse \xff\r\n\r\n".to_vec()
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Obs: caf\xe9 \x80\xff\r\n\r\n")
        .await;
    let value = |head: &Head| {
        head.headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("x-obs"))
            .map(|(_, value)| value.clone())
    };
    assert_eq!(
        value(&response.head).as_deref(),
        Some(&b"r\xe9ponse \xff"[..])
    );
    assert_eq!(
        value(&upstream.seen()[0].request.head).as_deref(),
        Some(&b"caf\xe9 \x80\xff"[..])
    );
}

#[tokio::test]
async fn ninety_headers_pass_both_ways_in_order() {
    let mut response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n".to_vec();
    let mut request = b"GET /many HTTP/1.1\r\nHost: example.test\r\n".to_vec();
    for i in 0..90 {
        response.extend(format!("X-Resp-{i}: value {i}\r\n").into_bytes());
        request.extend(format!("X-Req-{i}: value {i}\r\n").into_bytes());
    }
    response.extend(b"\r\n");
    request.extend(b"\r\n");
    let upstream = replying(move |_, _| response.clone()).await;
    let (mut client, _) = client_of(&upstream).await;
    let answer = client.exchange(&request).await;
    let numbered = |head: &Head, prefix: &str| -> Vec<String> {
        head.headers
            .iter()
            .filter(|(name, _)| name.to_ascii_lowercase().starts_with(prefix))
            .map(|(name, value)| {
                format!(
                    "{}={}",
                    name.to_ascii_lowercase(),
                    String::from_utf8_lossy(value)
                )
            })
            .collect()
    };
    let expected = |prefix: &str| -> Vec<String> {
        (0..90).map(|i| format!("{prefix}{i}=value {i}")).collect()
    };
    assert_eq!(numbered(&answer.head, "x-resp-"), expected("x-resp-"));
    assert_eq!(
        numbered(&upstream.seen()[0].request.head, "x-req-"),
        expected("x-req-")
    );
}

#[tokio::test]
async fn a_response_of_100_fields_passes_and_one_of_101_is_a_502() {
    // 100 fields is the response head's limit (hyper's own for the client side).
    let head_of = |fields: usize| {
        let mut head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
        for i in 1..fields {
            head.extend(format!("X-F-{i}: {i}\r\n").into_bytes());
        }
        head.extend(b"\r\nok");
        head
    };
    let upstream =
        replying(move |_, request| head_of(target_of(request)[1..].parse().unwrap())).await;
    let (mut client, _) = client_of(&upstream).await;
    let full = client.exchange(&get("/100")).await;
    assert_eq!(full.head.status(), 200, "{:?}", full.head.start);
    assert_eq!(full.text(), "ok");
    assert_eq!(full.head.get("x-f-99").as_deref(), Some("99"));
    let over = client.exchange(&get("/101")).await;
    assert_eq!(over.head.status(), 502, "{:?}", over.head.start);
    assert!(
        over.text().contains("too many headers"),
        "the 502 says why: {:?}",
        over.text()
    );
}

#[tokio::test]
async fn a_32_kib_header_passes_both_ways() {
    let big = "v".repeat(32 * 1024);
    let response = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: {big}\r\n\r\n");
    let upstream = replying(move |_, _| response.clone().into_bytes()).await;
    let (mut client, _) = client_of(&upstream).await;
    let answer = client
        .exchange(
            format!("GET / HTTP/1.1\r\nHost: example.test\r\nCookie: {big}\r\n\r\n").as_bytes(),
        )
        .await;
    assert_eq!(answer.head.status(), 200);
    assert_eq!(answer.head.get("x-big").as_deref(), Some(big.as_str()));
    assert_eq!(
        upstream.seen()[0].request.head.get("cookie").as_deref(),
        Some(big.as_str())
    );
}

#[tokio::test]
async fn asterisk_form_options_is_forwarded_as_is() {
    let upstream = replying(|_, _| ok("")).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    assert_eq!(response.head.status(), 200);
    assert_eq!(upstream.seen()[0].request.head.start, "OPTIONS * HTTP/1.1");
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.0 on either side

#[tokio::test]
async fn http10_client_without_host_is_answered_and_its_connection_closed() {
    let upstream = replying(|_, _| ok("for 1.0")).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client.exchange(b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.head.status(), 200);
    assert_eq!(response.text(), "for 1.0");
    assert!(!response.head.is_chunked(), "no chunked coding to HTTP/1.0");
    assert!(
        client.closes_within(WAIT).await,
        "HTTP/1.0 without keep-alive closes after the response"
    );
    // Upstream it is an HTTP/1.1 request, which needs a Host: the destination's address.
    let request = &upstream.seen()[0].request;
    assert_eq!(request.head.start, "GET /old HTTP/1.1");
    assert_eq!(
        request.head.get("host"),
        Some(upstream.addr.to_string()),
        "HTTP/1.1 upstream needs a Host"
    );
}

#[tokio::test]
async fn http10_client_asking_keep_alive_keeps_its_connection() {
    let upstream = replying(|_, request| ok(&target_of(request))).await;
    let (mut client, _) = client_of(&upstream).await;
    for path in ["/a", "/b"] {
        let response = client
            .exchange(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .await;
        assert_eq!(response.text(), path);
        assert!(
            response
                .head
                .all("connection")
                .iter()
                .any(|value| value.eq_ignore_ascii_case("keep-alive")),
            "a kept HTTP/1.0 connection says so: {:?}",
            response.head.names()
        );
    }
    assert!(!client.closes_within(Duration::from_millis(100)).await);
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn http10_client_close_delimited_upstream_body_is_close_delimited_too() {
    let upstream = upstream(|mut conn| async move {
        if conn.next().await.is_some() {
            conn.send(b"HTTP/1.1 200 OK\r\n\r\nuntil close").await;
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client.exchange(b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(!response.head.is_chunked());
    assert_eq!(response.text(), "until close");
}

/// RFC 9110 §6.2: an intermediary sends its own HTTP version in the messages it forwards.
#[tokio::test]
async fn http10_upstream_response_reaches_an_http11_client_as_http11() {
    let upstream =
        replying(|_, _| b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold".to_vec()).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client.exchange(&get("/")).await;
    assert_eq!(response.text(), "old");
    assert_eq!(response.head.version(), "HTTP/1.1");
}

#[tokio::test]
async fn http10_upstream_without_keep_alive_is_not_reused() {
    // The upstream answers HTTP/1.0 without keep-alive but leaves its socket open.
    let upstream = upstream(|mut conn| async move {
        while conn.next().await.is_some() {
            conn.send(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nconn {}",
                    conn.index
                )
                .as_bytes(),
            )
            .await;
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let first = client.exchange(&get("/1")).await;
    assert_eq!(first.head.status(), 200);
    assert_eq!(first.text(), "conn 0");
    assert_eq!(client.exchange(&get("/2")).await.text(), "conn 1");
    assert_eq!(upstream.conns(), [0, 1]);
    assert!(
        !client.closes_within(Duration::from_millis(100)).await,
        "the HTTP/1.1 client connection stays open"
    );
}

// ---------------------------------------------------------------------------------------------
// Large and broken bodies

#[tokio::test]
async fn four_mebibyte_content_length_response_is_byte_exact() {
    let upstream = replying(|_, _| {
        let body = pattern(4 << 20);
        let mut bytes =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend(body);
        bytes
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client.exchange(&get("/big")).await;
    assert_eq!(response.head.content_length(), Some(4 << 20));
    assert!(response.body == pattern(4 << 20), "the body differs");
    assert_eq!(client.exchange(&get("/big")).await.body.len(), 4 << 20);
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn four_mebibyte_chunked_response_is_byte_exact() {
    let upstream = replying(|_, _| {
        let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        bytes.extend(chunk(&pattern(4 << 20)));
        bytes
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client.exchange(&get("/big")).await;
    assert!(response.body == pattern(4 << 20), "the body differs");
    assert_eq!(client.exchange(&get("/big")).await.body.len(), 4 << 20);
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn client_leaving_mid_response_does_not_leak_the_half_read_upstream_connection() {
    let abandoned = Arc::new(AtomicUsize::new(0));
    let seen_abandoned = abandoned.clone();
    let upstream = upstream(move |mut conn| {
        let abandoned = abandoned.clone();
        async move {
            while let Some(request) = conn.next().await {
                if target_of(&request) == "/huge" {
                    let body = pattern(16 << 20);
                    let mut bytes =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .into_bytes();
                    bytes.extend(body);
                    // The write fails once the proxy closes this connection.
                    if let Ok(Err(_)) =
                        tokio::time::timeout(WAIT, conn.wire.stream.write_all(&bytes)).await
                    {
                        abandoned.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                } else {
                    conn.send(&ok(&format!("complete from conn {}", conn.index)))
                        .await;
                }
            }
        }
    })
    .await;
    let (mut client, proxy) = client_of(&upstream).await;
    client.write(&get("/huge")).await;
    let head = client.read_head().await.expect("a response head");
    assert_eq!(head.content_length(), Some(16 << 20));
    client.take(256 * 1024).await;
    drop(client);
    // Let the proxy notice the client is gone.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut next = Wire::connect(proxy).await;
    let response = next.exchange(&get("/small")).await;
    assert_eq!(response.head.status(), 200);
    assert_eq!(response.text(), "complete from conn 1");
    assert_eq!(upstream.conns(), [0, 1]);
    assert_eq!(
        seen_abandoned.load(Ordering::SeqCst),
        1,
        "the proxy closed the upstream connection it could not finish reading"
    );
}

#[tokio::test]
async fn bytes_after_a_content_length_body_never_reach_a_later_request() {
    let upstream = upstream(|mut conn| async move {
        while conn.next().await.is_some() {
            if conn.index == 0 {
                // A broken server: five body bytes, then what looks like a second response.
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk")
                    .await;
            } else {
                conn.send(&ok("fresh")).await;
            }
        }
    })
    .await;
    let (mut client, proxy) = client_of(&upstream).await;
    let first = client.exchange(&get("/1")).await;
    assert_eq!(first.text(), "hello");
    assert!(
        !client.closes_within(Duration::from_millis(100)).await,
        "nothing past Content-Length reaches the client"
    );
    let second = client.exchange(&get("/2")).await;
    assert_eq!(second.head.status(), 200);
    assert_eq!(second.text(), "fresh");
    // Without waiting: another client right after a junk-ending response.
    let mut other = Wire::connect(proxy).await;
    let third = other.exchange(&get("/3")).await;
    assert_eq!(third.text(), "fresh");
    assert_eq!(upstream.conns()[0], 0);
    assert!(upstream.conns()[1..].iter().all(|&conn| conn > 0));
}

#[tokio::test]
async fn slow_upstream_headers_and_body_are_waited_for() {
    let upstream = upstream(|mut conn| async move {
        while conn.next().await.is_some() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nslow")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.send(b" body").await;
        }
    })
    .await;
    for direction in [Direction::Outbound, Direction::Inbound] {
        let (proxy, _) = start_proxy(upstream.addr, direction).await;
        let mut client = Wire::connect(proxy).await;
        let response = client.exchange(&get("/slow")).await;
        assert_eq!(response.head.status(), 200, "{direction:?}");
        assert_eq!(response.text(), "slow body");
    }
}

/// Sends a GET to an upstream that answers `response` and closes mid-body; the head the client
/// got and every byte after it. The head has gone out before the cut is seen, so the client
/// gets a 200 whose body ends early, never a completed one.
async fn cut_short(response: &'static [u8]) -> (Head, Vec<u8>) {
    let upstream = upstream(move |mut conn| async move {
        if conn.next().await.is_some() {
            conn.send(response).await;
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    client.write(&get("/cut")).await;
    let head = client.read_head().await.expect("a response head");
    assert_eq!(head.status(), 200);
    let received = client.read_to_end().await;
    (head, received)
}

#[tokio::test]
async fn truncated_content_length_body_is_not_passed_off_as_complete() {
    let (head, received) =
        cut_short(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..").await;
    assert_eq!(head.content_length(), Some(100), "{:?}", head.names());
    assert_eq!(
        received, b"only ten..",
        "the client sees the body cut short"
    );
}

#[tokio::test]
async fn truncated_chunked_body_is_not_passed_off_as_complete() {
    let (head, received) =
        cut_short(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\nonly f").await;
    assert!(head.is_chunked());
    assert!(
        !received.ends_with(b"0\r\n\r\n"),
        "a cut chunked body must not end with the last chunk: {:?}",
        String::from_utf8_lossy(&received)
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed and ambiguous messages

#[tokio::test]
async fn conflicting_content_lengths_are_rejected_before_the_upstream() {
    let upstream = replying(|_, _| ok("should not happen")).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde")
        .await;
    assert_eq!(response.head.status(), 400);
    assert!(client.closes_within(WAIT).await);
    assert_eq!(upstream.accepts(), 0, "nothing reached the upstream");
}

/// Pins today's behaviour: chunked wins over Content-Length (RFC 9112 §6.3), only the chunked
/// framing goes on, and the client connection is closed after the response, since such a
/// request may be a smuggling attempt.
#[tokio::test]
async fn chunked_with_content_length_request_goes_on_chunked_and_closes_the_client() {
    let upstream = replying(|_, request| ok(&request.text())).await;
    let (mut client, _) = client_of(&upstream).await;
    let response = client
        .exchange(
            b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 4\r\n\
              Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
    assert_eq!(response.head.status(), 200);
    assert_eq!(response.text(), "abc");
    let request = &upstream.seen()[0].request;
    assert!(request.head.is_chunked());
    assert!(
        !request.head.has("content-length"),
        "both framings reached the upstream: {:?}",
        request.head.names()
    );
    assert_eq!(request.body, b"abc");
    assert!(client.closes_within(WAIT).await);
}

/// RFC 9112 §6.3: an intermediary that forwards a message with both framings must drop the
/// Content-Length first (or refuse it: a 502 is fine too).
#[tokio::test]
async fn chunked_with_content_length_response_is_read_as_chunked() {
    let upstream = replying(|_, request| {
        if target_of(request) == "/both" {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n"
                .to_vec()
        } else {
            ok("next")
        }
    })
    .await;
    let (mut client, proxy) = client_of(&upstream).await;
    let response = client.exchange(&get("/both")).await;
    if response.head.status() != 502 {
        assert_eq!(response.head.status(), 200);
        assert_eq!(response.text(), "abc");
        assert!(
            response.head.is_chunked() != response.head.has("content-length"),
            "both framings reached the client: {:?}",
            response.head.names()
        );
    }
    let mut next = Wire::connect(proxy).await;
    assert_eq!(next.exchange(&get("/next")).await.text(), "next");
}

#[tokio::test]
async fn malformed_requests_get_400_and_never_reach_the_upstream() {
    let upstream = replying(|_, _| ok("should not happen")).await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost example.test\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Bad\x00: v\r\n\r\n",
    ] {
        let mut client = Wire::connect(proxy).await;
        let response = client.exchange(bad).await;
        assert_eq!(
            response.head.status(),
            400,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(client.closes_within(WAIT).await);
    }
    assert_eq!(upstream.accepts(), 0, "nothing reached the upstream");
}

// ---------------------------------------------------------------------------------------------
// Upgrades

#[tokio::test]
async fn upgrade_becomes_a_byte_tunnel_both_ways() {
    let upstream = upstream(|mut conn| async move {
        let Some(_request) = conn.next().await else {
            return;
        };
        conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nfrom upstream")
            .await;
        let echoed = conn.wire.take(11).await;
        conn.send(&echoed).await;
        // Half-close: the client's end of stream arrives, then the upstream still answers.
        assert!(conn.wire.read_to_end().await.is_empty());
        conn.send(b" bye").await;
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    client
        .write(b"GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await;
    let head = client.read_head().await.expect("a response head");
    assert_eq!(head.status(), 101);
    assert_eq!(head.get("upgrade").as_deref(), Some("websocket"));
    let request = &upstream.seen()[0].request;
    assert_eq!(request.head.get("upgrade").as_deref(), Some("websocket"));
    assert!(
        request.head.has("connection"),
        "an upgrade keeps Connection"
    );
    assert_eq!(client.take(13).await, b"from upstream");
    client.write(b"from client").await;
    assert_eq!(client.take(11).await, b"from client");
    client.stream.shutdown().await.unwrap();
    assert_eq!(client.read_to_end().await, b" bye");
}

#[tokio::test]
async fn connect_becomes_a_byte_tunnel() {
    let upstream = upstream(|mut conn| async move {
        let Some(_request) = conn.next().await else {
            return;
        };
        conn.send(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await;
        let hello = conn.wire.take(5).await;
        conn.send(&hello).await;
        conn.send(b" back").await;
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    client
        .write(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
        .await;
    let head = client.read_head().await.expect("a response head");
    assert_eq!(head.status(), 200);
    client.write(b"hello").await;
    assert_eq!(client.take(10).await, b"hello back");
    let request = &upstream.seen()[0].request;
    assert_eq!(request.head.start, "CONNECT example.test:443 HTTP/1.1");
    assert_eq!(request.head.version(), "HTTP/1.1");
}

#[tokio::test]
async fn refused_upgrade_leaves_an_ordinary_http_connection() {
    let upstream =
        replying(|conn, request| ok(&format!("no upgrade for {} on {conn}", target_of(request))))
            .await;
    let (mut client, _) = client_of(&upstream).await;
    let refused = client
        .exchange(
            b"GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\n\r\n",
        )
        .await;
    assert_eq!(refused.head.status(), 200);
    assert_eq!(refused.text(), "no upgrade for /ws on 0");
    let next = client.exchange(&get("/next")).await;
    assert_eq!(next.head.status(), 200);
    assert!(next.text().starts_with("no upgrade for /next on "));
}

// ---------------------------------------------------------------------------------------------
// Metrics and drain

#[tokio::test]
async fn requests_are_counted_by_direction_protocol_and_status() {
    let upstream = replying(|_, request| {
        if target_of(request) == "/missing" {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            ok("counted")
        }
    })
    .await;
    for direction in [Direction::Outbound, Direction::Inbound] {
        let (proxy, proxy_state) = start_proxy(upstream.addr, direction).await;
        let mut client = Wire::connect(proxy).await;
        for path in ["/a", "/b", "/c", "/missing"] {
            client.exchange(&get(path)).await;
        }
        let name = direction.as_str();
        let requests = |code: u16| {
            metric(
                proxy_state,
                &format!("remora_proxy_requests_total{{direction=\"{name}\",protocol=\"http1\",status_code=\"{code}\",tls=\"false\",client_id=\"\"}}"),
            )
        };
        assert_eq!(requests(200), Some(3), "{name}");
        assert_eq!(requests(404), Some(1), "{name}");
        assert_eq!(
            metric(
                proxy_state,
                &format!("remora_proxy_request_duration_seconds_count{{direction=\"{name}\"}}")
            ),
            Some(4)
        );
        let rx = metric(
            proxy_state,
            &format!("remora_proxy_tcp_bytes_total{{direction=\"{name}\",flow=\"rx\"}}"),
        );
        let request_bytes = ["/a", "/b", "/c", "/missing"]
            .iter()
            .map(|path| get(path).len() as u64)
            .sum::<u64>();
        assert_eq!(
            rx,
            Some(request_bytes),
            "{name}: bytes read from the client"
        );
        let tx = metric(
            proxy_state,
            &format!("remora_proxy_tcp_bytes_total{{direction=\"{name}\",flow=\"tx\"}}"),
        );
        assert!(
            tx.is_some_and(|tx| tx > 4 * 17),
            "{name}: bytes written: {tx:?}"
        );
    }
}

#[tokio::test]
async fn drain_finishes_the_request_in_flight_then_closes() {
    let upstream = upstream(|mut conn| async move {
        while conn.next().await.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.send(&ok("finished")).await;
        }
    })
    .await;
    let (proxy, proxy_state) = start_proxy(upstream.addr, Direction::Outbound).await;
    let mut busy = Wire::connect(proxy).await;
    let mut idle = Wire::connect(proxy).await;
    assert_eq!(idle.exchange(&get("/warm")).await.text(), "finished");
    busy.write(&get("/slow")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy_state.drain.start();
    assert!(
        idle.closes_within(WAIT).await,
        "an idle connection closes once the drain starts"
    );
    let response = busy.read_response("GET").await;
    assert_eq!(response.head.status(), 200);
    assert_eq!(response.text(), "finished");
    assert!(
        busy.closes_within(WAIT).await,
        "a busy connection closes after its response"
    );
}

// ---------------------------------------------------------------------------------------------
// Framing: the head the proxy writes frames exactly the bytes it sends after it

/// 35 bytes that an upstream reading past the end of a request would take for a request of its
/// own, one the proxy never saw, logged or counted.
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

#[tokio::test]
async fn a_framing_header_listed_in_connection_cannot_smuggle_a_request() {
    let upstream = replying(|_, request| ok(&target_of(request))).await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Inbound).await;
    for (connection, framing, body) in [
        (
            "content-length",
            format!("Content-Length: {}", SMUGGLED.len()),
            SMUGGLED.to_vec(),
        ),
        (
            "Transfer-Encoding",
            "Transfer-Encoding: chunked".to_string(),
            chunk(SMUGGLED),
        ),
        (
            "keep-alive, Content-Length",
            format!("Content-Length: {}", SMUGGLED.len()),
            SMUGGLED.to_vec(),
        ),
    ] {
        let mut client = Wire::connect(proxy).await;
        let mut request = format!(
            "POST /front HTTP/1.1\r\nHost: example.test\r\nConnection: {connection}\r\n{framing}\r\n\r\n"
        )
        .into_bytes();
        request.extend(&body);
        assert_eq!(
            client.exchange(&request).await.text(),
            "/front",
            "{connection}"
        );
        assert_eq!(client.exchange(&get("/after")).await.text(), "/after");
    }
    let seen = upstream.seen();
    let targets: Vec<String> = seen.iter().map(|seen| target_of(&seen.request)).collect();
    assert_eq!(
        targets,
        ["/front", "/after"].repeat(3),
        "the upstream read another request"
    );
    for seen in seen
        .iter()
        .filter(|seen| target_of(&seen.request) == "/front")
    {
        assert_eq!(
            seen.request.body,
            SMUGGLED,
            "{:?}",
            seen.request.head.names()
        );
    }
}

#[tokio::test]
async fn a_request_body_goes_out_in_the_framing_hyper_decoded_it_in() {
    // Whatever framing headers the client sent, the upstream gets exactly one framing, a single
    // value, and the body hyper decoded; other transfer codings are kept.
    let upstream = replying(|_, request| ok(&request.text())).await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    let cases: [(&[u8], &str); 4] = [
        (
            b"Content-Length: 035\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            "content-length: 35",
        ),
        (
            b"Transfer-Encoding: gzip, chunked\r\nConnection: transfer-encoding\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
            "transfer-encoding: gzip, chunked",
        ),
        (
            b"Connection: content-length\r\nContent-Length: 5\r\n\r\nhello",
            "content-length: 5",
        ),
        (b"Content-Length: 0\r\n\r\n", "content-length: 0"),
    ];
    for (i, (rest, framing)) in cases.iter().enumerate() {
        let mut client = Wire::connect(proxy).await;
        let mut request = format!("POST /{i} HTTP/1.1\r\nHost: example.test\r\n").into_bytes();
        request.extend(*rest);
        let response = client.exchange(&request).await;
        assert_eq!(response.head.status(), 200, "{framing}");
        let seen = upstream.seen();
        let head = &seen.last().unwrap().request.head;
        let (name, value) = framing.split_once(": ").unwrap();
        assert_eq!(
            head.all(name),
            [value],
            "{:?}",
            String::from_utf8_lossy(&head.raw)
        );
        assert!(
            !(head.has("content-length") && head.has("transfer-encoding")),
            "{:?}",
            head.names()
        );
    }
    assert_eq!(upstream.seen().len(), cases.len(), "no request more");
    // Chunked applied twice, or before another coding: servers read such a body differently
    // (hyper decodes one layer), so it goes nowhere.
    for framing in [
        "Transfer-Encoding: chunked, chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked, gzip, chunked",
    ] {
        let mut client = Wire::connect(proxy).await;
        let request = format!(
            "POST /twice HTTP/1.1\r\nHost: example.test\r\n{framing}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let response = client.exchange(request.as_bytes()).await;
        assert_eq!(response.head.status(), 400, "{framing}");
    }
    assert_eq!(upstream.seen().len(), cases.len(), "a request went on");
}

#[tokio::test]
async fn a_content_length_list_reaches_the_client_as_one_value() {
    let upstream = replying(|_, request| match target_of(request).as_str() {
        "/list" => b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec(),
        "/lines" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello".to_vec()
        }
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello".to_vec(),
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    for path in ["/list", "/lines", "/list"] {
        let response = client.exchange(&get(path)).await;
        assert_eq!(response.head.all("content-length"), ["5"], "{path}");
        assert_eq!(response.text(), "hello");
    }
    let conflicting = client.exchange(&get("/conflicting")).await;
    assert_eq!(
        conflicting.head.status(),
        502,
        "{:?}",
        conflicting.head.start
    );
}

#[tokio::test]
async fn a_head_response_with_both_framings_reaches_the_client_as_a_head() {
    let upstream = replying(|_, request| {
        if request.head.start.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        } else {
            ok("next")
        }
    })
    .await;
    let (mut client, _) = client_of(&upstream).await;
    for _ in 0..2 {
        client
            .write(b"HEAD /both HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .await;
        let Some(head) = client.read_head().await else {
            panic!("the client got nothing at all");
        };
        assert_eq!(head.status(), 200);
        assert!(
            !(head.has("content-length") && head.has("transfer-encoding")),
            "both framings reached the client: {:?}",
            head.names()
        );
        assert_eq!(client.exchange(&get("/next")).await.text(), "next");
    }
}

/// A refused upgrade's response is read by hyper's client, which keeps the framing headers as
/// they came: the client still gets one framing, and a body cut short shows as cut, not as
/// nothing at all.
#[tokio::test]
async fn a_refused_upgrade_reaches_the_client_with_one_framing_even_cut_short() {
    let upstream = upstream(|mut conn| async move {
        let Some(request) = conn.next().await else {
            return;
        };
        let response: &[u8] = match target_of(&request).as_str() {
            "/both" => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                         5\r\nhello\r\n0\r\n\r\n"
            }
            "/list" => b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
            _ => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        };
        conn.send(response).await;
    })
    .await;
    let (proxy, _) = start_proxy(upstream.addr, Direction::Outbound).await;
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n\
             Connection: upgrade\r\n\r\n"
        )
    };
    for path in ["/both", "/list"] {
        let mut client = Wire::connect(proxy).await;
        let response = client.exchange(upgrade(path).as_bytes()).await;
        assert_eq!(response.head.status(), 200, "{path}");
        assert_eq!(response.text(), "hello", "{path}");
        assert!(
            response.head.is_chunked() != response.head.has("content-length"),
            "{path}: {:?}",
            String::from_utf8_lossy(&response.head.raw)
        );
        assert!(response.head.all("content-length").len() <= 1, "{path}");
    }
    let mut client = Wire::connect(proxy).await;
    client.write(upgrade("/cut").as_bytes()).await;
    let Some(head) = client.read_head().await else {
        panic!("a response cut short reached the client as nothing at all");
    };
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn connect_answered_200_with_a_length_opens_the_tunnel() {
    for framing in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
        let upstream = upstream(move |mut conn| async move {
            if conn.next().await.is_none() {
                return;
            }
            let head = format!("HTTP/1.1 200 Connection Established\r\n{framing}\r\n\r\n");
            conn.send(head.as_bytes()).await;
            let hello = conn.wire.take(5).await;
            conn.send(&hello).await;
        })
        .await;
        let (proxy, _) = start_proxy(upstream.addr, Direction::Inbound).await;
        let mut client = Wire::connect(proxy).await;
        client
            .write(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
            .await;
        let Some(head) = client.read_head().await else {
            panic!("{framing}: the client got nothing at all");
        };
        assert_eq!(head.status(), 200, "{framing}");
        assert!(
            !head.has("content-length") && !head.has("transfer-encoding"),
            "a 2xx to CONNECT has no body: {:?}",
            head.names()
        );
        client.write(b"hello").await;
        assert_eq!(client.take(5).await, b"hello", "{framing}");
    }
}

#[tokio::test]
async fn an_invalid_chunk_size_is_the_clients_error_and_no_body_goes_on() {
    let (received, mut upstream_got) = tokio::sync::mpsc::unbounded_channel();
    let upstream = upstream(move |mut conn| {
        let received = received.clone();
        async move {
            let bytes = conn.wire.read_to_end().await;
            let _ = received.send(bytes);
        }
    })
    .await;
    let (proxy, proxy_state) = start_proxy(upstream.addr, Direction::Inbound).await;
    let mut client = Wire::connect(proxy).await;
    // 18 hex digits: more than 64 bits.
    let response = client
        .exchange(
            b"POST /bad HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n\
              fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        )
        .await;
    assert_eq!(response.head.status(), 400, "{:?}", response.head.start);
    assert!(client.closes_within(WAIT).await);
    let status = |code: u16| {
        metric(
            proxy_state,
            &format!("remora_proxy_requests_total{{direction=\"inbound\",protocol=\"http1\",status_code=\"{code}\",tls=\"false\",client_id=\"\"}}"),
        )
    };
    assert_eq!(status(400), Some(1));
    assert_eq!(status(502), None, "counted as an upstream failure");
    // The body came with the head, so its first frame is read before the head goes out: the
    // upstream, dialed already, gets nothing at all.
    if upstream.accepts() > 0 {
        let got = within("the upstream connection closing", upstream_got.recv())
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got), "");
    }
}

/// An upstream that reads a request head, answers `413` at once, and reports how many body bytes
/// came after the head before the proxy closed the connection.
async fn refusing_upload() -> (Upstream, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    let (counted, count) = tokio::sync::mpsc::unbounded_channel();
    let upstream = upstream(move |mut conn| {
        let counted = counted.clone();
        async move {
            let Some(head) = conn.wire.read_head().await else {
                return;
            };
            conn.seen.lock().unwrap().push(Seen {
                conn: conn.index,
                request: Message {
                    head,
                    body: Vec::new(),
                    trailers: Vec::new(),
                },
            });
            conn.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n\r\ntoo large")
                .await;
            let _ = counted.send(conn.wire.read_to_end().await.len());
        }
    })
    .await;
    (upstream, count)
}

#[tokio::test]
async fn expect_continue_goes_to_the_origin_which_refuses_before_any_body_byte() {
    let (upstream, mut body_bytes) = refusing_upload().await;
    let (mut client, _) = client_of(&upstream).await;
    client
        .write(
            b"POST /upload HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\n\
              Content-Length: 1048576\r\n\r\n",
        )
        .await;
    // As curl does: wait a second for 100 Continue or a final answer before sending the body.
    let first = tokio::time::timeout(Duration::from_secs(1), client.read_response("POST"))
        .await
        .expect("an answer within a second");
    assert_eq!(
        first.head.status(),
        413,
        "the proxy answered {:?}",
        first.head.start
    );
    assert_eq!(first.text(), "too large");
    assert!(
        client.closes_within(WAIT).await,
        "a client that did not send the body it announced cannot send another request"
    );
    let request = &upstream.seen()[0].request;
    assert_eq!(request.head.get("expect").as_deref(), Some("100-continue"));
    let sent = within("the upstream connection closing", body_bytes.recv()).await;
    assert_eq!(
        sent,
        Some(0),
        "body bytes sent to an origin that refused them"
    );
}

// ---------------------------------------------------------------------------------------------
// Mutation test: no mutated request or response makes the proxy send a byte past the end of the
// message it framed, or frame a message two ways

/// xorshift64 (Marsaglia): a fixed seed makes every run mutate the same inputs, so a failure
/// names an input that fails again.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Header lines that decide how a message is framed or which hop a header concerns.
const FRAMING_LINES: &[&str] = &[
    "Connection: content-length",
    "Connection: Transfer-Encoding",
    "Connection: keep-alive, Content-Length",
    "Connection: close",
    "Connection: expect",
    "Connection: upgrade",
    "Connection: keep-alive",
    "Content-Length: 0",
    "Content-Length: 5",
    "Content-Length: 35",
    "Content-Length: 5, 5",
    "Content-Length: 35, 35",
    "Content-Length: 035",
    "Content-Length: 99",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: Chunked",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, chunked",
    "Transfer-Encoding: chunked, gzip",
    "Transfer-Encoding: identity",
    "Transfer-Encoding: gzip",
    "Expect: 100-continue",
    "Expect: 100-Continue",
    "Upgrade: h2c",
    "Keep-Alive: timeout=5",
    "Proxy-Connection: keep-alive",
    "TE: trailers",
    "Trailer: X-Sum",
];

const FRAMING_NAMES: &[&str] = &[
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Expect",
    "Upgrade",
];

/// One to three mutations of a message's header lines (never its start line) and body: framing
/// lines added, lines duplicated, dropped, renamed, re-valued, re-cased, padded with
/// whitespace, the body cut short.
fn mutate(rng: &mut XorShift, message: &[u8]) -> Vec<u8> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a seed has a head");
    let head = String::from_utf8(message[..end].to_vec()).expect("an ASCII seed");
    let mut lines: Vec<String> = head.split("\r\n").map(str::to_string).collect();
    let mut body = message[end + 4..].to_vec();
    for _ in 0..1 + rng.below(3) {
        // Index of a header line, if there is one.
        let line = 1 + rng.below(lines.len().max(2) - 1);
        let have = line < lines.len();
        match rng.below(8) {
            0 => {
                let at = 1 + rng.below(lines.len());
                lines.insert(at, rng.pick(FRAMING_LINES).to_string());
            }
            1 if have => lines.insert(line, lines[line].clone()),
            2 if have => {
                lines.remove(line);
            }
            3 if have => {
                let (name, value) = lines[line].split_once(':').unwrap_or((&lines[line], ""));
                let name = match rng.below(3) {
                    0 => name.to_ascii_uppercase(),
                    1 => name.to_ascii_lowercase(),
                    _ => name
                        .chars()
                        .enumerate()
                        .map(|(i, c)| {
                            if i % 2 == 0 {
                                c.to_ascii_uppercase()
                            } else {
                                c.to_ascii_lowercase()
                            }
                        })
                        .collect(),
                };
                let value = if rng.below(2) == 0 {
                    value.to_ascii_uppercase()
                } else {
                    value.to_string()
                };
                lines[line] = format!("{name}:{value}");
            }
            4 if have => {
                let pad = *["\t", " ", "  ", " \t"].get(rng.below(4)).unwrap_or(&" ");
                lines[line] = match lines[line].split_once(':') {
                    Some((name, value)) if rng.below(2) == 0 => format!("{name}:{pad}{value}"),
                    _ => format!("{}{pad}", lines[line]),
                };
            }
            5 if have => {
                let value = rng
                    .pick(FRAMING_LINES)
                    .split_once(": ")
                    .map_or("", |(_, v)| v);
                let name = lines[line]
                    .split_once(':')
                    .map_or(lines[line].clone(), |(n, _)| n.to_string());
                lines[line] = format!("{name}: {value}");
            }
            6 if !body.is_empty() => {
                let cut = 1 + rng.below(body.len());
                body.truncate(body.len() - cut);
            }
            7 if have => {
                let value = lines[line]
                    .split_once(':')
                    .map_or(String::new(), |(_, v)| v.to_string());
                lines[line] = format!("{}:{value}", rng.pick(FRAMING_NAMES));
            }
            _ => {
                let at = 1 + rng.below(lines.len());
                lines.insert(at, rng.pick(FRAMING_LINES).to_string());
            }
        }
    }
    let mut out = lines.join("\r\n").into_bytes();
    out.extend(b"\r\n\r\n");
    out.extend(body);
    out
}

/// A header section read the way a strict HTTP/1.1 recipient reads it, refusing what another
/// recipient could read differently.
#[derive(Debug, Default)]
struct StrictHead {
    start: String,
    length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
}

fn strict_head(raw: &[u8]) -> Result<StrictHead, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "a head that is not ASCII".to_string())?;
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let mut head = StrictHead {
        start: lines.next().unwrap_or_default().to_string(),
        ..StrictHead::default()
    };
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("a line without a colon: {line:?}"))?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(format!("a field name with whitespace: {line:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            lengths.push(value.to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(value.split(',').map(|c| c.trim().to_ascii_lowercase()));
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    if !codings.is_empty() && !lengths.is_empty() {
        return Err("both Transfer-Encoding and Content-Length".into());
    }
    if !codings.is_empty() {
        let chunked = codings.iter().filter(|c| *c == "chunked").count();
        if chunked != 1 || codings.last().map(String::as_str) != Some("chunked") {
            return Err(format!(
                "Transfer-Encoding {codings:?}: chunked not once and last"
            ));
        }
        head.chunked = true;
    }
    match lengths.as_slice() {
        [] => {}
        [one] if !one.is_empty() && one.bytes().all(|b| b.is_ascii_digit()) => {
            head.length = Some(one.parse().map_err(|_| format!("Content-Length {one:?}"))?);
        }
        more => return Err(format!("Content-Length {more:?}: not one number")),
    }
    Ok(head)
}

/// Reads from `wire` until its buffer holds `n` bytes; false if the stream ended first.
async fn fill_to(wire: &mut Wire, n: usize) -> bool {
    while wire.buf.len() < n {
        if wire.fill().await == 0 {
            return false;
        }
    }
    true
}

/// Reads a strict chunked body; false if the stream ended inside it. Trailers are skipped.
async fn strict_chunked(wire: &mut Wire) -> Result<bool, String> {
    loop {
        let line = loop {
            if let Some(end) = wire.buf.windows(2).position(|w| w == b"\r\n") {
                break wire.buf.drain(..end + 2).take(end).collect::<Vec<u8>>();
            }
            if wire.fill().await == 0 {
                return Ok(false);
            }
        };
        let line = String::from_utf8_lossy(&line).into_owned();
        let digits = line.split(';').next().unwrap_or_default();
        let size =
            usize::from_str_radix(digits, 16).map_err(|_| format!("a chunk-size line {line:?}"))?;
        if size == 0 {
            // Trailers up to the empty line.
            loop {
                if let Some(end) = wire.buf.windows(2).position(|w| w == b"\r\n") {
                    let field: Vec<u8> = wire.buf.drain(..end + 2).collect();
                    if end == 0 {
                        return Ok(true);
                    }
                    let _ = field;
                } else if wire.fill().await == 0 {
                    return Ok(false);
                }
            }
        }
        if !fill_to(wire, size + 2).await {
            return Ok(false);
        }
        if &wire.buf[size..size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        wire.buf.drain(..size + 2);
    }
}

/// Reads a head up to its blank line; None if the stream ended first.
async fn raw_head(wire: &mut Wire) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = wire.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(wire.buf.drain(..end + 4).collect());
        }
        if wire.fill().await == 0 {
            return None;
        }
    }
}

/// The app behind the proxy: reads one request strictly (sending `100 Continue` first when it
/// was asked for, as a server should), answers with `Connection: close`, and fails if the
/// framing was ambiguous or anything came after the request's end.
async fn strict_app(mut wire: Wire) -> Result<(), String> {
    let Some(raw) = raw_head(&mut wire).await else {
        return Ok(());
    };
    let start = raw.split(|&b| b == b'\r').next().unwrap_or_default();
    let start = String::from_utf8_lossy(start).into_owned();
    strict_request(wire, &raw)
        .await
        .map_err(|error| format!("{start:?}: {error}"))
}

async fn strict_request(mut wire: Wire, raw: &[u8]) -> Result<(), String> {
    let head = strict_head(raw)?;
    let has_body = head.chunked || head.length.unwrap_or(0) > 0;
    if head.expect_continue && has_body && head.start.contains("/refuse") {
        // Refused at once: the body must never come (RFC 9110 §10.1.1).
        let _ = wire
            .stream
            .write_all(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return nothing_after(&mut wire, "a refusal of the body").await;
    }
    if head.expect_continue && has_body {
        let _ = wire
            .stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await;
    }
    let complete = if head.chunked {
        strict_chunked(&mut wire).await?
    } else {
        let length = head.length.unwrap_or(0);
        let complete = fill_to(&mut wire, length).await;
        if complete {
            wire.buf.drain(..length);
        }
        complete
    };
    if !complete {
        // Cut short: the proxy gave up on the request, and the connection with it.
        return Ok(());
    }
    let _ = wire
        .stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        .await;
    nothing_after(&mut wire, "the end of the request").await
}

/// Fails if anything comes before the proxy closes the connection.
async fn nothing_after(wire: &mut Wire, what: &str) -> Result<(), String> {
    let after = wire.read_to_end().await;
    if after.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} bytes after {what}: {:?}",
            after.len(),
            String::from_utf8_lossy(&after)
        ))
    }
}

/// What the proxy's client got, read strictly: a head, unambiguous framing, nothing after the
/// body. A body cut short is no failure (the upstream cut it).
fn strict_response(bytes: &[u8], method: &str) -> Result<(), String> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            format!(
                "no complete response head: {:?}",
                String::from_utf8_lossy(bytes)
            )
        })?;
    let head = strict_head(&bytes[..end + 4])?;
    let status: u16 = head
        .start
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("a status line {:?}", head.start))?;
    let mut rest = &bytes[end + 4..];
    if method == "HEAD" || status == 204 || status == 304 {
        // No body whatever the framing says.
    } else if head.chunked {
        loop {
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                return Ok(());
            };
            let line = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or_default(), 16)
                .map_err(|_| format!("a chunk-size line {line:?}"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(());
                };
                // No trailers are sent here: the empty line ends the body.
                if end != 0 {
                    let trailers_end = rest.windows(4).position(|w| w == b"\r\n\r\n");
                    rest = trailers_end.map_or(&[][..], |end| &rest[end + 4..]);
                } else {
                    rest = &rest[2..];
                }
                break;
            }
            if rest.len() < size + 2 {
                return Ok(());
            }
            rest = &rest[size + 2..];
        }
    } else if let Some(length) = head.length {
        rest = rest.get(length..).unwrap_or_default();
    } else {
        rest = &[];
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} bytes after the end of the response: {:?}",
            rest.len(),
            String::from_utf8_lossy(rest)
        ))
    }
}

/// Mutations of each kind; a fixed seed keeps them the same from run to run.
const MUTATIONS: usize = 300;
const MUTATION_SEED: u64 = 0x5eed_0022_dead_beef;
/// Mutations in flight at once.
const MUTATIONS_AT_ONCE: usize = 8;

const REQUEST_SEEDS: &[&[u8]] = &[
    b"POST /m HTTP/1.1\r\nHost: app\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n\
      23\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n\r\n0\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 35\r\n\r\n\
      GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /m HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n\
      5\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n",
    b"GET /m HTTP/1.1\r\nHost: app\r\nConnection: content-length\r\nContent-Length: 35\r\n\r\n\
      GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
];

const RESPONSE_SEEDS: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close",
];

/// Runs `one(i)` for every mutation, a few at a time, and fails with every input that failed.
async fn run_mutations<F, Fut>(what: &str, inputs: &[Vec<u8>], one: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    use futures_util::StreamExt;
    let failures: Vec<String> = futures_util::stream::iter(0..inputs.len())
        .map(|i| {
            let run = one(i);
            async move {
                match tokio::time::timeout(WAIT, run).await {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(format!(
                        "{i}: {error}: {:?}",
                        String::from_utf8_lossy(&inputs[i])
                    )),
                    Err(_) => Some(format!(
                        "{i}: stuck for {WAIT:?}: {:?}",
                        String::from_utf8_lossy(&inputs[i])
                    )),
                }
            }
        })
        .buffer_unordered(MUTATIONS_AT_ONCE)
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "{} of {} mutated {what} failed:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

/// The mutated requests, each with its own request target (`/m` becomes `/m/<index>`) so that
/// the app can tell which one it reads; one in two asks the app to refuse a body it expects
/// (`/m/<index>/refuse`), which matters to those that say `Expect: 100-continue`.
fn mutated_requests() -> Vec<Vec<u8>> {
    let mut rng = XorShift(MUTATION_SEED);
    (0..MUTATIONS)
        .map(|i| {
            let seed = REQUEST_SEEDS[i % REQUEST_SEEDS.len()];
            let mutated = mutate(&mut rng, seed);
            let space = mutated.iter().position(|&b| b == b' ').unwrap_or(0);
            let mut out = mutated[..space].to_vec();
            let refuse = if i % 2 == 0 { "/refuse" } else { "" };
            out.extend(format!(" /m/{i}{refuse}").into_bytes());
            out.extend(&mutated[space + 3..]);
            out
        })
        .collect()
}

#[tokio::test]
async fn no_mutated_request_puts_a_byte_past_the_end_of_the_request_the_proxy_wrote() {
    let inputs = mutated_requests();
    // Which request each failure came with: the app reads the index from the request target.
    let app_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let finished = Arc::new(AtomicUsize::new(0));
    let (failures, done) = (app_failures.clone(), finished.clone());
    let app = upstream(move |conn| {
        let (failures, done) = (failures.clone(), done.clone());
        async move {
            let result = tokio::time::timeout(WAIT, strict_app(conn.wire)).await;
            let result = result.unwrap_or_else(|_| Err(format!("stuck for {WAIT:?}")));
            if let Err(error) = result {
                failures.lock().unwrap().push(error);
            }
            done.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let (proxy, _) = start_proxy(app.addr, Direction::Inbound).await;
    run_mutations("requests", &inputs, |i| {
        let input = inputs[i].clone();
        async move {
            let mut client = Wire::connect(proxy).await;
            client.write(&input).await;
            let _ = client.stream.shutdown().await;
            // Any answer will do; what the app read is what counts.
            let _ = client.read_to_end().await;
            Ok(())
        }
    })
    .await;
    within("the app finishing every connection", async {
        while finished.load(Ordering::SeqCst) < app.accepts() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Each failure with the client's input, found by the index in the request target.
    let failures: Vec<String> = app_failures
        .lock()
        .unwrap()
        .iter()
        .map(|error| {
            let index = error.split("/m/").nth(1).and_then(|rest| {
                let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
                digits.parse::<usize>().ok()
            });
            let input = index.and_then(|i| inputs.get(i));
            let input = input.map(|input| String::from_utf8_lossy(input).into_owned());
            format!("{error}\n    sent by the client: {input:?}")
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} upstream connections read something ambiguous or past the end:\n{}",
        failures.len(),
        app.accepts(),
        failures.join("\n")
    );
    assert!(
        app.accepts() > MUTATIONS / 4,
        "too few mutations reached the app: {}",
        app.accepts()
    );
}

#[tokio::test]
async fn no_mutated_response_reaches_the_client_ambiguous_or_not_at_all() {
    let mut rng = XorShift(MUTATION_SEED ^ 0xffff);
    let inputs: Vec<Vec<u8>> = (0..MUTATIONS)
        .map(|i| mutate(&mut rng, RESPONSE_SEEDS[i % RESPONSE_SEEDS.len()]))
        .collect();
    let responses = Arc::new(inputs.clone());
    let app = upstream(move |mut conn| {
        let responses = responses.clone();
        async move {
            let Some(request) = conn.next().await else {
                return;
            };
            let index: usize = target_of(&request)
                .trim_start_matches("/r/")
                .parse()
                .unwrap_or(0);
            conn.send(&responses[index]).await;
            let _ = conn.wire.stream.shutdown().await;
            let _ = tokio::time::timeout(WAIT, conn.wire.read_to_end()).await;
        }
    })
    .await;
    let (proxy, _) = start_proxy(app.addr, Direction::Inbound).await;
    run_mutations("responses", &inputs, |i| async move {
        // A third go as HEAD, a third ask for an upgrade the app refuses (that response is
        // read by hyper's client, not by `h1`).
        let (method, upgrade) = match i % 3 {
            0 => ("HEAD", ""),
            1 => ("GET", ""),
            _ => ("GET", "Upgrade: websocket\r\nConnection: upgrade\r\n"),
        };
        let mut client = Wire::connect(proxy).await;
        let request =
            format!("{method} /r/{i} HTTP/1.1\r\nHost: app\r\n{upgrade}Connection: close\r\n\r\n");
        client.write(request.as_bytes()).await;
        let got = client.read_to_end().await;
        if got.is_empty() {
            return Err(format!("{method}: the client got nothing at all"));
        }
        strict_response(&got, method).map_err(|error| format!("{method}: {error}"))
    })
    .await;
}
