//! One Gateway API route object read alone, once per change of it ([`CompiledRoute::new`]):
//! its rules' matches with their rank in the specification's precedence, filters, backends,
//! timeouts and retry, each rule validated. The index keeps it with the route;
//! [`crate::routes`] places it in the tables of the targets it governs.
//!
//! Choices the Gateway API leaves open, as made here:
//! - HTTPRoute order: Exact path, then RegularExpression path, then PathPrefix; within each,
//!   the longer value first (for a regex, the longer pattern). A regex sits before every prefix
//!   so that a rule's catch-all `PathPrefix /` (the default) never hides it. Then a method
//!   match, more header matches, more query param matches.
//! - GRPCRoute order: more characters of service, then of method (pattern characters for a
//!   regex), then more header matches.
//! - A GRPCRoute match becomes a path match: service and method both exact give the Exact path
//!   `/service/method`; anything else a RegularExpression path, a missing part matching one
//!   path segment (`[^/]+`). gRPC needs no method match: every gRPC call is a POST.
//! - Patterns are sent as written; the proxy matches them against the whole path or value, as
//!   if anchored at both ends. They are checked here with the same `regex` crate the proxy uses.
//! - A rule that cannot be honoured keeps the matches that can be evaluated (so they still take
//!   their precedence and answer 500); a match that cannot be evaluated (a bad regex, a match
//!   type remora does not know) is left out, since it matches nothing remora can tell.
//! - A `retry` without `attempts` retries twice, as the Service annotation's default does.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use remora_api::discovery as pb;

use crate::gateway::{
    self, BackendObjectReference, Filter, GrpcRouteMatch, HeaderMatch, HttpRouteMatch,
    HttpRouteRetry, HttpRouteTimeouts, MatchType, PathMatchType, PathModifierType,
};
use crate::objects::{Route, ServiceKey};

/// Retries a route's `retry` gives when it names no `attempts` (the Gateway API leaves it to
/// the implementation): the same as the Service annotation `remora.io/retry-attempts`.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// Route kinds, as the table names them.
const HTTP_ROUTE: &str = "HTTPRoute";
const GRPC_ROUTE: &str = "GRPCRoute";

/// How a match ranks among the others of its table: smaller first.
pub(crate) type Rank = (
    u8,
    Reverse<usize>,
    Reverse<usize>,
    Reverse<usize>,
    Reverse<usize>,
);

/// One route object's rules, ready to be placed in any table it governs.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRoute {
    pub(crate) kind: &'static str,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) created: Option<Time>,
    pub(crate) rules: Vec<CompiledRule>,
    /// Every regular expression of the route, checked.
    pub(crate) patterns: CheckedPatterns,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CompiledRule {
    pub(crate) name: String,
    /// Why the rule cannot be honoured, if it cannot.
    pub(crate) invalid: Option<String>,
    /// Its matches that can be evaluated, each with its rank.
    pub(crate) matches: Vec<(Rank, pb::RouteMatch)>,
    pub(crate) filters: Vec<RuleFilter>,
    pub(crate) backends: Vec<RuleBackend>,
    pub(crate) request_timeout_ms: u64,
    pub(crate) backend_request_timeout_ms: u64,
    pub(crate) retry: Option<pb::Retry>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RuleBackend {
    pub(crate) backend: BackendRef,
    pub(crate) weight: u32,
    pub(crate) filters: Vec<RuleFilter>,
}

/// A filter; a mirror's backend is named once the table is known.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RuleFilter {
    Ready(pb::filter::Kind),
    Mirror {
        backend: BackendRef,
        numerator: u32,
        denominator: u32,
    },
}

/// A backendRef as written, its namespace filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BackendRef {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) port: Option<u16>,
    /// A core Service (the only kind of backend remora knows).
    pub(crate) service: bool,
}

impl BackendRef {
    fn new(reference: &BackendObjectReference, route_namespace: &str) -> Self {
        Self {
            namespace: reference
                .namespace
                .clone()
                .unwrap_or_else(|| route_namespace.to_string()),
            name: reference.name.clone(),
            port: reference.port,
            service: reference.is_service(),
        }
    }

    pub(crate) fn key(&self) -> ServiceKey {
        ServiceKey::new(self.namespace.as_str(), self.name.as_str())
    }
}

impl CompiledRoute {
    /// Reads one route; logs each rule it cannot honour (once per route object, so once per
    /// change of it). `earlier` is the route's previous version, if there was one: the
    /// regular expressions it checked are not compiled again.
    pub fn new(route: &Route, earlier: Option<&CompiledRoute>) -> Self {
        let earlier = earlier.map(|earlier| &earlier.patterns);
        let mut patterns = CheckedPatterns::new();
        let (kind, metadata, rules) = match route {
            Route::Http(http) => (
                HTTP_ROUTE,
                &http.metadata,
                http.spec
                    .rules
                    .iter()
                    .map(|rule| http_rule(rule, route.namespace(), earlier, &mut patterns))
                    .collect::<Vec<_>>(),
            ),
            Route::Grpc(grpc) => (
                GRPC_ROUTE,
                &grpc.metadata,
                grpc.spec
                    .rules
                    .iter()
                    .map(|rule| grpc_rule(rule, route.namespace(), earlier, &mut patterns))
                    .collect(),
            ),
        };
        let compiled = Self {
            kind,
            namespace: route.namespace().to_string(),
            name: route.name().to_string(),
            created: metadata.creation_timestamp.clone(),
            rules,
            patterns,
        };
        for (number, rule) in compiled.rules.iter().enumerate() {
            if let Some(reason) = &rule.invalid {
                tracing::warn!(
                    kind, route = %format_args!("{}/{}", compiled.namespace, compiled.name),
                    rule = number, rule_name = rule.name, reason,
                    "a route rule that cannot be honoured: the requests it matches get 500"
                );
            }
        }
        compiled
    }

    /// The route's kind, namespace and name.
    pub fn id(&self) -> (&'static str, &str, &str) {
        (self.kind, &self.namespace, &self.name)
    }

    /// The rules that cannot be honoured: (rule number, reason).
    pub fn invalid_rules(&self) -> impl Iterator<Item = (usize, &str)> {
        self.rules
            .iter()
            .enumerate()
            .filter_map(|(number, rule)| rule.invalid.as_deref().map(|reason| (number, reason)))
    }

    /// Orders routes for ties: older first, a route without a timestamp after those with one,
    /// then by namespace and name.
    pub(crate) fn tie_order(&self) -> (bool, Option<&Time>, &str, &str) {
        (
            self.created.is_none(),
            self.created.as_ref(),
            &self.namespace,
            &self.name,
        )
    }
}

/// Regular expressions checked: pattern → why it does not compile, if it does not.
type CheckedPatterns = HashMap<String, Option<String>>;

/// Collects the reasons a rule cannot be honoured (the first one is reported), and checks its
/// regular expressions.
struct Problems<'a> {
    first: Option<String>,
    /// What the route's previous version found (compiling a pattern costs far more than
    /// looking it up, and an edit of a long route leaves most of its patterns as they were).
    earlier: Option<&'a CheckedPatterns>,
    checked: &'a mut CheckedPatterns,
}

impl<'a> Problems<'a> {
    fn new(earlier: Option<&'a CheckedPatterns>, checked: &'a mut CheckedPatterns) -> Self {
        Self {
            first: None,
            earlier,
            checked,
        }
    }

    fn add(&mut self, reason: impl FnOnce() -> String) {
        if self.first.is_none() {
            self.first = Some(reason());
        }
    }

    /// Whether `pattern` compiles as the proxy will compile it; the reason when it does not.
    fn regex(&mut self, pattern: &str) -> Result<(), String> {
        let result = match self
            .checked
            .get(pattern)
            .or_else(|| self.earlier.and_then(|earlier| earlier.get(pattern)))
        {
            Some(known) => known.clone(),
            None => regex::Regex::new(pattern)
                .err()
                .map(|error| format!("{pattern:?} is not a valid regular expression: {error}")),
        };
        if !self.checked.contains_key(pattern) {
            self.checked.insert(pattern.to_string(), result.clone());
        }
        result.map_or(Ok(()), Err)
    }
}

fn http_rule(
    rule: &gateway::HttpRouteRule,
    namespace: &str,
    earlier: Option<&CheckedPatterns>,
    checked: &mut CheckedPatterns,
) -> CompiledRule {
    let mut problems = Problems::new(earlier, checked);
    // No matches means every request (the schema's default is one `PathPrefix /`).
    let default_match = [HttpRouteMatch::default()];
    let written: &[HttpRouteMatch] = if rule.matches.is_empty() {
        &default_match
    } else {
        &rule.matches
    };
    let matches = written
        .iter()
        .filter_map(|m| http_match(m, &mut problems))
        .collect();
    let only_prefix_matches = written
        .iter()
        .all(|m| m.path.match_type == PathMatchType::PathPrefix);
    let filters = rule_filters(&rule.filters, only_prefix_matches, namespace, &mut problems);
    let backends = rule
        .backend_refs
        .iter()
        .map(|backend| RuleBackend {
            backend: BackendRef::new(&backend.backend.object, namespace),
            weight: backend.backend.weight,
            filters: rule_filters(
                &backend.filters,
                only_prefix_matches,
                namespace,
                &mut problems,
            ),
        })
        .collect();
    let (request_timeout_ms, backend_request_timeout_ms) =
        timeouts(rule.timeouts.as_ref(), &mut problems);
    let retry = rule
        .retry
        .as_ref()
        .map(|retry| route_retry(retry, &mut problems));
    CompiledRule {
        name: rule.name.clone().unwrap_or_default(),
        invalid: problems.first,
        matches,
        filters,
        backends,
        request_timeout_ms,
        backend_request_timeout_ms,
        retry,
    }
}

fn grpc_rule(
    rule: &gateway::GrpcRouteRule,
    namespace: &str,
    earlier: Option<&CheckedPatterns>,
    checked: &mut CheckedPatterns,
) -> CompiledRule {
    let mut problems = Problems::new(earlier, checked);
    let default_match = [GrpcRouteMatch::default()];
    let written: &[GrpcRouteMatch] = if rule.matches.is_empty() {
        &default_match
    } else {
        &rule.matches
    };
    let matches = written
        .iter()
        .filter_map(|m| grpc_match(m, &mut problems))
        .collect();
    // A GRPCRoute has no path filters (its schema refuses them), so no prefix to replace.
    let filters = rule_filters(&rule.filters, false, namespace, &mut problems);
    let backends = rule
        .backend_refs
        .iter()
        .map(|backend| RuleBackend {
            backend: BackendRef::new(&backend.backend.object, namespace),
            weight: backend.backend.weight,
            filters: rule_filters(&backend.filters, false, namespace, &mut problems),
        })
        .collect();
    CompiledRule {
        name: rule.name.clone().unwrap_or_default(),
        invalid: problems.first,
        matches,
        filters,
        backends,
        request_timeout_ms: 0,
        backend_request_timeout_ms: 0,
        retry: None,
    }
}

/// A match as the table writes it, and its rank; `None` when it cannot be evaluated (the rule
/// is then invalid).
fn http_match(written: &HttpRouteMatch, problems: &mut Problems) -> Option<(Rank, pb::RouteMatch)> {
    let value = &written.path.value;
    let (class, kind) = match &written.path.match_type {
        PathMatchType::Exact => (0, pb::path_match::Kind::Exact),
        PathMatchType::RegularExpression => (1, pb::path_match::Kind::Regex),
        PathMatchType::PathPrefix => (2, pb::path_match::Kind::Prefix),
        PathMatchType::Unknown(other) => {
            problems.add(|| format!("remora does not support the path match type {other:?}"));
            return None;
        }
    };
    match kind {
        pb::path_match::Kind::Regex => {
            if let Err(reason) = problems.regex(value) {
                problems.add(|| format!("path: {reason}"));
                return None;
            }
        }
        _ if !value.starts_with('/') => {
            problems.add(|| format!("path {value:?} does not start with \"/\""));
            return None;
        }
        _ => {}
    }
    let headers = value_matches(&written.headers, "header", problems)?;
    let query_params = value_matches(&written.query_params, "query param", problems)?;
    let method = written.method.clone().unwrap_or_default();
    let rank = (
        class,
        Reverse(value.chars().count()),
        Reverse(usize::from(!method.is_empty())),
        Reverse(headers.len()),
        Reverse(query_params.len()),
    );
    Some((
        rank,
        pb::RouteMatch {
            rule: 0,
            path: Some(pb::PathMatch {
                kind: kind.into(),
                value: value.clone(),
            }),
            method,
            headers,
            query_params,
        },
    ))
}

fn value_matches(
    written: &[HeaderMatch],
    what: &str,
    problems: &mut Problems,
) -> Option<Vec<pb::ValueMatch>> {
    written
        .iter()
        .map(|m| {
            let kind = match &m.match_type {
                MatchType::Exact => pb::value_match::Kind::Exact,
                MatchType::RegularExpression => {
                    if let Err(reason) = problems.regex(&m.value) {
                        problems.add(|| format!("{what} {:?}: {reason}", m.name));
                        return None;
                    }
                    pb::value_match::Kind::Regex
                }
                MatchType::Unknown(other) => {
                    problems
                        .add(|| format!("remora does not support the {what} match type {other:?}"));
                    return None;
                }
            };
            Some(pb::ValueMatch {
                kind: kind.into(),
                name: m.name.clone(),
                value: m.value.clone(),
            })
        })
        .collect()
}

fn grpc_match(written: &GrpcRouteMatch, problems: &mut Problems) -> Option<(Rank, pb::RouteMatch)> {
    let headers = value_matches(&written.headers, "header", problems)?;
    let (path, service_chars, method_chars) = match &written.method {
        None => (None, 0, 0),
        Some(method) => {
            let service = method.service.as_deref().filter(|s| !s.is_empty());
            let name = method.method.as_deref().filter(|m| !m.is_empty());
            let chars = |part: Option<&str>| part.map_or(0, |part| part.chars().count());
            let path = match (&method.match_type, service, name) {
                (_, None, None) => {
                    problems.add(|| "a gRPC method match names neither service nor method".into());
                    return None;
                }
                (MatchType::Exact, Some(service), Some(name)) => pb::PathMatch {
                    kind: pb::path_match::Kind::Exact.into(),
                    value: format!("/{service}/{name}"),
                },
                (MatchType::Exact, service, name) => pb::PathMatch {
                    kind: pb::path_match::Kind::Regex.into(),
                    value: format!(
                        "/{}/{}",
                        service.map_or_else(|| "[^/]+".to_string(), regex::escape),
                        name.map_or_else(|| "[^/]+".to_string(), regex::escape),
                    ),
                },
                (MatchType::RegularExpression, service, name) => {
                    for part in [service, name].into_iter().flatten() {
                        if let Err(reason) = problems.regex(part) {
                            problems.add(|| format!("gRPC method: {reason}"));
                            return None;
                        }
                    }
                    pb::PathMatch {
                        kind: pb::path_match::Kind::Regex.into(),
                        value: format!(
                            "/{}/{}",
                            service.map_or_else(|| "[^/]+".to_string(), |s| format!("(?:{s})")),
                            name.map_or_else(|| "[^/]+".to_string(), |m| format!("(?:{m})")),
                        ),
                    }
                }
                (MatchType::Unknown(other), _, _) => {
                    problems.add(|| {
                        format!("remora does not support the gRPC method match type {other:?}")
                    });
                    return None;
                }
            };
            (Some(path), chars(service), chars(name))
        }
    };
    let rank = (
        0,
        Reverse(service_chars),
        Reverse(method_chars),
        Reverse(headers.len()),
        Reverse(0),
    );
    Some((
        rank,
        pb::RouteMatch {
            rule: 0,
            path,
            method: String::new(),
            headers,
            query_params: Vec::new(),
        },
    ))
}

/// A rule's filters; the first problem marks the rule.
fn rule_filters(
    written: &[Filter],
    only_prefix_matches: bool,
    namespace: &str,
    problems: &mut Problems,
) -> Vec<RuleFilter> {
    // Each of these may appear once in a list (the schema's rule); mirrors and extensions may
    // repeat.
    let mut seen: HashSet<&str> = HashSet::new();
    for filter in written {
        let kind = filter.filter_type();
        if !matches!(filter, Filter::RequestMirror(_) | Filter::ExtensionRef(_))
            && !seen.insert(kind)
        {
            problems.add(|| format!("the filter {kind} appears more than once"));
        }
    }
    if seen.contains("RequestRedirect") && seen.contains("URLRewrite") {
        problems.add(|| "RequestRedirect and URLRewrite cannot both be used on one rule".into());
    }
    written
        .iter()
        .filter_map(|filter| filter_of(filter, only_prefix_matches, namespace, problems))
        .collect()
}

fn filter_of(
    filter: &Filter,
    only_prefix_matches: bool,
    namespace: &str,
    problems: &mut Problems,
) -> Option<RuleFilter> {
    use pb::filter::Kind;
    let header_modifier = |modifier: &gateway::HeaderModifier| pb::HeaderModifier {
        set: headers(&modifier.set),
        add: headers(&modifier.add),
        remove: modifier.remove.clone(),
    };
    let kind = match filter {
        Filter::RequestHeaderModifier(modifier) => {
            Kind::RequestHeaderModifier(header_modifier(modifier))
        }
        Filter::ResponseHeaderModifier(modifier) => {
            Kind::ResponseHeaderModifier(header_modifier(modifier))
        }
        Filter::RequestRedirect(redirect) => {
            if !matches!(redirect.status_code, 301 | 302 | 303 | 307 | 308) {
                problems.add(|| {
                    format!(
                        "RequestRedirect status {} is not 301, 302, 303, 307 or 308",
                        redirect.status_code
                    )
                });
            }
            if let Some(scheme) = redirect.scheme.as_deref() {
                if scheme != "http" && scheme != "https" {
                    problems
                        .add(|| format!("RequestRedirect scheme {scheme:?} is not http or https"));
                }
            }
            if redirect.port == Some(0) {
                problems.add(|| "RequestRedirect port 0 is not a port".into());
            }
            Kind::RequestRedirect(pb::RequestRedirect {
                scheme: redirect.scheme.clone().unwrap_or_default(),
                hostname: redirect.hostname.clone().unwrap_or_default(),
                port: redirect.port.map_or(0, u32::from),
                path: redirect.path.as_ref().and_then(|path| {
                    path_modifier(path, "RequestRedirect", only_prefix_matches, problems)
                }),
                status_code: u32::from(redirect.status_code),
            })
        }
        Filter::UrlRewrite(rewrite) => Kind::UrlRewrite(pb::UrlRewrite {
            hostname: rewrite.hostname.clone().unwrap_or_default(),
            path: rewrite
                .path
                .as_ref()
                .and_then(|path| path_modifier(path, "URLRewrite", only_prefix_matches, problems)),
        }),
        Filter::RequestMirror(mirror) => {
            let (numerator, denominator) = match (mirror.percent, &mirror.fraction) {
                (Some(_), Some(_)) => {
                    problems.add(|| "RequestMirror has both percent and fraction".into());
                    (0, 1)
                }
                (Some(percent), None) => (percent, 100),
                (None, Some(fraction)) => (fraction.numerator, fraction.denominator),
                (None, None) => (1, 1),
            };
            if denominator == 0 || numerator > denominator {
                problems.add(|| {
                    format!("RequestMirror share {numerator}/{denominator} is not between 0 and 1")
                });
            }
            return Some(RuleFilter::Mirror {
                backend: BackendRef::new(&mirror.backend_ref, namespace),
                numerator,
                denominator,
            });
        }
        Filter::ExtensionRef(reference) => {
            problems.add(|| {
                format!(
                    "remora has no extension filters (ExtensionRef to {} {:?} of group {:?})",
                    reference.kind, reference.name, reference.group
                )
            });
            return None;
        }
        Filter::Unsupported {
            filter_type,
            reason,
        } => {
            problems.add(|| format!("filter {filter_type}: {reason}"));
            return None;
        }
    };
    Some(RuleFilter::Ready(kind))
}

fn headers(written: &[gateway::HttpHeader]) -> Vec<pb::Header> {
    written
        .iter()
        .map(|header| pb::Header {
            name: header.name.clone(),
            value: header.value.clone(),
        })
        .collect()
}

fn path_modifier(
    written: &gateway::PathModifier,
    filter: &str,
    only_prefix_matches: bool,
    problems: &mut Problems,
) -> Option<pb::PathModifier> {
    use pb::path_modifier::Kind;
    let (kind, value) = match &written.modifier_type {
        PathModifierType::ReplaceFullPath => {
            (Kind::ReplaceFullPath, written.replace_full_path.as_ref())
        }
        PathModifierType::ReplacePrefixMatch => {
            if !only_prefix_matches {
                problems.add(|| {
                    format!("{filter} ReplacePrefixMatch needs every match of its rule to be a PathPrefix")
                });
            }
            (
                Kind::ReplacePrefixMatch,
                written.replace_prefix_match.as_ref(),
            )
        }
        PathModifierType::Unknown(other) => {
            problems
                .add(|| format!("{filter}: remora does not support the path modifier {other:?}"));
            return None;
        }
    };
    let Some(value) = value else {
        problems.add(|| {
            format!(
                "{filter}: the path modifier {} has no value",
                written.modifier_type.as_str()
            )
        });
        return None;
    };
    Some(pb::PathModifier {
        kind: kind.into(),
        value: value.clone(),
    })
}

fn milliseconds(text: &str, what: &str, problems: &mut Problems) -> u64 {
    match gateway::parse_duration(text) {
        Ok(duration) => u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        Err(error) => {
            problems.add(|| format!("{what}: {error}"));
            0
        }
    }
}

fn timeouts(written: Option<&HttpRouteTimeouts>, problems: &mut Problems) -> (u64, u64) {
    let Some(written) = written else {
        return (0, 0);
    };
    let request = written
        .request
        .as_deref()
        .map_or(0, |text| milliseconds(text, "timeouts.request", problems));
    let backend = written.backend_request.as_deref().map_or(0, |text| {
        milliseconds(text, "timeouts.backendRequest", problems)
    });
    // `0s` is "no timeout"; a try may not outlast the whole request (the schema's rule).
    if request != 0 && (backend == 0 && written.backend_request.is_some() || backend > request) {
        problems.add(|| {
            format!("timeouts.backendRequest ({backend} ms, 0 = none) is longer than timeouts.request ({request} ms)")
        });
    }
    (request, backend)
}

fn route_retry(written: &HttpRouteRetry, problems: &mut Problems) -> pb::Retry {
    for code in &written.codes {
        if !(400..=599).contains(code) {
            problems.add(|| format!("retry code {code} is not between 400 and 599"));
        }
    }
    pb::Retry {
        codes: written.codes.iter().map(|code| u32::from(*code)).collect(),
        attempts: written.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
        backoff_ms: written
            .backoff
            .as_deref()
            .map_or(0, |text| milliseconds(text, "retry.backoff", problems)),
    }
}
