//! `serve` re-reads the trust anchors file and swaps new certificates into the webhook's config,
//! so pods injected from then on get them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::trust::{TrustAnchors, TrustAnchorsError};

/// What one look at the file found.
#[derive(Debug)]
pub enum Reload {
    /// The file holds what is being injected.
    Unchanged,
    /// The file changed; it is taken once it reads the same twice in a row, so a writer that
    /// does not replace it atomically is never caught halfway (a bundle cut after its first CA
    /// is still valid PEM).
    Settling,
    /// New certificates, injected from now on.
    Reloaded(usize),
    /// Unreadable or invalid; the certificates injected so far stay.
    Failed(TrustAnchorsError),
}

/// Re-reads the trust anchors file and swaps new certificates into the webhook's config.
#[derive(Debug)]
pub struct AnchorsReloader {
    path: PathBuf,
    config: Arc<ArcSwap<Config>>,
    /// The file content last seen, and whether it was seen on the poll before this one.
    seen: Option<Vec<u8>>,
    /// The last failure logged, so a lasting problem is logged once.
    logged_failure: Option<String>,
}

impl AnchorsReloader {
    pub fn new(path: PathBuf, config: Arc<ArcSwap<Config>>) -> Self {
        Self {
            path,
            config,
            seen: None,
            logged_failure: None,
        }
    }

    /// Reads the file once and installs its certificates when they are new and settled.
    pub fn poll(&mut self) -> Reload {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(source) => {
                self.seen = None;
                return Reload::Failed(TrustAnchorsError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if self.seen.as_ref() != Some(&bytes) {
            self.seen = Some(bytes);
            return Reload::Settling;
        }
        let anchors = match TrustAnchors::parse(&self.path, &bytes) {
            Ok(anchors) => anchors,
            Err(error) => return Reload::Failed(error),
        };
        let current = self.config.load();
        if current.trust_anchors.as_ref() == Some(&anchors) {
            return Reload::Unchanged;
        }
        let count = anchors.count();
        self.config.store(Arc::new(Config {
            trust_anchors: Some(anchors),
            ..Config::clone(&current)
        }));
        Reload::Reloaded(count)
    }

    /// Polls once and logs what changed; a failure once until it changes.
    pub fn poll_and_log(&mut self) {
        match self.poll() {
            Reload::Unchanged => self.logged_failure = None,
            Reload::Settling => {}
            Reload::Reloaded(certificates) => {
                self.logged_failure = None;
                tracing::info!(
                    file = %self.path.display(),
                    certificates,
                    "loaded new trust anchors; pods injected from now on get them"
                );
            }
            Reload::Failed(error) => {
                let message = error.to_string();
                if self.logged_failure.as_ref() != Some(&message) {
                    tracing::warn!(%error, "trust anchors file changed but can't be used; still injecting the previous certificates");
                    self.logged_failure = Some(message);
                }
            }
        }
    }

    /// Polls the file every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.poll_and_log();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::ca_pem;

    #[test]
    fn a_changed_file_is_taken_once_settled_and_a_bad_one_keeps_the_old_anchors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        let (one, two) = (ca_pem("one"), ca_pem("two"));
        std::fs::write(&path, &one).unwrap();
        let config = Arc::new(ArcSwap::from_pointee(Config {
            trust_anchors: Some(TrustAnchors::read(&path).unwrap()),
            ..Config::default()
        }));
        let mut reloader = AnchorsReloader::new(path.clone(), config.clone());
        let injected = || {
            config
                .load()
                .trust_anchors
                .clone()
                .unwrap()
                .pem()
                .to_owned()
        };

        assert!(matches!(reloader.poll(), Reload::Settling));
        assert!(matches!(reloader.poll(), Reload::Unchanged));

        std::fs::write(&path, format!("{two}{one}")).unwrap();
        assert!(matches!(reloader.poll(), Reload::Settling));
        assert_eq!(injected(), one);
        assert!(matches!(reloader.poll(), Reload::Reloaded(2)));
        assert_eq!(injected(), format!("{two}{one}"));
        // The other settings are untouched.
        assert_eq!(config.load().control_addr, Config::default().control_addr);

        std::fs::write(&path, "garbage").unwrap();
        reloader.poll();
        assert!(matches!(
            reloader.poll(),
            Reload::Failed(TrustAnchorsError::NoCertificate { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            reloader.poll(),
            Reload::Failed(TrustAnchorsError::Read { .. })
        ));
        assert_eq!(injected(), format!("{two}{one}"));
    }
}
