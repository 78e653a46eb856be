//! The `remora.io/*` pod annotations (and the `remora.io/inject` label): parsed and validated.
//!
//! Every parser here rejects what Kubernetes or `remora-init`/`remora-proxy` would reject later,
//! with a message that names the annotation, the bad value and the accepted form, so a bad pod is
//! denied at admission instead of crash-looping.

use std::collections::BTreeMap;
use std::str::FromStr;

use remora_init::rate_limit::InboundRateLimit;
use remora_init::{
    quoted, CidrList, CidrSelection, InitConfig, PortList, PortRange, PortSelection,
};

use crate::config::{Config, ControlAddr};
use crate::trust::TrustAnchors;
use crate::values::{parse_proxy_uid, LogLevel, Quantity, Resources};
use remora_init::mtls::{AllowFrom, InboundMtls, InboundProbes};

/// Every remora annotation and label starts with this.
pub const PREFIX: &str = "remora.io/";
/// Opt in (`true`/`enabled`) or out (`false`/`disabled`); as a label it beats the annotation.
pub const INJECT: &str = "remora.io/inject";
/// Written by the injector on every pod it injects: what was added and by which version.
pub const STATUS: &str = "remora.io/status";
pub const PROXY_IMAGE: &str = "remora.io/proxy-image";
pub const INIT_IMAGE: &str = "remora.io/init-image";
pub const PROXY_CPU_REQUEST: &str = "remora.io/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "remora.io/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "remora.io/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "remora.io/proxy-memory-limit";
pub const PROXY_LOG_LEVEL: &str = "remora.io/proxy-log-level";
pub const PROXY_UID: &str = "remora.io/proxy-uid";
pub const INCLUDE_INBOUND_PORTS: &str = "remora.io/include-inbound-ports";
pub const EXCLUDE_INBOUND_PORTS: &str = "remora.io/exclude-inbound-ports";
pub const INCLUDE_OUTBOUND_CIDRS: &str = "remora.io/include-outbound-cidrs";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "remora.io/exclude-outbound-cidrs";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "remora.io/exclude-outbound-ports";
pub const OPAQUE_PORTS: &str = "remora.io/opaque-ports";
/// Requests per second the pod's proxy lets in, in all and per client: its `--inbound-rate-limit`.
pub const INBOUND_RATE_LIMIT: &str = "remora.io/inbound-rate-limit";
/// `permissive` or `strict`: the proxy's `--inbound-mtls` (strict also passes the pod's probes).
pub const INBOUND_MTLS: &str = "remora.io/inbound-mtls";
/// The client identities let in, `ns/sa` or `ns/*`: the proxy's `--allow-from` (a list also
/// passes the pod's probes, as strict mode does: a plaintext client is on no list).
pub const ALLOW_FROM: &str = "remora.io/allow-from";

/// Every annotation the injector reads; any other `remora.io/` key draws a warning.
pub const KNOWN: &[&str] = &[
    INJECT,
    STATUS,
    PROXY_IMAGE,
    INIT_IMAGE,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    PROXY_LOG_LEVEL,
    PROXY_UID,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    OPAQUE_PORTS,
    INBOUND_RATE_LIMIT,
    INBOUND_MTLS,
    ALLOW_FROM,
];

/// A pod annotation or label whose value is not accepted. The message is the deny message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_kind} {key}: {problem}")]
pub struct AnnotationError {
    /// `annotation` or `label`.
    pub source_kind: &'static str,
    pub key: String,
    pub value: String,
    /// Names the bad value and what is accepted.
    pub problem: String,
}

impl AnnotationError {
    fn annotation(key: &str, value: &str, problem: impl Into<String>) -> Self {
        Self {
            source_kind: "annotation",
            key: key.to_string(),
            value: value.to_string(),
            problem: problem.into(),
        }
    }
}

/// What a pod asks for with `remora.io/inject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectChoice {
    /// Neither the label nor the annotation is set.
    Unset,
    OptIn,
    OptOut,
}

/// Reads `remora.io/inject`: the label wins over the annotation; a bad value of the one that
/// decides is an error. (An annotation the label overrides is not read at all.)
pub fn inject_choice(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<InjectChoice, AnnotationError> {
    let (source_kind, value) = match (
        labels.and_then(|labels| labels.get(INJECT)),
        annotations.and_then(|annotations| annotations.get(INJECT)),
    ) {
        (Some(label), _) => ("label", label),
        (None, Some(annotation)) => ("annotation", annotation),
        (None, None) => return Ok(InjectChoice::Unset),
    };
    match value.as_str() {
        "true" | "enabled" => Ok(InjectChoice::OptIn),
        "false" | "disabled" => Ok(InjectChoice::OptOut),
        _ => Err(AnnotationError {
            source_kind,
            key: INJECT.to_string(),
            value: value.clone(),
            problem: format!(
                "{} is not accepted (expected true, enabled, false or disabled)",
                quoted(value)
            ),
        }),
    }
}

/// An image reference: non-empty, no whitespace.
fn parse_image(value: &str) -> Result<String, String> {
    let image = value.trim();
    if image.is_empty() || image.contains(char::is_whitespace) {
        Err(format!(
            "{} is not an image (expected a non-empty reference such as ghcr.io/remora-mesh/remora-proxy:{})",
            quoted(value),
            crate::config::VERSION
        ))
    } else {
        Ok(image.to_string())
    }
}

/// Everything the injected containers are built from: the injector's defaults overridden by
/// the pod's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub proxy_image: String,
    pub init_image: String,
    pub proxy_resources: Resources,
    pub init_resources: Resources,
    pub proxy_uid: u32,
    pub proxy_log_level: LogLevel,
    pub opaque_ports: PortList,
    /// The proxy's `--inbound-rate-limit`; `None` leaves the flag out.
    pub inbound_rate_limit: Option<InboundRateLimit>,
    /// The proxy's `--inbound-mtls`; `None` leaves the flag out (the proxy's default, permissive).
    pub inbound_mtls: Option<InboundMtls>,
    /// The proxy's `--allow-from`; empty (anyone) leaves the flag out.
    pub allow_from: AllowFrom,
    /// The proxy's `--inbound-probes`, from the pod spec rather than an annotation (filled in
    /// by the injection in strict mode or with an allow-from list); empty leaves the flag out.
    pub inbound_probes: InboundProbes,
    /// The args of `remora-init`, as `remora-init` itself parses them.
    pub init: InitConfig,
    /// The proxy's `--control` and `REMORA_TRUST_ANCHORS`: injector settings, not per pod.
    pub control_addr: Option<ControlAddr>,
    pub trust_anchors: Option<TrustAnchors>,
}

/// Parses every `remora.io/*` config annotation over the injector's defaults. Also returns a
/// warning per unknown `remora.io/` annotation (most likely a typo the user wants to hear about).
pub fn pod_settings(
    annotations: Option<&BTreeMap<String, String>>,
    config: &Config,
) -> Result<(PodSettings, Vec<String>), AnnotationError> {
    let empty = BTreeMap::new();
    let annotations = annotations.unwrap_or(&empty);
    let get = |key: &str| annotations.get(key).map(String::as_str);

    fn parse<T>(
        key: &str,
        value: Option<&str>,
        parser: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, AnnotationError> {
        value
            .map(|value| {
                parser(value).map_err(|problem| AnnotationError::annotation(key, value, problem))
            })
            .transpose()
    }
    // The init-net parsers name only the bad item; say which whole value it came from (unless
    // the item is the whole value).
    fn list<T: FromStr<Err = remora_init::ParseError>>(value: &str) -> Result<T, String> {
        value.parse().map_err(|err: remora_init::ParseError| {
            if err.value() == value.trim() {
                err.to_string()
            } else {
                format!("{} is invalid: {err}", quoted(value))
            }
        })
    }

    let proxy_image = parse(PROXY_IMAGE, get(PROXY_IMAGE), parse_image)?
        .unwrap_or_else(|| config.proxy_image.clone());
    let init_image = parse(INIT_IMAGE, get(INIT_IMAGE), parse_image)?
        .unwrap_or_else(|| config.init_image.clone());

    let defaults = &config.proxy_resources;
    let proxy_resources = Resources {
        cpu_request: parse(PROXY_CPU_REQUEST, get(PROXY_CPU_REQUEST), Quantity::parse)?
            .unwrap_or_else(|| defaults.cpu_request.clone()),
        cpu_limit: parse(PROXY_CPU_LIMIT, get(PROXY_CPU_LIMIT), Quantity::parse)?
            .unwrap_or_else(|| defaults.cpu_limit.clone()),
        memory_request: parse(
            PROXY_MEMORY_REQUEST,
            get(PROXY_MEMORY_REQUEST),
            Quantity::parse,
        )?
        .unwrap_or_else(|| defaults.memory_request.clone()),
        memory_limit: parse(PROXY_MEMORY_LIMIT, get(PROXY_MEMORY_LIMIT), Quantity::parse)?
            .unwrap_or_else(|| defaults.memory_limit.clone()),
    };
    check_request_within_limit(
        annotations,
        "CPU",
        (PROXY_CPU_REQUEST, &proxy_resources.cpu_request),
        (PROXY_CPU_LIMIT, &proxy_resources.cpu_limit),
    )?;
    check_request_within_limit(
        annotations,
        "memory",
        (PROXY_MEMORY_REQUEST, &proxy_resources.memory_request),
        (PROXY_MEMORY_LIMIT, &proxy_resources.memory_limit),
    )?;

    let proxy_log_level = parse(PROXY_LOG_LEVEL, get(PROXY_LOG_LEVEL), LogLevel::from_str)?
        .unwrap_or(config.proxy_log_level);
    let proxy_uid = parse(PROXY_UID, get(PROXY_UID), parse_proxy_uid)?.unwrap_or(config.proxy_uid);
    let opaque_ports = parse(OPAQUE_PORTS, get(OPAQUE_PORTS), list::<PortList>)?
        .unwrap_or_else(|| config.opaque_ports.clone());
    let inbound_rate_limit = parse(
        INBOUND_RATE_LIMIT,
        get(INBOUND_RATE_LIMIT),
        InboundRateLimit::from_str,
    )?;
    let inbound_mtls = parse(INBOUND_MTLS, get(INBOUND_MTLS), InboundMtls::from_str)?;
    let allow_from = parse(ALLOW_FROM, get(ALLOW_FROM), AllowFrom::from_str)?.unwrap_or_default();

    let mut exclude_inbound_ports = parse(
        EXCLUDE_INBOUND_PORTS,
        get(EXCLUDE_INBOUND_PORTS),
        list::<PortList>,
    )?
    .unwrap_or_default();
    // kubelet probes the admin port directly: it is never redirected, whatever the pod says.
    if !exclude_inbound_ports.contains(remora_init::config::ADMIN_PORT) {
        exclude_inbound_ports
            .0
            .push(PortRange::single(remora_init::config::ADMIN_PORT));
    }
    let init = InitConfig {
        proxy_uid,
        include_inbound_ports: parse(
            INCLUDE_INBOUND_PORTS,
            get(INCLUDE_INBOUND_PORTS),
            list::<PortSelection>,
        )?
        .unwrap_or_default(),
        exclude_inbound_ports,
        include_outbound_cidrs: parse(
            INCLUDE_OUTBOUND_CIDRS,
            get(INCLUDE_OUTBOUND_CIDRS),
            list::<CidrSelection>,
        )?
        .unwrap_or_default(),
        exclude_outbound_cidrs: parse(
            EXCLUDE_OUTBOUND_CIDRS,
            get(EXCLUDE_OUTBOUND_CIDRS),
            list::<CidrList>,
        )?
        .unwrap_or_default(),
        exclude_outbound_ports: parse(
            EXCLUDE_OUTBOUND_PORTS,
            get(EXCLUDE_OUTBOUND_PORTS),
            list::<PortList>,
        )?
        .unwrap_or_default(),
        ..InitConfig::default()
    };

    let warnings = annotations
        .keys()
        .filter(|key| key.starts_with(PREFIX) && !KNOWN.contains(&key.as_str()))
        .map(|key| match closest_known(key) {
            Some(known) => format!(
                "remora: annotation {key} is not one remora reads and is ignored (did you mean {known}?)"
            ),
            None => format!("remora: annotation {key} is not one remora reads and is ignored"),
        })
        .collect();

    Ok((
        PodSettings {
            proxy_image,
            init_image,
            proxy_resources,
            init_resources: config.init_resources.clone(),
            proxy_uid,
            proxy_log_level,
            opaque_ports,
            inbound_rate_limit,
            inbound_mtls,
            allow_from,
            inbound_probes: InboundProbes::default(),
            init,
            control_addr: config.control_addr.clone(),
            trust_anchors: config.trust_anchors.clone(),
        },
        warnings,
    ))
}

/// The known annotation a typo most likely meant: at most three edits away.
pub(crate) fn closest_known(key: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .map(|known| (edit_distance(key, known), *known))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, known)| known)
}

/// Levenshtein distance, by bytes (annotation keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.as_bytes().iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Kubernetes rejects a container whose request exceeds its limit; blame the annotation that
/// made it so (the request's if the pod set it, else the limit's).
fn check_request_within_limit(
    annotations: &BTreeMap<String, String>,
    resource: &str,
    (request_key, request): (&str, &Quantity),
    (limit_key, limit): (&str, &Quantity),
) -> Result<(), AnnotationError> {
    if request <= limit {
        return Ok(());
    }
    let error = if let Some(value) = annotations.get(request_key) {
        AnnotationError::annotation(
            request_key,
            value,
            format!(
                "{} is greater than the proxy's {resource} limit {limit} (expected a request at most the limit; raise {limit_key} too)",
                quoted(value)
            ),
        )
    } else {
        let value = annotations.get(limit_key).map_or("", String::as_str);
        AnnotationError::annotation(
            limit_key,
            value,
            format!(
                "{} is less than the proxy's {resource} request {request} (expected a limit at least the request; lower {request_key} too)",
                quoted(value)
            ),
        )
    };
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_choices() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a [(&'a str, &'a str)],
            Result<InjectChoice, &'a str>,
        );
        let cases: &[Case] = &[
            ("nothing set", &[], &[], Ok(InjectChoice::Unset)),
            (
                "annotation true",
                &[],
                &[(INJECT, "true")],
                Ok(InjectChoice::OptIn),
            ),
            (
                "annotation enabled",
                &[],
                &[(INJECT, "enabled")],
                Ok(InjectChoice::OptIn),
            ),
            (
                "annotation false",
                &[],
                &[(INJECT, "false")],
                Ok(InjectChoice::OptOut),
            ),
            (
                "annotation disabled",
                &[],
                &[(INJECT, "disabled")],
                Ok(InjectChoice::OptOut),
            ),
            (
                "label true",
                &[(INJECT, "true")],
                &[],
                Ok(InjectChoice::OptIn),
            ),
            (
                "label disabled",
                &[(INJECT, "disabled")],
                &[],
                Ok(InjectChoice::OptOut),
            ),
            (
                "label beats annotation (out)",
                &[(INJECT, "false")],
                &[(INJECT, "true")],
                Ok(InjectChoice::OptOut),
            ),
            (
                "label beats annotation (in)",
                &[(INJECT, "enabled")],
                &[(INJECT, "disabled")],
                Ok(InjectChoice::OptIn),
            ),
            (
                "label beats a bad annotation",
                &[(INJECT, "true")],
                &[(INJECT, "maybe")],
                Ok(InjectChoice::OptIn),
            ),
            (
                "bad annotation",
                &[],
                &[(INJECT, "yes")],
                Err("annotation remora.io/inject: \"yes\""),
            ),
            (
                "bad label",
                &[(INJECT, "True")],
                &[(INJECT, "true")],
                Err("label remora.io/inject: \"True\""),
            ),
        ];
        for (name, labels, annotations, want) in cases {
            let got = inject_choice(Some(&map(labels)), Some(&map(annotations)));
            match want {
                Ok(choice) => assert_eq!(got, Ok(*choice), "case {name}"),
                Err(prefix) => {
                    let err = got.expect_err(name).to_string();
                    assert!(err.starts_with(prefix), "case {name}: {err}");
                    assert!(
                        err.contains("true, enabled, false or disabled"),
                        "case {name}: {err}"
                    );
                }
            }
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<(PodSettings, Vec<String>), AnnotationError> {
        let annotations: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        pod_settings(Some(&annotations), &Config::default())
    }

    #[test]
    fn no_annotations_give_the_defaults_and_exclude_the_admin_port() {
        let (settings, warnings) = settings(&[]).unwrap();
        let config = Config::default();
        assert_eq!(settings.proxy_image, config.proxy_image);
        assert_eq!(settings.init_image, config.init_image);
        assert_eq!(settings.proxy_resources, config.proxy_resources);
        assert_eq!(settings.proxy_uid, 1337);
        assert_eq!(settings.opaque_ports, config.opaque_ports);
        assert_eq!(settings.inbound_rate_limit, None);
        assert_eq!(settings.inbound_mtls, None);
        assert!(settings.allow_from.is_anyone());
        assert_eq!(
            settings.init.to_args(),
            ["--exclude-inbound-ports", "15020"]
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn good_annotations() {
        let (settings, warnings) = settings(&[
            (PROXY_IMAGE, "registry.example/proxy:dev"),
            (INIT_IMAGE, " registry.example/init:dev "),
            (PROXY_CPU_REQUEST, "250m"),
            (PROXY_CPU_LIMIT, "2"),
            (PROXY_MEMORY_REQUEST, "100Mi"),
            (PROXY_MEMORY_LIMIT, "1Gi"),
            (PROXY_LOG_LEVEL, "trace"),
            (PROXY_UID, "2102"),
            (INCLUDE_INBOUND_PORTS, "80,8080-8090"),
            (EXCLUDE_INBOUND_PORTS, "9000-9100"),
            (INCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8, fd00::/8"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.96.0.0/12,2001:db8::1"),
            (EXCLUDE_OUTBOUND_PORTS, "5432"),
            (OPAQUE_PORTS, "6379,7000-7005"),
            (INBOUND_RATE_LIMIT, "100/s, 10/s per-client"),
            (INBOUND_MTLS, "strict"),
            (ALLOW_FROM, "shop/checkout, monitoring/*"),
        ])
        .unwrap();
        assert_eq!(settings.inbound_mtls, Some(InboundMtls::Strict));
        assert_eq!(
            settings.allow_from.to_string(),
            "shop/checkout,monitoring/*"
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(settings.proxy_image, "registry.example/proxy:dev");
        assert_eq!(settings.init_image, "registry.example/init:dev");
        assert_eq!(settings.proxy_resources.cpu_request.to_string(), "250m");
        assert_eq!(settings.proxy_resources.memory_limit.to_string(), "1Gi");
        assert_eq!(settings.proxy_log_level, LogLevel::Trace);
        assert_eq!(settings.proxy_uid, 2102);
        assert_eq!(settings.opaque_ports.to_string(), "6379,7000-7005");
        assert_eq!(
            settings.inbound_rate_limit.map(|limit| limit.to_string()),
            Some("100/s,10/s per-client".to_string())
        );
        assert_eq!(
            settings.init.to_args(),
            [
                "--proxy-uid",
                "2102",
                "--include-inbound-ports",
                "80,8080-8090",
                "--exclude-inbound-ports",
                "9000-9100,15020",
                "--include-outbound-cidrs",
                "10.0.0.0/8,fd00::/8",
                "--exclude-outbound-cidrs",
                "10.96.0.0/12,2001:db8::1/128",
                "--exclude-outbound-ports",
                "5432",
            ]
        );
    }

    #[test]
    fn admin_port_already_excluded_is_not_repeated() {
        let (settings, _) = settings(&[(EXCLUDE_INBOUND_PORTS, "15000-15100")]).unwrap();
        assert_eq!(
            settings.init.exclude_inbound_ports.to_string(),
            "15000-15100"
        );
    }

    #[test]
    fn wildcards_and_empty_lists() {
        let (settings, _) = settings(&[
            (INCLUDE_INBOUND_PORTS, "*"),
            (INCLUDE_OUTBOUND_CIDRS, "*"),
            (OPAQUE_PORTS, ""),
        ])
        .unwrap();
        assert_eq!(settings.init.include_inbound_ports, PortSelection::All);
        assert_eq!(settings.init.include_outbound_cidrs, CidrSelection::All);
        assert!(settings.opaque_ports.is_empty());
    }

    #[test]
    fn bad_annotations_name_the_key_the_value_and_the_form() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("empty proxy image", PROXY_IMAGE, "", "non-empty"),
            ("image with space", INIT_IMAGE, "remora init", "non-empty"),
            ("bad cpu request", PROXY_CPU_REQUEST, "lots", "100m"),
            ("negative cpu limit", PROXY_CPU_LIMIT, "-1", "at least 0"),
            ("bad memory request", PROXY_MEMORY_REQUEST, "64MB", "128Mi"),
            ("bad memory limit", PROXY_MEMORY_LIMIT, "1 Gi", "128Mi"),
            (
                "request above default limit",
                PROXY_CPU_REQUEST,
                "2",
                "at most the limit",
            ),
            (
                "limit below default request",
                PROXY_MEMORY_LIMIT,
                "32Mi",
                "at least the request",
            ),
            (
                "bad log level",
                PROXY_LOG_LEVEL,
                "verbose",
                "error, warn, info, debug or trace",
            ),
            ("root uid", PROXY_UID, "0", "1 to 2147483647"),
            ("word uid", PROXY_UID, "proxy", "1 to 2147483647"),
            (
                "include port zero",
                INCLUDE_INBOUND_PORTS,
                "0",
                "1 to 65535",
            ),
            (
                "exclude inverted range",
                EXCLUDE_INBOUND_PORTS,
                "80,9100-9000",
                "e.g. 9000-9100",
            ),
            (
                "exclude port too big",
                EXCLUDE_OUTBOUND_PORTS,
                "65536",
                "1 to 65535",
            ),
            (
                "bad include cidr",
                INCLUDE_OUTBOUND_CIDRS,
                "10.0.0.0/33",
                "e.g. 10.0.0.0/8",
            ),
            (
                "bad v6 cidr",
                EXCLUDE_OUTBOUND_CIDRS,
                "fd00::/129",
                "2001:db8::/32",
            ),
            ("cidr word", EXCLUDE_OUTBOUND_CIDRS, "cluster", "expected"),
            ("opaque port word", OPAQUE_PORTS, "mysql", "1 to 65535"),
            (
                "wildcard among ports",
                INCLUDE_INBOUND_PORTS,
                "*,80",
                "* alone or a list",
            ),
            ("rate without unit", INBOUND_RATE_LIMIT, "100", "e.g. 100/s"),
            ("zero rate", INBOUND_RATE_LIMIT, "0/s", "e.g. 100/s"),
            (
                "per-client without its word",
                INBOUND_RATE_LIMIT,
                "100/s,10/s",
                "N/s,M/s per-client",
            ),
            (
                "per-client above the total",
                INBOUND_RATE_LIMIT,
                "10/s,20/s per-client",
                "M at most N",
            ),
            (
                "unknown mTLS mode",
                INBOUND_MTLS,
                "required",
                "expected permissive or strict",
            ),
            (
                "capitalised mTLS mode",
                INBOUND_MTLS,
                "Strict",
                "expected permissive or strict",
            ),
            (
                "allow-from without a slash",
                ALLOW_FROM,
                "checkout",
                "NAMESPACE/SERVICEACCOUNT or NAMESPACE/*",
            ),
            (
                "allow-from with a wildcard namespace",
                ALLOW_FROM,
                "shop/a,*/*",
                "NAMESPACE/SERVICEACCOUNT or NAMESPACE/*",
            ),
            (
                "allow-from with a SPIFFE URI",
                ALLOW_FROM,
                "spiffe://cluster.local/ns/shop/sa/a",
                "the namespace a DNS label",
            ),
            (
                "wildcard among cidrs",
                INCLUDE_OUTBOUND_CIDRS,
                "10.0.0.0/8, *",
                "* alone or a list",
            ),
        ];
        for (name, key, value, form) in cases {
            let err = settings(&[(key, value)]).expect_err(name);
            assert_eq!(err.key, *key, "case {name}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("annotation {key}: ")),
                "case {name}: {message}"
            );
            assert!(
                message.contains(&format!("{value:?}")),
                "case {name}: {message}"
            );
            assert!(message.contains(form), "case {name}: {message}");
        }
    }

    #[test]
    fn a_huge_bad_value_is_cut_short_in_the_message() {
        // Annotations may hold up to 256 KiB; the deny message names the start of the value.
        let huge = format!("{}x", "9".repeat(100_000));
        for key in [
            PROXY_CPU_LIMIT,
            PROXY_UID,
            PROXY_LOG_LEVEL,
            EXCLUDE_INBOUND_PORTS,
            INCLUDE_OUTBOUND_CIDRS,
            INBOUND_RATE_LIMIT,
            INBOUND_MTLS,
            ALLOW_FROM,
            PROXY_IMAGE,
        ] {
            let value = if key == PROXY_IMAGE {
                format!("a {huge}")
            } else {
                huge.clone()
            };
            let message = settings(&[(key, &value)]).expect_err(key).to_string();
            assert!(message.len() < 600, "{key}: {} bytes", message.len());
            assert!(
                message.starts_with(&format!("annotation {key}: ")),
                "{message}"
            );
            assert!(message.contains("999999"), "{message}");
            assert!(
                message.contains(&format!("({} bytes)", value.len())),
                "{message}"
            );
            assert!(message.contains("expected"), "{message}");
        }
        let labels = BTreeMap::from([(INJECT.to_string(), huge.clone())]);
        let message = inject_choice(None, Some(&labels)).unwrap_err().to_string();
        assert!(message.len() < 600, "{message}");
    }

    #[test]
    fn a_lone_bad_item_is_quoted_once() {
        let message = settings(&[(EXCLUDE_INBOUND_PORTS, "9100-9000")])
            .unwrap_err()
            .to_string();
        assert_eq!(message.matches("9100-9000").count(), 1, "{message}");
        // In a longer list, the whole value and then the bad item.
        let message = settings(&[(EXCLUDE_INBOUND_PORTS, "80, 9100-9000")])
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with(&format!(
                "annotation {EXCLUDE_INBOUND_PORTS}: \"80, 9100-9000\" is invalid: \"9100-9000\""
            )),
            "{message}"
        );
    }

    #[test]
    fn requests_and_limits_together() {
        // Raising both is fine; raising the request past a lowered limit is not.
        assert!(settings(&[(PROXY_CPU_REQUEST, "2"), (PROXY_CPU_LIMIT, "2")]).is_ok());
        let err = settings(&[
            (PROXY_MEMORY_REQUEST, "128Mi"),
            (PROXY_MEMORY_LIMIT, "100Mi"),
        ])
        .unwrap_err();
        assert_eq!(err.key, PROXY_MEMORY_REQUEST);
        assert!(err.to_string().contains("100Mi"), "{err}");
    }

    #[test]
    fn unknown_remora_annotations_warn() {
        let (_, warnings) = settings(&[
            ("remora.io/proxy-cpu-limits", "2"),
            ("example.com/other", "x"),
        ])
        .unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("remora.io/proxy-cpu-limits"));
        assert!(
            warnings[0].ends_with("(did you mean remora.io/proxy-cpu-limit?)"),
            "{warnings:?}"
        );
        let (_, warnings) = settings(&[("remora.io/sidecar", "x")]).unwrap();
        assert_eq!(
            warnings,
            ["remora: annotation remora.io/sidecar is not one remora reads and is ignored"]
        );
    }
}
