//! What a route's filters do to a request or a response, as pure functions of its parts: header
//! modifiers, URL rewrites, and the `Location` of a redirect (Gateway API semantics).

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};

use super::routes::{HeaderModifier, PathModifier, Redirect, Rewrite};

impl HeaderModifier {
    /// Set replaces every value of a name, add appends to what is there (joined into one value
    /// with a comma, as the Gateway API shows it; `Set-Cookie` stays a line of its own), remove
    /// takes every value away. Names are case-insensitive, as `HeaderName`s are.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            if name == header::SET_COOKIE {
                headers.append(name.clone(), value.clone());
                continue;
            }
            let joined = {
                let mut existing = headers.get_all(name).iter().peekable();
                if existing.peek().is_none() {
                    None
                } else {
                    let mut joined = Vec::new();
                    for have in existing {
                        joined.extend_from_slice(have.as_bytes());
                        joined.push(b',');
                    }
                    joined.extend_from_slice(value.as_bytes());
                    HeaderValue::from_bytes(&joined).ok()
                }
            };
            headers.insert(name.clone(), joined.unwrap_or_else(|| value.clone()));
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// The path after a rewrite or redirect: `ReplaceFullPath` gives its value, `ReplacePrefixMatch`
/// replaces the matched `prefix` (given without trailing slash) and keeps the rest, so
/// "/prefix/one/two" with the prefix "/prefix/one" replaced by "/one" is "/one/two", and with it
/// replaced by "/" it is "/two", never "//two". The result always starts with "/".
pub fn replace_path(modifier: &PathModifier, path: &str, prefix: &str) -> String {
    let replaced = match modifier {
        PathModifier::Full(full) => full.clone(),
        PathModifier::Prefix(replacement) => {
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let mut out = replacement.trim_end_matches('/').to_string();
            out.push_str(rest);
            out
        }
    };
    if replaced.starts_with('/') {
        replaced
    } else {
        format!("/{replaced}")
    }
}

/// `uri` with its path replaced and its query kept.
pub fn with_path(uri: &Uri, path: &str) -> Uri {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    match PathAndQuery::try_from(path_and_query) {
        Ok(path_and_query) => parts.path_and_query = Some(path_and_query),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The request's host, without a port: its URI's authority (HTTP/2 `:authority`, an HTTP/1
/// absolute form) or else its `Host`.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let authority = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    Some(without_port(authority))
}

/// `host[:port]` without the port; an IPv6 literal keeps its brackets.
fn without_port(authority: &str) -> &str {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    authority.split(':').next().unwrap_or(authority)
}

impl Rewrite {
    /// Rewrites the request's host (`Host`, and the URI's authority when it has one) and path.
    pub fn apply(&self, uri: &mut Uri, headers: &mut HeaderMap, prefix: &str) {
        if let Some(path) = &self.path {
            let replaced = replace_path(path, uri.path(), prefix);
            *uri = with_path(uri, &replaced);
        }
        if let Some(hostname) = &self.hostname {
            if uri.authority().is_some() {
                if let Ok(authority) = Authority::try_from(hostname.as_bytes()) {
                    let mut parts = uri.clone().into_parts();
                    parts.authority = Some(authority);
                    if let Ok(rewritten) = Uri::from_parts(parts) {
                        *uri = rewritten;
                    }
                }
            }
            if uri.authority().is_none() || headers.contains_key(header::HOST) {
                headers.insert(header::HOST, hostname.clone());
            }
        }
    }
}

impl Redirect {
    /// The `Location` of the redirect for a request to `uri` (with `headers`) that a Service port
    /// `service_port` took, its match having matched `prefix`. The scheme and port default to
    /// those the client dialled (http and the Service port); a scheme given alone takes its
    /// well-known port; a port that is the scheme's default is left out. The query is kept.
    pub fn location(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        service_port: u16,
        prefix: &str,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = self
            .hostname
            .as_deref()
            .or_else(|| request_host(uri, headers))
            .unwrap_or("");
        let port = match (self.port, &self.scheme) {
            (Some(port), _) => port,
            (None, Some(scheme)) => well_known_port(scheme).unwrap_or(service_port),
            (None, None) => service_port,
        };
        let path = match &self.path {
            Some(modifier) => replace_path(modifier, uri.path(), prefix),
            None => uri.path().to_string(),
        };
        let mut location = format!("{scheme}://{host}");
        if well_known_port(scheme) != Some(port) {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(query) = uri.query() {
            location.push('?');
            location.push_str(query);
        }
        location
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case(Scheme::HTTP.as_str()) {
        Some(80)
    } else if scheme.eq_ignore_ascii_case(Scheme::HTTPS.as_str()) {
        Some(443)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, StatusCode};

    fn headers(lines: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn pairs(lines: &[(&str, &str)]) -> Vec<(HeaderName, HeaderValue)> {
        lines
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    fn all(map: &HeaderMap, name: &str) -> Vec<String> {
        map.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let modifier = HeaderModifier {
            set: pairs(&[("X-Header-Set", "set-overwrites-values")]),
            add: pairs(&[
                ("X-Header-Add", "add-appends-values"),
                ("x-header-add-2", "two"),
                ("set-cookie", "b=2"),
            ]),
            remove: vec![HeaderName::from_static("x-header-remove")],
        };
        let mut map = headers(&[
            ("x-header-set", "some-other-value"),
            ("x-header-set", "and-another"),
            ("X-HEADER-ADD", "some-other-value"),
            ("x-header-remove", "val"),
            ("X-Header-Remove", "val2"),
            ("set-cookie", "a=1"),
            ("keep", "me"),
        ]);
        modifier.apply(&mut map);
        assert_eq!(all(&map, "x-header-set"), ["set-overwrites-values"]);
        assert_eq!(
            all(&map, "x-header-add"),
            ["some-other-value,add-appends-values"]
        );
        assert_eq!(all(&map, "x-header-add-2"), ["two"]);
        assert!(all(&map, "x-header-remove").is_empty());
        assert_eq!(all(&map, "set-cookie"), ["a=1", "b=2"]);
        assert_eq!(all(&map, "keep"), ["me"]);
    }

    #[test]
    fn add_joins_a_repeated_header() {
        let modifier = HeaderModifier {
            add: pairs(&[("x-a", "3")]),
            ..Default::default()
        };
        let mut map = headers(&[("x-a", "1"), ("x-a", "2")]);
        modifier.apply(&mut map);
        assert_eq!(all(&map, "x-a"), ["1,2,3"]);
    }

    #[test]
    fn prefix_and_full_path_replacement() {
        use PathModifier::{Full, Prefix};
        // (modifier, request path, matched prefix, result): the Gateway API's own table, and
        // the conformance cases.
        let cases = [
            (Prefix("/xyz".into()), "/foo/bar", "/foo", "/xyz/bar"),
            (Prefix("/xyz/".into()), "/foo/bar", "/foo", "/xyz/bar"),
            (Prefix("/xyz".into()), "/foo", "/foo", "/xyz"),
            (Prefix("/xyz".into()), "/foo/", "/foo", "/xyz/"),
            (Prefix("".into()), "/foo/bar", "/foo", "/bar"),
            (Prefix("".into()), "/foo/", "/foo", "/"),
            (Prefix("".into()), "/foo", "/foo", "/"),
            (Prefix("/".into()), "/foo/", "/foo", "/"),
            (Prefix("/".into()), "/foo", "/foo", "/"),
            (
                Prefix("/one".into()),
                "/prefix/one/two",
                "/prefix/one",
                "/one/two",
            ),
            (Prefix("/one".into()), "/prefix/one", "/prefix/one", "/one"),
            (
                Prefix("/".into()),
                "/strip-prefix/three",
                "/strip-prefix",
                "/three",
            ),
            (Prefix("/".into()), "/strip-prefix", "/strip-prefix", "/"),
            (Prefix("/new".into()), "/anything", "", "/new/anything"),
            (Full("/one".into()), "/full/one/two", "/full", "/one"),
            (Full("/".into()), "/full/one", "/full", "/"),
        ];
        for (modifier, path, prefix, want) in cases {
            assert_eq!(
                replace_path(&modifier, path, prefix),
                want,
                "{modifier:?} on {path:?} (prefix {prefix:?})"
            );
        }
    }

    #[test]
    fn rewrite_keeps_the_query_and_sets_host_where_the_request_has_it() {
        let rewrite = Rewrite {
            hostname: Some(HeaderValue::from_static("one.example.org")),
            path: Some(PathModifier::Prefix("/one".into())),
        };
        // HTTP/1 origin form: Host is replaced.
        let mut uri: Uri = "/prefix/one/two?x=1&y".parse().unwrap();
        let mut map = headers(&[("host", "echo:8080")]);
        rewrite.apply(&mut uri, &mut map, "/prefix/one");
        assert_eq!(uri.to_string(), "/one/two?x=1&y");
        assert_eq!(all(&map, "host"), ["one.example.org"]);
        // HTTP/2: the authority is replaced, no Host added.
        let mut uri: Uri = "http://echo/prefix/one".parse().unwrap();
        let mut map = HeaderMap::new();
        rewrite.apply(&mut uri, &mut map, "/prefix/one");
        assert_eq!(uri.to_string(), "http://one.example.org/one");
        assert!(map.is_empty());
    }

    #[test]
    fn redirect_locations() {
        use PathModifier::{Full, Prefix};
        let redirect =
            |scheme: Option<&str>, hostname: Option<&str>, port: Option<u16>, path| Redirect {
                scheme: scheme.map(String::from),
                hostname: hostname.map(String::from),
                port,
                path,
                status: StatusCode::FOUND,
            };
        // (filter, request uri, Host, Service port, matched prefix, Location)
        let cases = [
            (
                redirect(None, Some("example.org"), None, None),
                "/hostname-redirect",
                "echo",
                80,
                "",
                "http://example.org/hostname-redirect",
            ),
            (
                redirect(None, None, None, None),
                "/x?q=1",
                "echo:80",
                80,
                "",
                "http://echo/x?q=1",
            ),
            (
                redirect(None, None, None, None),
                "/x",
                "echo",
                8080,
                "",
                "http://echo:8080/x",
            ),
            (
                redirect(None, None, Some(8083), None),
                "/port",
                "echo",
                80,
                "",
                "http://echo:8083/port",
            ),
            (
                redirect(None, Some("example.org"), Some(8083), None),
                "/p",
                "echo",
                80,
                "",
                "http://example.org:8083/p",
            ),
            (
                redirect(None, None, Some(80), None),
                "/p",
                "echo",
                8080,
                "",
                "http://echo/p",
            ),
            (
                redirect(Some("https"), None, None, None),
                "/scheme",
                "echo",
                80,
                "",
                "https://echo/scheme",
            ),
            (
                redirect(Some("https"), None, None, None),
                "/scheme",
                "echo",
                8080,
                "",
                "https://echo/scheme",
            ),
            (
                redirect(Some("https"), None, Some(8443), None),
                "/s",
                "echo",
                80,
                "",
                "https://echo:8443/s",
            ),
            (
                redirect(Some("https"), None, Some(443), None),
                "/s",
                "echo",
                80,
                "",
                "https://echo/s",
            ),
            (
                redirect(Some("http"), None, Some(443), None),
                "/s",
                "echo",
                80,
                "",
                "http://echo:443/s",
            ),
            (
                redirect(None, None, None, Some(Full("/new".into()))),
                "/full/x?a=b",
                "echo",
                80,
                "/full",
                "http://echo/new?a=b",
            ),
            (
                redirect(None, None, None, Some(Prefix("/new".into()))),
                "/original/x",
                "echo",
                80,
                "/original",
                "http://echo/new/x",
            ),
            (
                redirect(None, None, None, Some(Prefix("/".into()))),
                "/original/x",
                "echo",
                80,
                "/original",
                "http://echo/x",
            ),
            (
                redirect(None, None, None, Some(Prefix("/".into()))),
                "/original",
                "echo",
                80,
                "/original",
                "http://echo/",
            ),
            (
                redirect(None, None, None, None),
                "/v6",
                "[2001:2::1]:80",
                80,
                "",
                "http://[2001:2::1]/v6",
            ),
        ];
        for (redirect, uri, host, port, prefix, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            let map = headers(&[("host", host)]);
            assert_eq!(
                redirect.location(&uri, &map, port, prefix),
                want,
                "{redirect:?} for {uri} (Host {host}, port {port})"
            );
        }
        // HTTP/2: the host is the authority's.
        let uri: Uri = "http://echo:80/h2".parse().unwrap();
        assert_eq!(
            redirect(None, None, None, None).location(&uri, &HeaderMap::new(), 80, ""),
            "http://echo/h2"
        );
    }
}
