//! Who may come into the pod: `--inbound-mtls`, `--allow-from` and `--inbound-probes` together,
//! as the process holds them ([`crate::proxy::Proxy::inbound_mtls`]) and the inbound side reads
//! them for each plaintext connection.

use remora_init::mtls::{AllowFrom, InboundMtls, InboundProbes, ProbePort};

/// Who may come in: `--inbound-mtls`, `--allow-from` and `--inbound-probes` together.
#[derive(Debug, Clone, Default)]
pub struct Mtls {
    pub mode: InboundMtls,
    pub allow_from: AllowFrom,
    pub probes: InboundProbes,
}

/// What becomes of an inbound connection that is not mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plaintext<'a> {
    /// Served as before.
    Allowed,
    /// Only HTTP/1 requests for these paths (the pod's httpGet probes on that port); other
    /// requests get 403, other protocols a reset.
    Paths(&'a [String]),
    /// Strict mode: reset.
    Refused,
    /// `--allow-from` names identities and a plaintext client has none: 403 for HTTP, a reset
    /// for TCP, as for an mTLS client it does not name.
    Denied,
}

impl Mtls {
    /// What a plaintext connection to `port` gets. The pod's probes are let through whatever
    /// the mode; an `--allow-from` list, which a client without an identity cannot be on,
    /// keeps other plaintext out even when permissive.
    pub fn plaintext(&self, port: u16) -> Plaintext<'_> {
        if self.mode == InboundMtls::Permissive && self.allow_from.is_anyone() {
            return Plaintext::Allowed;
        }
        match (self.probes.port(port), self.mode) {
            (Some(ProbePort::Whole), _) => Plaintext::Allowed,
            (Some(ProbePort::Paths(paths)), _) => Plaintext::Paths(paths),
            (None, InboundMtls::Strict) => Plaintext::Refused,
            (None, InboundMtls::Permissive) => Plaintext::Denied,
        }
    }
}

/// Whether `path` (a request target, query included) is one of `probes`: compared without the
/// query, which the pod spec may give and `--inbound-probes` never holds.
pub fn is_probe_path(probes: &[String], path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    probes.iter().any(|probe| probe == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_let_in_as_the_mode_and_probes_say() {
        let mtls = |mode, allow: &str, probes: &str| Mtls {
            mode,
            allow_from: allow.parse().unwrap(),
            probes: probes.parse().unwrap(),
        };
        let probes = "8080:/healthz,8080:/ready,9000";
        let permissive = mtls(InboundMtls::Permissive, "", probes);
        assert_eq!(permissive.plaintext(80), Plaintext::Allowed);
        let strict = mtls(InboundMtls::Strict, "", probes);
        assert_eq!(strict.plaintext(80), Plaintext::Refused);
        assert_eq!(strict.plaintext(9000), Plaintext::Allowed);
        let paths = ["/healthz".to_owned(), "/ready".to_owned()];
        assert_eq!(strict.plaintext(8080), Plaintext::Paths(&paths));
        let named = mtls(InboundMtls::Permissive, "shop/*", probes);
        assert_eq!(named.plaintext(80), Plaintext::Denied);
        assert_eq!(named.plaintext(9000), Plaintext::Allowed);
        assert!(is_probe_path(&paths, "/ready?verbose=1"));
        assert!(!is_probe_path(&paths, "/readyz"));
    }
}
