//! Who a token belongs to: a TokenReview by the Kubernetes API (audience `remora.io/identity`),
//! or, without a cluster, kube-apiserver's static token file (`--identity-tokens`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// The audience the injected projected token is minted for, and the TokenReview asks for.
pub const AUDIENCE: &str = "remora.io/identity";

/// What a review says of a token's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to, when the API says (`authentication.kubernetes.io/pod-name`).
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The token is not valid (unknown, expired, another audience).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid, but not a ServiceAccount's.
    #[error(
        "the token's user {0:?} is not a ServiceAccount (system:serviceaccount:NAMESPACE:NAME)"
    )]
    NotServiceAccount(String),
    /// The review could not be made (the API down, refused, timed out): ask again later.
    #[error("{0}")]
    Unavailable(String),
}

/// The namespace and name of a ServiceAccount user, `system:serviceaccount:NS:SA`.
pub fn service_account(user: &str) -> Result<(String, String), ReviewError> {
    let bad = || ReviewError::NotServiceAccount(user.to_string());
    let rest = user
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(bad)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(bad)?;
    // Names as Kubernetes allows them (DNS subdomains): nothing that could bend the URI.
    let valid = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !valid(namespace) || !valid(name) {
        return Err(bad());
    }
    Ok((namespace.to_string(), name.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {message} (expected token,user,uid[,\"group1,group2\"])", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// kube-apiserver's static token file: CSV lines `token,user,uid[,"group1,group2"]`. Re-read
/// when the file changes; a file that no longer reads keeps the tokens read before (logged).
#[derive(Debug)]
pub struct StaticTokens {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Debug)]
struct TokenState {
    modified: Option<SystemTime>,
    users: HashMap<String, String>,
}

impl StaticTokens {
    /// Reads `path` now: an error names the file and line.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let modified = modified(path);
        let users = read_token_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new(TokenState { modified, users }),
        })
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.state().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The user of `token`, re-reading the file first if it changed.
    pub fn user(&self, token: &str) -> Option<String> {
        let now_modified = modified(&self.path);
        let mut state = self.state();
        if now_modified != state.modified {
            state.modified = now_modified;
            match read_token_file(&self.path) {
                Ok(users) => {
                    tracing::info!(file = %self.path.display(), tokens = users.len(), "identity tokens re-read");
                    state.users = users;
                }
                Err(error) => {
                    tracing::warn!(%error, "identity tokens: the file changed and does not read; keeping the tokens read before");
                }
            }
        }
        state.users.get(token).cloned()
    }

    pub fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let user = self.user(token).ok_or_else(|| {
            ReviewError::Unauthenticated("the token is not in the --identity-tokens file".into())
        })?;
        let (namespace, service_account) = service_account(&user)?;
        Ok(Reviewed {
            namespace,
            service_account,
            pod: None,
        })
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_token_file(path: &Path) -> Result<HashMap<String, String>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_tokens(&text).map_err(|(line, message)| TokenFileError::Line {
        path: path.to_path_buf(),
        line,
        message,
    })
}

/// Token → user, from the file's text; an error is the 1-based line and what is wrong.
pub fn parse_tokens(text: &str) -> Result<HashMap<String, String>, (usize, String)> {
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields = csv_fields(line).ok_or((number, "an unterminated quote".to_string()))?;
        if fields.len() < 3 {
            return Err((
                number,
                format!("{} fields, at least 3 needed", fields.len()),
            ));
        }
        if fields.len() > 4 {
            return Err((number, format!("{} fields, at most 4", fields.len())));
        }
        let (token, user) = (fields[0].trim(), fields[1].trim());
        if token.is_empty() || user.is_empty() {
            return Err((number, "an empty token or user".to_string()));
        }
        if users.insert(token.to_string(), user.to_string()).is_some() {
            return Err((number, "a token given twice".to_string()));
        }
    }
    Ok(users)
}

/// One CSV line's fields (RFC 4180 quoting: `"a,b"`, `""` for a quote); `None` when a quote is
/// left open.
fn csv_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    if quoted {
        return None;
    }
    fields.push(field);
    Some(fields)
}

/// The TokenReview of the Kubernetes API.
#[cfg(feature = "cluster")]
pub mod cluster {
    use std::time::Duration;

    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    use kube::api::{Api, PostParams};

    use super::{service_account, ReviewError, Reviewed, AUDIENCE};

    /// How long a review may take before the proxy is told to ask again.
    const TIMEOUT: Duration = Duration::from_secs(5);
    /// The user extra the API server sets for a token bound to a pod.
    pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

    #[derive(Clone)]
    pub struct TokenReviewer {
        client: kube::Client,
    }

    impl std::fmt::Debug for TokenReviewer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("TokenReviewer")
        }
    }

    impl TokenReviewer {
        pub fn new(client: kube::Client) -> Self {
            Self { client }
        }

        pub async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
            let request = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_string(),
                    audiences: Some(vec![AUDIENCE.to_string()]),
                },
                ..TokenReview::default()
            };
            let api: Api<TokenReview> = Api::all(self.client.clone());
            let answer =
                tokio::time::timeout(TIMEOUT, api.create(&PostParams::default(), &request))
                    .await
                    .map_err(|_| {
                        ReviewError::Unavailable(format!(
                            "the TokenReview took over {TIMEOUT:?}; ask again"
                        ))
                    })?
                    .map_err(|error| {
                        ReviewError::Unavailable(format!("the TokenReview failed: {error}"))
                    })?;
            let status = answer.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                let why = status
                    .error
                    .filter(|error| !error.is_empty())
                    .unwrap_or_else(|| "no reason given".to_string());
                return Err(ReviewError::Unauthenticated(format!(
                    "the API server did not authenticate the token: {why}"
                )));
            }
            // An API server that ignores audiences answers without them: not good enough.
            if !status
                .audiences
                .iter()
                .flatten()
                .any(|audience| audience == AUDIENCE)
            {
                return Err(ReviewError::Unauthenticated(format!(
                    "the token is not for audience {AUDIENCE} (the review's audiences: {:?})",
                    status.audiences.unwrap_or_default()
                )));
            }
            let user = status.user.unwrap_or_default();
            let (namespace, service_account) =
                service_account(user.username.as_deref().unwrap_or_default())?;
            let pod = user
                .extra
                .as_ref()
                .and_then(|extra| extra.get(POD_NAME_EXTRA))
                .and_then(|values| values.first())
                .cloned();
            Ok(Reviewed {
                namespace,
                service_account,
                pod,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_users() {
        let cases: [(&str, Option<(&str, &str)>); 7] = [
            ("system:serviceaccount:shop:web", Some(("shop", "web"))),
            ("system:serviceaccount:a.b:x-1", Some(("a.b", "x-1"))),
            ("system:serviceaccount:shop", None),
            ("system:serviceaccount:shop:web:extra", None),
            ("system:serviceaccount::web", None),
            ("admin", None),
            ("system:serviceaccount:shop:we/b", None),
        ];
        for (user, expected) in cases {
            let got = service_account(user).ok();
            let expected = expected.map(|(ns, sa)| (ns.to_string(), sa.to_string()));
            assert_eq!(got, expected, "{user}");
        }
    }

    #[test]
    fn the_static_token_file_reads_as_kube_apiserver_reads_it() {
        let text = "t1,system:serviceaccount:shop:web,uid-1\n\n\
                    t2,system:serviceaccount:shop:api,uid-2,\"g1,g2\"\n\
                    \"t,3\",alice,uid-3,g\n";
        let users = parse_tokens(text).unwrap();
        assert_eq!(users["t1"], "system:serviceaccount:shop:web");
        assert_eq!(users["t2"], "system:serviceaccount:shop:api");
        assert_eq!(users["t,3"], "alice");
        let bad: [(&str, usize, &str); 4] = [
            ("t1,user", 1, "2 fields"),
            ("t1,u,1\nt2,u,2,g,extra", 2, "5 fields"),
            ("t1,u,1\n\"t2,u,2", 2, "unterminated quote"),
            ("t1,u,1\nt1,v,2", 2, "twice"),
        ];
        for (text, line, message) in bad {
            let (got_line, got) = parse_tokens(text).unwrap_err();
            assert_eq!(got_line, line, "{text}");
            assert!(got.contains(message), "{text}: {got}");
        }
    }

    #[test]
    fn a_changed_token_file_is_re_read_and_a_broken_one_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(&path, "t1,system:serviceaccount:shop:web,1\n").unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        assert_eq!(
            tokens.review("t1").unwrap(),
            Reviewed {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: None
            }
        );
        assert!(matches!(
            tokens.review("t2"),
            Err(ReviewError::Unauthenticated(_))
        ));
        let write = |text: &str, age: u64| {
            std::fs::write(&path, text).unwrap();
            // A distinct modification time, whatever the file system's resolution.
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - std::time::Duration::from_secs(age))
                .unwrap();
        };
        write("t2,system:serviceaccount:shop:api,2\nt3,bob,3\n", 100);
        assert_eq!(tokens.review("t2").unwrap().service_account, "api");
        assert!(tokens.review("t1").is_err());
        assert_eq!(
            tokens.review("t3"),
            Err(ReviewError::NotServiceAccount("bob".into()))
        );
        write("broken", 50);
        assert_eq!(tokens.review("t2").unwrap().service_account, "api");
    }
}
