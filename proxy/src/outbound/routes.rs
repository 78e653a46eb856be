//! A Service's routes (Gateway API HTTPRoute and GRPCRoute, resolved by remora-control into a
//! `RouteTable`) compiled once per snapshot, and the per-request match: the first entry, in the
//! precedence order the control plane sent, whose path, method, headers and query parameters all
//! match.
//!
//! Everything a request needs is checked and built here, once: regular expressions (whole-value
//! matches), header names and values of the filters, timeouts. A rule with anything that does
//! not compile is kept as invalid: the requests it matches get 500 and nothing of it applies.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use regex::Regex;
use remora_api::discovery as api;
use remora_api::discovery::{filter, path_match, path_modifier, value_match};

/// A Service port's routes, as one snapshot described them.
#[derive(Debug)]
pub struct Routes {
    matches: Vec<Match>,
    pub rules: Vec<Rule>,
    pub backends: Vec<Backend>,
}

/// One Service a rule sends to (or mirrors to).
#[derive(Debug, Clone)]
pub struct Backend {
    pub key: BackendKey,
    /// False when it does not exist or may not be referred to: its share answers 500.
    pub resolved: bool,
    /// Its ready endpoints, sorted.
    pub endpoints: Vec<crate::client::Endpoint>,
}

/// What identifies a backend across snapshots, so that its balancer keeps what it learned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub namespace: String,
    pub name: String,
    pub port: u32,
}

/// One rule of a route.
#[derive(Debug)]
pub struct Rule {
    /// The route's name: the `route` label of its requests.
    pub route: Arc<str>,
    /// Why the rule cannot be honoured; its requests get 500.
    pub invalid: Option<String>,
    pub filters: Filters,
    pub backends: Vec<WeightedBackend>,
    total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

#[derive(Debug)]
pub struct WeightedBackend {
    /// Index into [`Routes::backends`].
    pub backend: usize,
    pub weight: u32,
    pub filters: Filters,
}

/// A rule's or a backend's filters, by kind.
#[derive(Debug, Default)]
pub struct Filters {
    pub request_headers: Vec<HeaderModifier>,
    pub response_headers: Vec<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_empty()
            && self.response_headers.is_empty()
            && self.redirect.is_none()
            && self.rewrite.is_none()
            && self.mirrors.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// Which part of the path a redirect or rewrite replaces, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: StatusCode,
}

#[derive(Debug)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug)]
pub struct Mirror {
    /// Index into [`Routes::backends`].
    pub backend: usize,
    pub numerator: u32,
    pub denominator: u32,
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    pub backoff: Duration,
}

/// One match, compiled.
#[derive(Debug)]
struct Match {
    rule: usize,
    path: PathMatch,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    /// The prefix without its trailing slashes ("" for "/"): matched by whole segments.
    Prefix(String),
    Regex(Regex),
    /// A match that could not be compiled (its rule is invalid).
    Never,
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

/// What a request matched: its rule and the path prefix that a `ReplacePrefixMatch` replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'a> {
    pub rule: usize,
    /// The matched prefix without trailing slash: a PathPrefix match's value, an Exact match's
    /// whole path, "" (the root) for a regular expression or no path match.
    pub prefix: &'a str,
}

/// The regular expressions of the previous snapshot's routes, by their compiled pattern: a new
/// snapshot (endpoints change far more often than routes) takes them instead of compiling
/// them again, which for thousands of them would cost the admin thread a second each time.
type Compiled = HashMap<String, Regex>;

/// Compiles `pattern` to match whole values only (RE2 syntax, as the Gateway API says).
fn full_match(pattern: &str, compiled: &Compiled) -> Result<Regex, String> {
    let anchored = format!("^(?:{pattern})$");
    if let Some(regex) = compiled.get(&anchored) {
        return Ok(regex.clone());
    }
    Regex::new(&anchored).map_err(|error| format!("regex {pattern:?}: {error}"))
}

impl Routes {
    /// `None` when the table has no rules: the Service's own endpoints take every request.
    /// `target` names the destination in the logs of endpoints that do not parse; `previous`
    /// is the target's routes before, whose regular expressions are reused.
    pub fn compile(
        table: &api::RouteTable,
        target: SocketAddr,
        previous: Option<&Routes>,
    ) -> Option<Routes> {
        if table.rules.is_empty() {
            return None;
        }
        let compiled = previous.map(Routes::regexes).unwrap_or_default();
        let backends: Vec<Backend> = table
            .backends
            .iter()
            .map(|backend| Backend {
                key: BackendKey {
                    namespace: backend.namespace.clone(),
                    name: backend.name.clone(),
                    port: backend.port,
                },
                resolved: backend.resolved,
                endpoints: crate::client::Endpoint::from_snapshot(&backend.endpoints, target),
            })
            .collect();
        let mut rules: Vec<Rule> = table
            .rules
            .iter()
            .map(|rule| Rule::compile(rule, backends.len()))
            .collect();
        let mut matches = Vec::with_capacity(table.matches.len());
        for entry in &table.matches {
            let rule = entry.rule as usize;
            let Some(target_rule) = rules.get_mut(rule) else {
                continue;
            };
            match Match::compile(entry, rule, &compiled) {
                Ok(compiled) => matches.push(compiled),
                Err(why) => {
                    // The rule still answers 500 for its other matches; this one cannot be
                    // evaluated, so it matches nothing.
                    target_rule.invalid.get_or_insert(why);
                    matches.push(Match {
                        rule,
                        path: PathMatch::Never,
                        method: None,
                        headers: Vec::new(),
                        query: Vec::new(),
                    });
                }
            }
        }
        Some(Routes {
            matches,
            rules,
            backends,
        })
    }

    fn regexes(&self) -> Compiled {
        let mut compiled = Compiled::new();
        let mut keep = |regex: &Regex| {
            compiled.insert(regex.as_str().to_string(), regex.clone());
        };
        for entry in &self.matches {
            if let PathMatch::Regex(regex) = &entry.path {
                keep(regex);
            }
            let values = entry.headers.iter().map(|(_, value)| value);
            for value in values.chain(entry.query.iter().map(|(_, value)| value)) {
                if let ValueMatch::Regex(regex) = value {
                    keep(regex);
                }
            }
        }
        compiled
    }

    /// The first match for a request, in precedence order; `None` answers 404.
    pub fn find(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Matched<'_>> {
        let path = uri.path();
        let query = uri.query();
        self.matches
            .iter()
            .find(|entry| entry.matches(method, path, query, headers))
            .map(|entry| Matched {
                rule: entry.rule,
                prefix: match &entry.path {
                    PathMatch::Prefix(prefix) | PathMatch::Exact(prefix) => {
                        prefix.trim_end_matches('/')
                    }
                    _ => "",
                },
            })
    }
}

impl Match {
    fn compile(entry: &api::RouteMatch, rule: usize, compiled: &Compiled) -> Result<Match, String> {
        let path = match &entry.path {
            None => PathMatch::Any,
            Some(path) => match path_match::Kind::try_from(path.kind) {
                Ok(path_match::Kind::Exact) => PathMatch::Exact(path.value.clone()),
                Ok(path_match::Kind::Prefix) => {
                    PathMatch::Prefix(path.value.trim_end_matches('/').to_string())
                }
                Ok(path_match::Kind::Regex) => PathMatch::Regex(full_match(&path.value, compiled)?),
                Err(_) => return Err(format!("path match kind {}", path.kind)),
            },
        };
        let method = match entry.method.as_str() {
            "" => None,
            method => Some(
                Method::from_bytes(method.as_bytes()).map_err(|_| format!("method {method:?}"))?,
            ),
        };
        let mut headers: Vec<(HeaderName, ValueMatch)> = Vec::new();
        for header in &entry.headers {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| format!("header name {:?}", header.name))?;
            // Only the first of several matches on one name counts (Gateway API).
            if headers.iter().all(|(have, _)| *have != name) {
                headers.push((name, ValueMatch::compile(header, compiled)?));
            }
        }
        let mut query: Vec<(String, ValueMatch)> = Vec::new();
        for param in &entry.query_params {
            if query.iter().all(|(have, _)| *have != param.name) {
                query.push((param.name.clone(), ValueMatch::compile(param, compiled)?));
            }
        }
        Ok(Match {
            rule,
            path,
            method,
            headers,
            query,
        })
    }

    fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> bool {
        let path_matches = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => path_has_prefix(path, prefix),
            PathMatch::Regex(regex) => regex.is_match(path),
            PathMatch::Never => false,
        };
        path_matches
            && self.method.as_ref().is_none_or(|want| want == method)
            && self.headers.iter().all(|(name, want)| {
                header_value(headers, name).is_some_and(|value| want.matches_bytes(&value))
            })
            && self.query.iter().all(|(name, want)| {
                query_value(query, name).is_some_and(|value| want.matches(&value))
            })
    }
}

impl ValueMatch {
    fn compile(value: &api::ValueMatch, compiled: &Compiled) -> Result<ValueMatch, String> {
        match value_match::Kind::try_from(value.kind) {
            Ok(value_match::Kind::Exact) => Ok(ValueMatch::Exact(value.value.clone())),
            Ok(value_match::Kind::Regex) => {
                Ok(ValueMatch::Regex(full_match(&value.value, compiled)?))
            }
            Err(_) => Err(format!("value match kind {}", value.kind)),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(exact) => value == exact,
            ValueMatch::Regex(regex) => regex.is_match(value),
        }
    }

    fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(exact) => value == exact.as_bytes(),
            ValueMatch::Regex(regex) => std::str::from_utf8(value).is_ok_and(|v| regex.is_match(v)),
        }
    }
}

/// Whether `path` starts with the path segments of `prefix` (given without trailing slash):
/// "/foo" takes "/foo", "/foo/" and "/foo/bar", not "/foobar"; "" takes every path.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Up to this many header lines, a request's headers are scanned for a name rather than looked
/// up: comparing a few names costs less than hashing the one looked for, which a table with
/// several header matches would do for each of them on every request.
const SCAN_HEADERS: usize = 8;

/// A request header's value for matching: a header sent more than once is read as its values
/// joined with commas, as RFC 9110 §5.3 says a recipient may combine them.
fn header_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Cow<'a, [u8]>> {
    if headers.len() <= SCAN_HEADERS {
        // `iter` yields each name's values together and in order, as `get_all` does.
        let mut values = headers
            .iter()
            .filter(|(have, _)| *have == name)
            .map(|(_, value)| value);
        return join(values.next()?, values);
    }
    let mut values = headers.get_all(name).iter();
    join(values.next()?, values)
}

fn join<'a>(
    first: &'a HeaderValue,
    mut values: impl Iterator<Item = &'a HeaderValue>,
) -> Option<Cow<'a, [u8]>> {
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
    }
    Some(Cow::Owned(joined))
}

/// The first value of query parameter `name` (names compared exactly after percent-decoding);
/// a parameter without `=` has the empty value.
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

/// `text` with its %XX escapes decoded (`+` is kept: it is a space only in forms); invalid
/// escapes and non-UTF-8 results are left as they came.
fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(decoded) => Cow::Owned(decoded),
        Err(_) => Cow::Borrowed(text),
    }
}

impl Rule {
    fn compile(rule: &api::RouteRule, backend_count: usize) -> Rule {
        let mut invalid = (!rule.invalid.is_empty()).then(|| rule.invalid.clone());
        let mut check = |result: Result<Filters, String>| match result {
            Ok(filters) => filters,
            Err(why) => {
                invalid.get_or_insert(why);
                Filters::default()
            }
        };
        let filters = check(Filters::compile(&rule.filters, backend_count));
        let backends: Vec<WeightedBackend> = rule
            .backends
            .iter()
            .map(|weighted| WeightedBackend {
                backend: weighted.backend as usize,
                weight: weighted.weight,
                filters: check(Filters::compile(&weighted.filters, backend_count)),
            })
            .collect();
        if let Some(out_of_range) = backends.iter().find(|b| b.backend >= backend_count) {
            invalid.get_or_insert(format!("backend index {}", out_of_range.backend));
        }
        let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
        let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Rule {
            route: Arc::from(rule.name.as_str()),
            invalid,
            filters,
            backends,
            total_weight,
            request_timeout: millis(rule.request_timeout_ms),
            backend_request_timeout: millis(rule.backend_request_timeout_ms),
            retry: rule.retry.as_ref().map(|retry| Retry {
                codes: retry
                    .codes
                    .iter()
                    .filter_map(|code| u16::try_from(*code).ok())
                    .collect(),
                attempts: retry.attempts,
                backoff: Duration::from_millis(retry.backoff_ms),
            }),
        }
    }

    /// The backend for one request, drawn by weight with `random`; `None` when the rule has no
    /// backend with a weight (500).
    pub fn choose(&self, random: u64) -> Option<&WeightedBackend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut point = random % self.total_weight;
        self.backends.iter().find(|backend| {
            let weight = u64::from(backend.weight);
            if point < weight {
                return true;
            }
            point -= weight;
            false
        })
    }
}

impl Filters {
    fn compile(filters: &[api::Filter], backend_count: usize) -> Result<Filters, String> {
        let mut out = Filters::default();
        for filter in filters {
            match &filter.kind {
                Some(filter::Kind::RequestHeaderModifier(modifier)) => {
                    out.request_headers.push(HeaderModifier::compile(modifier)?)
                }
                Some(filter::Kind::ResponseHeaderModifier(modifier)) => out
                    .response_headers
                    .push(HeaderModifier::compile(modifier)?),
                Some(filter::Kind::RequestRedirect(redirect)) => {
                    let status = match redirect.status_code {
                        0 => StatusCode::FOUND,
                        code @ (301 | 302 | 303 | 307 | 308) => {
                            StatusCode::from_u16(code as u16).map_err(|e| e.to_string())?
                        }
                        code => return Err(format!("redirect status {code}")),
                    };
                    let port = match redirect.port {
                        0 => None,
                        port => {
                            Some(u16::try_from(port).map_err(|_| format!("redirect port {port}"))?)
                        }
                    };
                    let text = |value: &str| (!value.is_empty()).then(|| value.to_string());
                    out.redirect = Some(Redirect {
                        scheme: text(&redirect.scheme).map(|scheme| scheme.to_ascii_lowercase()),
                        hostname: text(&redirect.hostname),
                        port,
                        path: redirect
                            .path
                            .as_ref()
                            .map(PathModifier::compile)
                            .transpose()?,
                        status,
                    });
                }
                Some(filter::Kind::UrlRewrite(rewrite)) => {
                    let hostname = match rewrite.hostname.as_str() {
                        "" => None,
                        hostname => Some(
                            HeaderValue::from_str(hostname)
                                .map_err(|_| format!("rewrite hostname {hostname:?}"))?,
                        ),
                    };
                    out.rewrite = Some(Rewrite {
                        hostname,
                        path: rewrite
                            .path
                            .as_ref()
                            .map(PathModifier::compile)
                            .transpose()?,
                    });
                }
                Some(filter::Kind::RequestMirror(mirror)) => {
                    let backend = mirror.backend as usize;
                    if backend >= backend_count {
                        return Err(format!("mirror backend index {backend}"));
                    }
                    let (numerator, denominator) = match (mirror.numerator, mirror.denominator) {
                        (_, 0) => (1, 1),
                        fraction => fraction,
                    };
                    out.mirrors.push(Mirror {
                        backend,
                        numerator,
                        denominator,
                    });
                }
                None => return Err("a filter of a kind this proxy does not know".into()),
            }
        }
        Ok(out)
    }
}

impl HeaderModifier {
    fn compile(modifier: &api::HeaderModifier) -> Result<HeaderModifier, String> {
        let header = |header: &api::Header| {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| format!("header name {:?}", header.name))?;
            let value = HeaderValue::from_str(&header.value)
                .map_err(|_| format!("header {:?} value {:?}", header.name, header.value))?;
            Ok::<_, String>((name, value))
        };
        Ok(HeaderModifier {
            set: modifier.set.iter().map(header).collect::<Result<_, _>>()?,
            add: modifier.add.iter().map(header).collect::<Result<_, _>>()?,
            remove: modifier
                .remove
                .iter()
                .map(|name| {
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("header name {name:?}"))
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl PathModifier {
    fn compile(modifier: &api::PathModifier) -> Result<PathModifier, String> {
        match path_modifier::Kind::try_from(modifier.kind) {
            Ok(path_modifier::Kind::ReplaceFullPath) => {
                Ok(PathModifier::Full(modifier.value.clone()))
            }
            Ok(path_modifier::Kind::ReplacePrefixMatch) => {
                Ok(PathModifier::Prefix(modifier.value.clone()))
            }
            Err(_) => Err(format!("path modifier kind {}", modifier.kind)),
        }
    }
}

thread_local! {
    static RANDOM: Cell<u64> = Cell::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1,
    );
}

/// A random number for weights and mirror fractions, from this worker's xorshift64*.
pub fn random() -> u64 {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request's header lines, in a table row.
    type Headers = &'static [(&'static str, &'static str)];

    pub(crate) fn path(kind: path_match::Kind, value: &str) -> Option<api::PathMatch> {
        Some(api::PathMatch {
            kind: kind as i32,
            value: value.into(),
        })
    }

    pub(crate) fn value(kind: value_match::Kind, name: &str, value: &str) -> api::ValueMatch {
        api::ValueMatch {
            kind: kind as i32,
            name: name.into(),
            value: value.into(),
        }
    }

    pub(crate) fn rule(name: &str) -> api::RouteRule {
        api::RouteRule {
            kind: "HTTPRoute".into(),
            namespace: "shop".into(),
            name: name.into(),
            backends: vec![api::WeightedBackend {
                backend: 0,
                weight: 1,
                filters: Vec::new(),
            }],
            ..Default::default()
        }
    }

    fn backend() -> api::Backend {
        api::Backend {
            namespace: "shop".into(),
            name: "cart".into(),
            port: 80,
            resolved: true,
            ..Default::default()
        }
    }

    /// A table of one rule per match, named after the match's index.
    fn table(matches: Vec<api::RouteMatch>) -> Routes {
        let rules = (0..matches.len()).map(|i| rule(&format!("r{i}"))).collect();
        let matches = matches
            .into_iter()
            .enumerate()
            .map(|(i, entry)| api::RouteMatch {
                rule: i as u32,
                ..entry
            })
            .collect();
        let table = api::RouteTable {
            matches,
            rules,
            backends: vec![backend()],
        };
        Routes::compile(&table, "198.18.0.100:80".parse().unwrap(), None).unwrap()
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        (method.parse().unwrap(), uri.parse().unwrap(), map)
    }

    fn found(routes: &Routes, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<usize> {
        let (method, uri, headers) = request(method, uri, headers);
        routes.find(&method, &uri, &headers).map(|m| m.rule)
    }

    #[test]
    fn path_matches() {
        use path_match::Kind::*;
        // (match kind, value, request path, matches)
        let cases = [
            (Exact, "/foo", "/foo", true),
            (Exact, "/foo", "/foo/", false),
            (Exact, "/foo", "/foo?x=1", true),
            (Exact, "/foo", "/Foo", false),
            (Prefix, "/foo", "/foo", true),
            (Prefix, "/foo", "/foo/", true),
            (Prefix, "/foo", "/foo/bar", true),
            (Prefix, "/foo", "/foobar", false),
            (Prefix, "/foo/", "/foo", true),
            (Prefix, "/foo/", "/foo/bar", true),
            (Prefix, "/foo/", "/foobar", false),
            (Prefix, "/", "/", true),
            (Prefix, "/", "/anything/at/all", true),
            (Prefix, "/foo/bar", "/foo/bar/baz?q=1", true),
            (Prefix, "/foo/bar", "/foo/barbaz", false),
            (Regex, "/v[0-9]+/.*", "/v2/items", true),
            (Regex, "/v[0-9]+", "/v2/items", false),
            (Regex, "/v[0-9]+", "/x/v2", false),
            (Regex, ".*/items", "/v1/items", true),
            (Regex, "/a|/b", "/b", true),
            (Regex, "/a|/b", "/ab", false),
        ];
        for (kind, value, uri, want) in cases {
            let routes = table(vec![api::RouteMatch {
                path: path(kind, value),
                ..Default::default()
            }]);
            assert_eq!(
                found(&routes, "GET", uri, &[]).is_some(),
                want,
                "{kind:?} {value:?} against {uri:?}"
            );
        }
    }

    #[test]
    fn header_matches() {
        use value_match::Kind::*;
        // (kind, name, value, request headers, matches)
        let cases: &[(value_match::Kind, &str, &str, Headers, bool)] = &[
            (Exact, "version", "two", &[("version", "two")], true),
            (Exact, "Version", "two", &[("version", "two")], true),
            (Exact, "version", "two", &[("VERSION", "two")], true),
            (Exact, "version", "two", &[("version", "Two")], false),
            (Exact, "version", "two", &[], false),
            (
                Exact,
                "version",
                "two",
                &[("version", "one"), ("version", "two")],
                false,
            ),
            (
                Exact,
                "version",
                "one,two",
                &[("version", "one"), ("version", "two")],
                true,
            ),
            (Regex, "version", "t.o", &[("version", "two")], true),
            (Regex, "version", "t", &[("version", "two")], false),
            (
                Regex,
                "version",
                ".*two",
                &[("version", "one"), ("version", "two")],
                true,
            ),
        ];
        for (kind, name, want_value, headers, want) in cases {
            let routes = table(vec![api::RouteMatch {
                headers: vec![value(*kind, name, want_value)],
                ..Default::default()
            }]);
            assert_eq!(
                found(&routes, "GET", "/", headers).is_some(),
                *want,
                "{kind:?} {name}: {want_value:?} against {headers:?}"
            );
        }
    }

    #[test]
    fn a_header_reads_the_same_from_few_headers_and_from_many() {
        let mut few = HeaderMap::new();
        let mut many = HeaderMap::new();
        for (name, value) in [("version", "one"), ("x-a", "1"), ("Version", "two")] {
            few.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        many.clone_from(&few);
        for i in 0..SCAN_HEADERS {
            many.append(
                HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("z"),
            );
        }
        assert!(few.len() <= SCAN_HEADERS && many.len() > SCAN_HEADERS);
        let name = HeaderName::from_static("version");
        for headers in [&few, &many] {
            assert_eq!(
                header_value(headers, &name).as_deref(),
                Some(&b"one,two"[..])
            );
            assert_eq!(
                header_value(headers, &HeaderName::from_static("x-a")).as_deref(),
                Some(&b"1"[..])
            );
            assert_eq!(header_value(headers, &HeaderName::from_static("x-b")), None);
        }
    }

    #[test]
    fn only_the_first_match_on_a_header_name_counts() {
        let routes = table(vec![api::RouteMatch {
            headers: vec![
                value(value_match::Kind::Exact, "version", "one"),
                value(value_match::Kind::Exact, "Version", "two"),
            ],
            ..Default::default()
        }]);
        assert_eq!(found(&routes, "GET", "/", &[("version", "one")]), Some(0));
    }

    #[test]
    fn query_matches() {
        use value_match::Kind::*;
        // (kind, name, value, request uri, matches)
        let cases = [
            (Exact, "animal", "whale", "/?animal=whale", true),
            (Exact, "animal", "whale", "/?animal=dolphin", false),
            (Exact, "animal", "whale", "/?Animal=whale", false),
            (Exact, "animal", "whale", "/?color=blue&animal=whale", true),
            (
                Exact,
                "animal",
                "whale",
                "/?animal=whale&animal=dolphin",
                true,
            ),
            (
                Exact,
                "animal",
                "whale",
                "/?animal=dolphin&animal=whale",
                false,
            ),
            (Exact, "animal", "whale", "/", false),
            (Exact, "animal", "", "/?animal", true),
            (Exact, "animal", "blue whale", "/?animal=blue%20whale", true),
            (Regex, "animal", "wh.*", "/?animal=whale", true),
            (Regex, "animal", "wh", "/?animal=whale", false),
        ];
        for (kind, name, want_value, uri, want) in cases {
            let routes = table(vec![api::RouteMatch {
                query_params: vec![value(kind, name, want_value)],
                ..Default::default()
            }]);
            assert_eq!(
                found(&routes, "GET", uri, &[]).is_some(),
                want,
                "{kind:?} {name}={want_value:?} against {uri:?}"
            );
        }
    }

    #[test]
    fn method_matches() {
        let routes = table(vec![api::RouteMatch {
            method: "POST".into(),
            ..Default::default()
        }]);
        assert_eq!(found(&routes, "POST", "/", &[]), Some(0));
        assert_eq!(found(&routes, "GET", "/", &[]), None);
    }

    #[test]
    fn the_first_match_in_the_order_given_wins_and_none_is_a_404() {
        use path_match::Kind::*;
        let routes = table(vec![
            api::RouteMatch {
                path: path(Exact, "/exact"),
                ..Default::default()
            },
            api::RouteMatch {
                path: path(Prefix, "/v2"),
                headers: vec![value(value_match::Kind::Exact, "version", "two")],
                ..Default::default()
            },
            api::RouteMatch {
                path: path(Prefix, "/v2"),
                ..Default::default()
            },
            api::RouteMatch {
                path: path(Prefix, "/"),
                method: "GET".into(),
                ..Default::default()
            },
        ]);
        let cases: &[(&str, &str, Headers, Option<usize>)] = &[
            ("GET", "/exact", &[], Some(0)),
            ("GET", "/v2/x", &[("version", "two")], Some(1)),
            ("GET", "/v2/x", &[], Some(2)),
            ("POST", "/v2", &[], Some(2)),
            ("GET", "/other", &[], Some(3)),
            ("POST", "/other", &[], None),
        ];
        for (method, uri, headers, want) in cases {
            assert_eq!(
                found(&routes, method, uri, headers),
                *want,
                "{method} {uri} {headers:?}"
            );
        }
    }

    #[test]
    fn a_match_whose_regex_does_not_compile_matches_nothing_and_makes_its_rule_invalid() {
        let routes = table(vec![
            api::RouteMatch {
                path: path(path_match::Kind::Regex, "/(unclosed"),
                ..Default::default()
            },
            api::RouteMatch::default(),
        ]);
        assert_eq!(found(&routes, "GET", "/(unclosed", &[]), Some(1));
        assert!(routes.rules[0]
            .invalid
            .as_deref()
            .unwrap()
            .contains("regex"));
        assert!(routes.rules[1].invalid.is_none());
    }

    #[test]
    fn the_matched_prefix_is_what_a_prefix_rewrite_replaces() {
        use path_match::Kind::*;
        for (kind, value, uri, prefix) in [
            (Prefix, "/prefix/one", "/prefix/one/two", "/prefix/one"),
            (Prefix, "/prefix/one/", "/prefix/one/two", "/prefix/one"),
            (Prefix, "/", "/x", ""),
            (Exact, "/exact", "/exact", "/exact"),
            (Regex, "/r.*", "/regex", ""),
        ] {
            let routes = table(vec![api::RouteMatch {
                path: path(kind, value),
                ..Default::default()
            }]);
            let (method, uri, headers) = request("GET", uri, &[]);
            assert_eq!(routes.find(&method, &uri, &headers).unwrap().prefix, prefix);
        }
    }

    #[test]
    fn weights_split_and_zero_takes_nothing() {
        let mut rule = rule("split");
        rule.backends = vec![
            api::WeightedBackend {
                backend: 0,
                weight: 3,
                filters: Vec::new(),
            },
            api::WeightedBackend {
                backend: 1,
                weight: 0,
                filters: Vec::new(),
            },
            api::WeightedBackend {
                backend: 2,
                weight: 1,
                filters: Vec::new(),
            },
        ];
        let compiled = Rule::compile(&rule, 3);
        let mut counts = [0; 3];
        for random in 0..4000 {
            counts[compiled.choose(random).unwrap().backend] += 1;
        }
        assert_eq!(counts, [3000, 0, 1000]);

        rule.backends.iter_mut().for_each(|b| b.weight = 0);
        assert!(Rule::compile(&rule, 3).choose(7).is_none());
        rule.backends.clear();
        assert!(Rule::compile(&rule, 3).choose(7).is_none());
    }

    #[test]
    fn rules_that_cannot_be_honoured_are_invalid() {
        let mut bad_header = rule("bad-header");
        bad_header.filters.push(api::Filter {
            kind: Some(filter::Kind::RequestHeaderModifier(api::HeaderModifier {
                set: vec![api::Header {
                    name: "bad name".into(),
                    value: "x".into(),
                }],
                ..Default::default()
            })),
        });
        let mut unknown = rule("unknown-filter");
        unknown.filters.push(api::Filter { kind: None });
        let mut said = rule("said-so");
        said.invalid = "unknown filter kind".into();
        let mut status = rule("bad-status");
        status.filters.push(api::Filter {
            kind: Some(filter::Kind::RequestRedirect(api::RequestRedirect {
                status_code: 404,
                ..Default::default()
            })),
        });
        let mut index = rule("bad-index");
        index.backends[0].backend = 5;
        for rule in [bad_header, unknown, said, status, index] {
            assert!(Rule::compile(&rule, 1).invalid.is_some(), "{}", rule.name);
        }
        assert!(Rule::compile(&rule("fine"), 1).invalid.is_none());
    }

    #[test]
    fn an_empty_table_is_no_routes() {
        assert!(Routes::compile(
            &api::RouteTable::default(),
            "198.18.0.1:80".parse().unwrap(),
            None
        )
        .is_none());
    }

    #[test]
    fn ten_thousand_rules_compile_and_the_last_still_matches() {
        let matches = (0..10_000)
            .map(|i| api::RouteMatch {
                path: path(path_match::Kind::Prefix, &format!("/r{i}")),
                headers: vec![value(value_match::Kind::Exact, "x-rule", &i.to_string())],
                ..Default::default()
            })
            .collect();
        let routes = table(matches);
        assert_eq!(routes.rules.len(), 10_000);
        assert!(routes.rules.iter().all(|rule| rule.invalid.is_none()));
        assert_eq!(
            found(&routes, "GET", "/r9999/x", &[("x-rule", "9999")]),
            Some(9999)
        );
        assert_eq!(found(&routes, "GET", "/r9999/x", &[("x-rule", "1")]), None);
    }

    #[test]
    fn a_new_snapshot_reuses_the_regexes_it_had() {
        let entry = |pattern: &str| api::RouteMatch {
            path: path(path_match::Kind::Regex, pattern),
            headers: vec![value(value_match::Kind::Regex, "x-v", "v[0-9]")],
            ..Default::default()
        };
        let before = table(vec![entry("/a/.*")]);
        let compiled = before.regexes();
        let mut keys: Vec<&str> = compiled.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["^(?:/a/.*)$", "^(?:v[0-9])$"]);
        // Taken from what was compiled, not compiled again: a planted entry proves the lookup.
        let mut planted = Compiled::new();
        planted.insert("^(?:/a)$".into(), Regex::new("^/b$").unwrap());
        assert!(full_match("/a", &planted).unwrap().is_match("/b"));
        assert!(full_match("/c", &planted).unwrap().is_match("/c"));
    }
}
