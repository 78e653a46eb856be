//! remora-echo: an HTTP/1.1 and HTTP/2 (prior knowledge) server that answers every request with
//! its name, as the endpoints of a Service in `make demo`; given a namespace too, it plays a pod
//! of the Gateway API conformance and answers with a JSON report of the request (gRPC calls
//! included), as `remora_e2e::echo::Echo::pod` describes.
//!
//! Usage: `remora-echo ADDR NAME [NAMESPACE]`, e.g. `remora-echo 198.18.11.1:8080 pod-1`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use remora_e2e::echo::Echo;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, echo) = match args.as_slice() {
        [addr, name] => (addr, Echo::new(name.clone(), Duration::ZERO)),
        [addr, name, namespace] => (
            addr,
            Echo::pod(
                name.clone(),
                namespace.clone(),
                Duration::ZERO,
                hyper::StatusCode::OK,
            ),
        ),
        _ => bail!(
            "usage: remora-echo ADDR NAME [NAMESPACE] (e.g. remora-echo 198.18.11.1:8080 pod-1)"
        ),
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("{addr:?} is not an IP:port address"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        remora_e2e::echo::serve(listener, echo).await;
        Ok(())
    })
}
