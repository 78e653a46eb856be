//! What remora's two servers with a certificate have in common: `remora-injector serve` (the
//! webhook) and `remora-control serve` (the discovery API). Both serve a certificate from PEM
//! files that a Secret volume or cert-manager may replace at any time ([`tls`]), and both set up
//! their logs from `--log-level` and `--log-format` the same way ([`logging`]).

pub mod logging;
pub mod tls;
