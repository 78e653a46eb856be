//! remora-echo: an HTTP/1.1 and HTTP/2 (prior knowledge) server that answers every request with
//! its name, as the endpoints of a Service in `make demo`.
//!
//! Usage: `remora-echo ADDR NAME`, e.g. `remora-echo 198.18.11.1:8080 pod-1`.

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, name] = args.as_slice() else {
        bail!("usage: remora-echo ADDR NAME (e.g. remora-echo 198.18.11.1:8080 pod-1)");
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
        let echo = remora_e2e::echo::Echo::new(name.clone(), std::time::Duration::ZERO);
        remora_e2e::echo::serve(listener, echo).await;
        Ok(())
    })
}
