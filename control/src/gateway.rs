//! The part of Gateway API `gateway.networking.k8s.io/v1` HTTPRoute and GRPCRoute that remora reads.
//!
//! Hand-written because the `gateway-api` crate pins an older kube. Field names, defaults and
//! enums follow the v1.6 CRD schemas (experimental channel, a superset of standard). Defaults the
//! schema declares are applied when a field is absent, as the API server stores the object. An
//! enum value this version does not know (a filter or match type from a later release) is kept
//! as `Unknown` instead of failing the whole route: the rule that uses it must answer 500, and
//! only that rule.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// The group a `parentRef` or `backendRef` names for core objects such as Service.
pub const CORE_GROUP: &str = "";
/// The group of Gateway API objects, the schema's default for `parentRefs[].group`.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// An enum the schema spells as a string, with room for values a later version adds.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
        #[serde(from = "String")]
        pub enum $name {
            $($variant,)+
            /// A value this version of remora does not know, kept as written.
            Unknown(String),
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                match text.as_str() {
                    $($text => Self::$variant,)+
                    _ => Self::Unknown(text),
                }
            }
        }

        impl $name {
            /// The value as the API spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Unknown(text) => text,
                }
            }
        }
    };
}

string_enum!(
    /// `matches[].path.type`.
    PathMatchType {
        Exact => "Exact",
        PathPrefix => "PathPrefix",
        RegularExpression => "RegularExpression",
    }
);

string_enum!(
    /// `type` of a header, query parameter or gRPC method match.
    MatchType {
        Exact => "Exact",
        RegularExpression => "RegularExpression",
    }
);

string_enum!(
    /// `path.type` of a RequestRedirect or URLRewrite filter.
    PathModifierType {
        ReplaceFullPath => "ReplaceFullPath",
        ReplacePrefixMatch => "ReplacePrefixMatch",
    }
);

// Written out: `#[default]` cannot reach a variant through the macro.
#[allow(clippy::derivable_impls)]
impl Default for PathMatchType {
    fn default() -> Self {
        Self::PathPrefix
    }
}

#[allow(clippy::derivable_impls)]
impl Default for MatchType {
    fn default() -> Self {
        Self::Exact
    }
}

/// `gateway.networking.k8s.io/v1` HTTPRoute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

/// `gateway.networking.k8s.io/v1` GRPCRoute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GrpcRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Absent: one rule matching every path, as the schema defaults it.
    #[serde(default = "default_http_rules")]
    pub rules: Vec<HttpRouteRule>,
}

impl Default for HttpRouteSpec {
    fn default() -> Self {
        Self {
            parent_refs: Vec::new(),
            hostnames: Vec::new(),
            rules: default_http_rules(),
        }
    }
}

fn default_http_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule {
        name: None,
        matches: default_http_matches(),
        filters: Vec::new(),
        backend_refs: Vec::new(),
        timeouts: None,
        retry: None,
    }]
}

fn default_http_matches() -> Vec<HttpRouteMatch> {
    vec![HttpRouteMatch::default()]
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// `spec.parentRefs[]`. For the mesh the parent is a Service: `group: ""`, `kind: Service`,
/// `port` the Service's port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default = "default_parent_group")]
    pub group: String,
    #[serde(default = "default_parent_kind")]
    pub kind: String,
    /// Absent: the route's own namespace.
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

impl ParentReference {
    /// Whether this names a Service (the GAMMA way of attaching a route to a mesh service).
    pub fn is_service(&self) -> bool {
        self.group == CORE_GROUP && self.kind == "Service"
    }
}

fn default_parent_group() -> String {
    GATEWAY_GROUP.to_string()
}

fn default_parent_kind() -> String {
    "Gateway".to_string()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// The rule's `sectionName`, used in status and metrics.
    pub name: Option<String>,
    /// Absent: one match of every path (`PathPrefix /`). An empty list means the same to the
    /// specification, but is stored as written.
    #[serde(default = "default_http_matches")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, deserialize_with = "http_filters")]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Absent: `PathPrefix /`.
    #[serde(default)]
    pub path: PathMatch,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HeaderMatch>,
    /// An HTTP method in capitals; kept as a string since the list may grow.
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub match_type: PathMatchType,
    #[serde(default = "default_path")]
    pub value: String,
}

impl Default for PathMatch {
    fn default() -> Self {
        Self {
            match_type: PathMatchType::PathPrefix,
            value: default_path(),
        }
    }
}

fn default_path() -> String {
    "/".to_string()
}

/// A header or query parameter match (both have the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HeaderMatch {
    #[serde(default, rename = "type")]
    pub match_type: MatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included (a Gateway API duration such as `10s` or `1m30s`).
    pub request: Option<String>,
    /// One try.
    pub backend_request: Option<String>,
}

/// `rules[].retry` (experimental channel).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    /// Empty: every request matches.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, deserialize_with = "grpc_filters")]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<GrpcBackendRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub match_type: MatchType,
    pub service: Option<String>,
    pub method: Option<String>,
}

/// A `backendRef` of an HTTPRoute rule, with its own filters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HttpBackendRef {
    #[serde(flatten)]
    pub backend: BackendRef,
    #[serde(default, deserialize_with = "http_filters")]
    pub filters: Vec<Filter>,
}

/// A `backendRef` of a GRPCRoute rule, with its own filters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GrpcBackendRef {
    #[serde(flatten)]
    pub backend: BackendRef,
    #[serde(default, deserialize_with = "grpc_filters")]
    pub filters: Vec<Filter>,
}

/// A weighted reference to a backend (a Service unless `group`/`kind` say otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BackendRef {
    #[serde(flatten)]
    pub object: BackendObjectReference,
    /// Share of the rule's requests; 0 takes none.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// A reference to a backend object, as `backendRefs[]` and `requestMirror.backendRef` write it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BackendObjectReference {
    #[serde(default)]
    pub group: String,
    #[serde(default = "default_backend_kind")]
    pub kind: String,
    pub name: String,
    /// Absent: the route's own namespace.
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

impl BackendObjectReference {
    pub fn is_service(&self) -> bool {
        self.group == CORE_GROUP && self.kind == "Service"
    }
}

fn default_backend_kind() -> String {
    "Service".to_string()
}

/// A rule or backend filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
    /// An implementation-specific filter: remora has none, so a rule naming one answers 500.
    ExtensionRef(LocalObjectReference),
    /// A filter remora cannot honour: a type it does not know or does not support on this kind
    /// of route, or a known type without its settings. The rule answers 500.
    Unsupported {
        filter_type: String,
        reason: String,
    },
}

impl Filter {
    /// The filter's `type` as written.
    pub fn filter_type(&self) -> &str {
        match self {
            Self::RequestHeaderModifier(_) => "RequestHeaderModifier",
            Self::ResponseHeaderModifier(_) => "ResponseHeaderModifier",
            Self::RequestRedirect(_) => "RequestRedirect",
            Self::UrlRewrite(_) => "URLRewrite",
            Self::RequestMirror(_) => "RequestMirror",
            Self::ExtensionRef(_) => "ExtensionRef",
            Self::Unsupported { filter_type, .. } => filter_type,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`; absent: the scheme the client used.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    /// Absent: the port the client dialled (the Service port).
    pub port: Option<u16>,
    #[serde(default = "default_redirect_status")]
    pub status_code: u16,
}

fn default_redirect_status() -> u16 {
    302
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub modifier_type: PathModifierType,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendObjectReference,
    /// Share of requests mirrored, 0–100; with neither this nor `fraction`, all of them.
    pub percent: Option<u32>,
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "default_denominator")]
    pub denominator: u32,
}

fn default_denominator() -> u32 {
    100
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LocalObjectReference {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// A filter as written: its `type` and the one field named for that type. Read leniently so
/// that a filter remora cannot use spoils only its rule, never the route.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFilter {
    #[serde(rename = "type")]
    filter_type: String,
    request_header_modifier: Option<serde_json::Value>,
    response_header_modifier: Option<serde_json::Value>,
    request_redirect: Option<serde_json::Value>,
    url_rewrite: Option<serde_json::Value>,
    request_mirror: Option<serde_json::Value>,
    extension_ref: Option<serde_json::Value>,
}

/// Which route kind a filter list belongs to: GRPCRoute allows fewer filter types.
#[derive(Clone, Copy, PartialEq)]
enum RouteKind {
    Http,
    Grpc,
}

impl RawFilter {
    fn into_filter(self, kind: RouteKind) -> Filter {
        let filter_type = self.filter_type;
        let unsupported = |reason: String| Filter::Unsupported {
            filter_type: filter_type.clone(),
            reason,
        };
        // A field must be there for its type (the schema's CEL rules say so); a bad one spoils
        // only this filter.
        fn settings<T: serde::de::DeserializeOwned>(
            field: &'static str,
            value: Option<serde_json::Value>,
        ) -> Result<T, String> {
            let value = value.ok_or_else(|| format!("the filter has no `{field}` settings"))?;
            serde_path_to_error::deserialize(value)
                .map_err(|err| format!("`{field}.{}`: {}", err.path(), err.inner()))
        }
        let http_only = |kind: RouteKind| {
            (kind == RouteKind::Grpc).then(|| format!("{filter_type} is not a GRPCRoute filter"))
        };
        let result = match filter_type.as_str() {
            "RequestHeaderModifier" => {
                settings("requestHeaderModifier", self.request_header_modifier)
                    .map(Filter::RequestHeaderModifier)
            }
            "ResponseHeaderModifier" => {
                settings("responseHeaderModifier", self.response_header_modifier)
                    .map(Filter::ResponseHeaderModifier)
            }
            "RequestMirror" => {
                settings("requestMirror", self.request_mirror).map(Filter::RequestMirror)
            }
            "ExtensionRef" => {
                settings("extensionRef", self.extension_ref).map(Filter::ExtensionRef)
            }
            "RequestRedirect" => match http_only(kind) {
                Some(reason) => Err(reason),
                None => {
                    settings("requestRedirect", self.request_redirect).map(Filter::RequestRedirect)
                }
            },
            "URLRewrite" => match http_only(kind) {
                Some(reason) => Err(reason),
                None => settings("urlRewrite", self.url_rewrite).map(Filter::UrlRewrite),
            },
            other => Err(format!(
                "remora does not support the filter type {other:?} (it supports \
                 RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite and \
                 RequestMirror)"
            )),
        };
        result.unwrap_or_else(unsupported)
    }
}

fn filters<'de, D: Deserializer<'de>>(
    deserializer: D,
    kind: RouteKind,
) -> Result<Vec<Filter>, D::Error> {
    let raw = Vec::<RawFilter>::deserialize(deserializer)?;
    Ok(raw
        .into_iter()
        .map(|filter| filter.into_filter(kind))
        .collect())
}

fn http_filters<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Filter>, D::Error> {
    filters(deserializer, RouteKind::Http)
}

fn grpc_filters<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Filter>, D::Error> {
    filters(deserializer, RouteKind::Grpc)
}

/// `gateway.networking.k8s.io/v1beta1` ReferenceGrant: lets objects of other namespaces refer
/// to objects of its own (here: a route's backendRef to a Service).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

/// Who may refer: objects of a group and kind in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReferenceGrantFrom {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// What they may refer to, in the grant's own namespace: one object by name, or every one of
/// the kind when no name is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReferenceGrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether a `from_kind` (a Gateway API route kind) in `from_namespace` may refer to the
    /// Service `service` in this grant's namespace.
    pub fn allows_service(&self, from_kind: &str, from_namespace: &str, service: &str) -> bool {
        let from = self.spec.from.iter().any(|from| {
            from.group == GATEWAY_GROUP
                && from.kind == from_kind
                && from.namespace == from_namespace
        });
        let to = self.spec.to.iter().any(|to| {
            to.group == CORE_GROUP
                && to.kind == "Service"
                && to.name.as_deref().is_none_or(|name| name == service)
        });
        from && to
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a Gateway API duration (expected 1 to 4 groups of up to 5 digits and a unit h, m, s or ms, e.g. 10s, 1m30s, 500ms)")]
pub struct DurationError {
    pub value: String,
}

/// Reads a Gateway API duration (GEP-2257): `^([0-9]{1,5}(h|m|s|ms)){1,4}$`.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let error = || DurationError {
        value: value.to_string(),
    };
    let mut rest = value;
    let mut total = Duration::ZERO;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 || digits > 5 {
            return Err(error());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| error())?;
        rest = &rest[digits..];
        let (unit, length) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(error());
        };
        rest = &rest[length..];
        // At most 99999 h per group and 4 groups: no overflow.
        total += unit * u32::try_from(number).map_err(|_| error())?;
        groups += 1;
    }
    if groups == 0 || groups > 4 {
        return Err(error());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use serde_json::json;

    fn http(spec: serde_json::Value) -> HttpRoute {
        serde_json::from_value(json!({"metadata": {"name": "r", "namespace": "ns"}, "spec": spec}))
            .unwrap()
    }

    fn grpc(spec: serde_json::Value) -> GrpcRoute {
        serde_json::from_value(json!({"metadata": {"name": "r", "namespace": "ns"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn an_http_route_without_rules_gets_one_rule_matching_every_path() {
        let route = http(json!({"parentRefs": [{"name": "svc", "group": "", "kind": "Service"}]}));
        assert_eq!(route.spec.rules.len(), 1);
        assert_eq!(route.spec.rules[0].matches, vec![HttpRouteMatch::default()]);
        assert_eq!(
            route.spec.rules[0].matches[0].path.match_type,
            PathMatchType::PathPrefix
        );
        assert_eq!(route.spec.rules[0].matches[0].path.value, "/");
    }

    #[test]
    fn schema_defaults_are_applied_where_fields_are_absent() {
        let route = http(json!({
            "parentRefs": [{"name": "gw"}],
            "rules": [
                {"backendRefs": [{"name": "a"}]},
                {"matches": [
                    {"headers": [{"name": "x", "value": "1"}], "queryParams": [{"name": "q", "value": "2"}]},
                    {"path": {"type": "Exact"}},
                    {"path": {"value": "/p"}},
                ],
                 "filters": [
                    {"type": "RequestRedirect", "requestRedirect": {"hostname": "h"}},
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "m"}, "fraction": {"numerator": 1}}},
                 ]},
            ],
        }));
        let parent = &route.spec.parent_refs[0];
        assert_eq!(
            (parent.group.as_str(), parent.kind.as_str()),
            (GATEWAY_GROUP, "Gateway")
        );
        assert!(!parent.is_service());
        let rules = &route.spec.rules;
        assert_eq!(rules[0].matches, vec![HttpRouteMatch::default()]);
        let backend = &rules[0].backend_refs[0].backend;
        assert_eq!(backend.weight, 1);
        assert!(backend.object.is_service());
        let matches = &rules[1].matches;
        assert_eq!(matches[0].path, PathMatch::default());
        assert_eq!(matches[0].headers[0].match_type, MatchType::Exact);
        assert_eq!(matches[0].query_params[0].match_type, MatchType::Exact);
        assert_eq!(matches[1].path.value, "/");
        assert_eq!(matches[1].path.match_type, PathMatchType::Exact);
        assert_eq!(matches[2].path.match_type, PathMatchType::PathPrefix);
        let Filter::RequestRedirect(redirect) = &rules[1].filters[0] else {
            panic!("{:?}", rules[1].filters[0]);
        };
        assert_eq!(redirect.status_code, 302);
        let Filter::RequestMirror(mirror) = &rules[1].filters[1] else {
            panic!("{:?}", rules[1].filters[1]);
        };
        assert_eq!(
            mirror.fraction,
            Some(Fraction {
                numerator: 1,
                denominator: 100
            })
        );
        assert!(mirror.backend_ref.is_service());
    }

    #[test]
    fn an_empty_match_list_is_kept_as_written() {
        let route = http(json!({"rules": [{"matches": []}]}));
        assert!(route.spec.rules[0].matches.is_empty());
    }

    #[test]
    fn unknown_enum_values_are_kept_not_refused() {
        let route = http(json!({"rules": [{
            "matches": [{"path": {"type": "Glob", "value": "/*"}, "headers": [{"type": "Fuzzy", "name": "a", "value": "b"}]}],
            "filters": [
                {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceSuffix", "replaceSuffix": "x"}}},
                {"type": "FutureFilter", "futureFilter": {"a": 1}},
            ],
        }]}));
        let rule = &route.spec.rules[0];
        assert_eq!(
            rule.matches[0].path.match_type,
            PathMatchType::Unknown("Glob".into())
        );
        assert_eq!(
            rule.matches[0].headers[0].match_type,
            MatchType::Unknown("Fuzzy".into())
        );
        let Filter::UrlRewrite(rewrite) = &rule.filters[0] else {
            panic!("{:?}", rule.filters[0]);
        };
        assert_eq!(
            rewrite.path.as_ref().map(|path| &path.modifier_type),
            Some(&PathModifierType::Unknown("ReplaceSuffix".into()))
        );
        assert!(matches!(
            &rule.filters[1],
            Filter::Unsupported { filter_type, .. } if filter_type == "FutureFilter"
        ));
    }

    #[test]
    fn filters_that_cannot_be_honoured_become_unsupported_with_a_reason() {
        let cases = [
            (
                "missing settings",
                json!({"type": "RequestHeaderModifier"}),
                "no `requestHeaderModifier` settings",
            ),
            (
                "bad settings",
                json!({"type": "RequestRedirect", "requestRedirect": {"port": "eighty"}}),
                "`requestRedirect.port`",
            ),
            (
                "supported elsewhere only",
                json!({"type": "CORS", "cors": {}}),
                "does not support the filter type \"CORS\"",
            ),
        ];
        for (case, filter, reason_part) in cases {
            let route = http(json!({"rules": [{"filters": [filter]}]}));
            match &route.spec.rules[0].filters[0] {
                Filter::Unsupported { reason, .. } => {
                    assert!(reason.contains(reason_part), "{case}: {reason}")
                }
                other => panic!("{case}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_extension_ref_is_kept_so_its_rule_can_be_refused() {
        let route = http(json!({"rules": [{"filters": [
            {"type": "ExtensionRef", "extensionRef": {"group": "example.com", "kind": "Thing", "name": "t"}},
        ]}]}));
        assert_eq!(
            route.spec.rules[0].filters[0],
            Filter::ExtensionRef(LocalObjectReference {
                group: "example.com".into(),
                kind: "Thing".into(),
                name: "t".into(),
            })
        );
    }

    #[test]
    fn backend_filters_timeouts_retry_and_names_are_read() {
        let route = http(json!({"rules": [{
            "name": "first",
            "backendRefs": [{"name": "b", "namespace": "other", "port": 8080, "weight": 0, "filters": [
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "a", "value": "b"}], "remove": ["c"]}},
            ]}],
            "timeouts": {"request": "10s", "backendRequest": "500ms"},
            "retry": {"codes": [503], "attempts": 2, "backoff": "100ms"},
        }]}));
        let rule = &route.spec.rules[0];
        assert_eq!(rule.name.as_deref(), Some("first"));
        let backend = &rule.backend_refs[0];
        assert_eq!(backend.backend.weight, 0);
        assert_eq!(backend.backend.object.port, Some(8080));
        assert_eq!(backend.backend.object.namespace.as_deref(), Some("other"));
        assert_eq!(
            backend.filters,
            vec![Filter::ResponseHeaderModifier(HeaderModifier {
                set: vec![HttpHeader {
                    name: "a".into(),
                    value: "b".into()
                }],
                add: Vec::new(),
                remove: vec!["c".into()],
            })]
        );
        assert_eq!(
            rule.timeouts,
            Some(HttpRouteTimeouts {
                request: Some("10s".into()),
                backend_request: Some("500ms".into()),
            })
        );
        assert_eq!(
            rule.retry,
            Some(HttpRouteRetry {
                codes: vec![503],
                attempts: Some(2),
                backoff: Some("100ms".into())
            })
        );
    }

    #[test]
    fn grpc_routes_read_method_matches_and_refuse_http_only_filters() {
        let route = grpc(json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "svc", "port": 9000}],
            "rules": [{
                "matches": [{"method": {"service": "echo.Echo", "method": "Say"}, "headers": [{"name": "a", "value": "b"}]}, {}],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x", "value": "y"}]}},
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "h"}},
                ],
                "backendRefs": [{"name": "svc", "port": 9000}],
            }],
        }));
        assert!(route.spec.parent_refs[0].is_service());
        assert_eq!(route.spec.parent_refs[0].port, Some(9000));
        let rule = &route.spec.rules[0];
        let method = rule.matches[0].method.as_ref().unwrap();
        assert_eq!(method.match_type, MatchType::Exact);
        assert_eq!(method.service.as_deref(), Some("echo.Echo"));
        assert_eq!(rule.matches[1], GrpcRouteMatch::default());
        assert!(matches!(rule.filters[0], Filter::RequestHeaderModifier(_)));
        assert!(matches!(
            &rule.filters[1],
            Filter::Unsupported { reason, .. } if reason.contains("not a GRPCRoute filter")
        ));
        assert_eq!(rule.backend_refs[0].backend.weight, 1);
    }

    #[test]
    fn a_reference_grant_allows_what_it_names_only() {
        let grant: ReferenceGrant = serde_json::from_value(json!({
            "metadata": {"name": "g", "namespace": "data"},
            "spec": {
                "from": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "namespace": "shop"}],
                "to": [{"group": "", "kind": "Service", "name": "db"}],
            },
        }))
        .unwrap();
        assert!(grant.allows_service("HTTPRoute", "shop", "db"));
        assert!(!grant.allows_service("GRPCRoute", "shop", "db"));
        assert!(!grant.allows_service("HTTPRoute", "other", "db"));
        assert!(!grant.allows_service("HTTPRoute", "shop", "cache"));
        let mut any_service = grant.clone();
        any_service.spec.to[0].name = None;
        assert!(any_service.allows_service("HTTPRoute", "shop", "cache"));
        let mut gateways = grant;
        gateways.spec.to[0].kind = "Gateway".into();
        assert!(!gateways.allows_service("HTTPRoute", "shop", "db"));
    }

    #[test]
    fn a_grpc_route_without_rules_has_none() {
        assert!(grpc(json!({})).spec.rules.is_empty());
    }

    #[test]
    fn durations_read_as_gep_2257_writes_them() {
        let cases = [
            ("seconds", "10s", Some(Duration::from_secs(10))),
            ("milliseconds", "500ms", Some(Duration::from_millis(500))),
            (
                "compound",
                "1h2m3s4ms",
                Some(Duration::from_millis(3_723_004)),
            ),
            ("zero", "0s", Some(Duration::ZERO)),
            ("empty", "", None),
            ("no unit", "10", None),
            ("six digits", "100000s", None),
            ("five groups", "1h1m1s1ms1s", None),
            ("fraction", "1.5s", None),
            ("unknown unit", "1d", None),
            ("negative", "-1s", None),
        ];
        for (case, text, expected) in cases {
            assert_eq!(parse_duration(text).ok(), expected, "{case}");
        }
    }
}
