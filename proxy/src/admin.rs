//! The admin listener: `/live`, `/ready` and `/metrics` for kubelet probes and Prometheus.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::proxy::Proxy;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the admin endpoints until the process exits: during a drain `/ready` must keep
/// answering (503) so that the kubelet sees the pod leave the endpoints.
pub async fn serve(listener: TcpListener, proxy: &'static Proxy) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let service =
                service_fn(
                    move |request| async move { Ok::<_, Infallible>(answer(proxy, &request)) },
                );
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn answer(proxy: &Proxy, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if proxy.drain.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/ready" if !proxy.ready.load(Ordering::Acquire) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
        }
        "/ready" if proxy.identity.holds_readiness() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for a workload certificate\n",
        ),
        "/ready" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(proxy.metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(OPENMETRICS),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found (try /live, /ready or /metrics)\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, SystemTime};

    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http_tests::{new_proxy, within};
    use crate::identity::Credentials;

    async fn admin(proxy: &'static Proxy) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, proxy));
        addr
    }

    /// The status line and body of `GET path`.
    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        within("an admin answer", async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            let status = text.lines().next().unwrap_or_default().to_string();
            let body = text
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .to_string();
            (status, body)
        })
        .await
    }

    fn credentials() -> Credentials {
        Credentials {
            id: "spiffe://cluster.local/ns/shop/sa/web".into(),
            chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(Vec::new().into()),
            trust_anchors: Vec::new(),
            expires: SystemTime::now() + Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn ready_waits_for_the_first_certificate_while_the_identity_holds_it() {
        let proxy = new_proxy();
        let addr = admin(proxy).await;
        assert_eq!(
            get(addr, "/ready").await.0,
            "HTTP/1.1 503 Service Unavailable"
        );
        proxy.ready.store(true, Ordering::Release);
        // No identity asked for (no --control, no token): ready as before.
        assert_eq!(get(addr, "/ready").await.0, "HTTP/1.1 200 OK");

        proxy.identity.hold_readiness();
        let (status, body) = get(addr, "/ready").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body, "waiting for a workload certificate\n");
        assert_eq!(get(addr, "/live").await.0, "HTTP/1.1 200 OK");

        proxy.identity.set(credentials());
        assert_eq!(get(addr, "/ready").await.0, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn ready_without_a_certificate_once_the_wait_is_over() {
        let proxy = new_proxy();
        let addr = admin(proxy).await;
        proxy.ready.store(true, Ordering::Release);
        proxy.identity.hold_readiness();
        assert_eq!(
            get(addr, "/ready").await.0,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert!(proxy.identity.release_readiness(), "it was held");
        assert_eq!(get(addr, "/ready").await.0, "HTTP/1.1 200 OK");
        assert!(proxy.identity.current().is_none());
        assert!(!proxy.identity.release_readiness(), "released once");
    }
}
