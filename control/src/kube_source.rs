//! TEMPORARY stand-in for the cluster source, so that the binary builds before it lands.

use std::sync::Arc;

use tokio::sync::watch;

/// Watches the cluster's objects. Not built yet: always an error.
pub async fn watch_cluster(
    _client: kube::Client,
) -> anyhow::Result<watch::Receiver<Arc<crate::watch::Snapshot>>> {
    anyhow::bail!("cluster mode is not built yet: run with --objects PATH")
}
