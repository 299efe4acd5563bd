//! OAuth 2.0 access tokens for destinations with `oauth2` (the client credentials grant,
//! RFC 6749 §4.4). Each such destination keeps one token, shared by its attempts: fetched
//! before the first, again shortly before it expires, and again when the destination
//! answers `401` to it. One fetch at a time per destination: attempts that need a token
//! meanwhile wait for that fetch instead of each asking the endpoint — and share its error
//! if it fails.
//!
//! The token is added to each attempt as `authorization: Bearer …` (as a signature is),
//! never stored with the delivery.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use tokio::time::Instant;

use crate::config::{ClientAuth, OAuth2Config};

/// How long before its expiry a token is replaced (at most half its lifetime).
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// The most of a token endpoint's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

/// A destination's OAuth 2.0 client: its settings and the token it holds.
pub struct OAuth2 {
    config: OAuth2Config,
    kept: tokio::sync::Mutex<Kept>,
    /// How many fetches have ended (counted under `kept`'s lock, read before taking it).
    fetches: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Kept {
    token: Option<Token>,
    /// Why the last fetch failed, if it did.
    failed: Option<String>,
}

struct Token {
    access: String,
    /// When to fetch a new one (none: when the destination refuses this one).
    renew_at: Option<Instant>,
    /// When it expires: until then it serves on while fetching a new one fails.
    expires_at: Option<Instant>,
}

/// A token endpoint's answer: the access token and how long it lasts (`expires_in`).
#[derive(Debug, PartialEq)]
pub struct Fetched {
    pub access: String,
    pub lifetime: Option<Duration>,
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &self.config.token_url)
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

impl OAuth2 {
    pub fn new(config: OAuth2Config) -> Self {
        Self {
            config,
            kept: Default::default(),
            fetches: Default::default(),
        }
    }

    pub fn config(&self) -> &OAuth2Config {
        &self.config
    }

    /// The token for an attempt, and whether it is new: the one kept unless it is due for
    /// renewal, else one from `fetch` (a `401` to a kept token is worth one more try with a
    /// new one; to a new one, it is the destination's answer). A fetch that failed while
    /// this attempt waited for it is this attempt's answer too; an attempt waits at most
    /// `wait` for another's fetch (its own is bounded by `fetch`, and runs to its end so
    /// that those waiting for it learn how it went).
    pub async fn token<F>(&self, wait: Duration, fetch: F) -> Result<(String, bool), String>
    where
        F: AsyncFnOnce(&OAuth2Config) -> Result<Fetched, String>,
    {
        use std::sync::atomic::Ordering::SeqCst;
        let seen = self.fetches.load(SeqCst);
        let mut kept = (tokio::time::timeout(wait, self.kept.lock()).await)
            .map_err(|_| "none came within the attempt's timeout".to_string())?;
        if let Some(t) = &kept.token
            && t.renew_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok((t.access.clone(), false));
        }
        // Unless a fetch failed while this attempt waited for it, fetch.
        if kept.failed.is_none() || self.fetches.load(SeqCst) == seen {
            let fetched = fetch(&self.config).await;
            self.fetches.fetch_add(1, SeqCst);
            match fetched {
                Ok(fetched) => {
                    let now = Instant::now();
                    let lifetime = fetched.lifetime;
                    kept.failed = None;
                    kept.token = Some(Token {
                        access: fetched.access.clone(),
                        renew_at: lifetime
                            .map(|life| now + life.saturating_sub(RENEW_BEFORE.min(life / 2))),
                        expires_at: lifetime.map(|life| now + life),
                    });
                    return Ok((fetched.access, true));
                }
                Err(why) => kept.failed = Some(why),
            }
        }
        // The fetch failed: a token due for renewal serves on until it expires (a token
        // endpoint's blip costs no delivery), else the attempt has none.
        match &kept.token {
            Some(t) if t.expires_at.is_some_and(|at| Instant::now() < at) => {
                Ok((t.access.clone(), false))
            }
            _ => {
                kept.token = None;
                Err(kept.failed.clone().unwrap_or_default())
            }
        }
    }

    /// The destination answered `401` to `token`: it is not used again (unless a newer one
    /// has replaced it already).
    pub async fn rejected(&self, token: &str) {
        let mut kept = self.kept.lock().await;
        if kept.token.as_ref().is_some_and(|t| t.access == token) {
            kept.token = None;
        }
    }
}

/// Asks the token endpoint at `url` for a token with `client` (the deliveries' client: its
/// proxy, certificates and address checks), within `timeout`.
pub async fn request(
    client: &reqwest::Client,
    url: reqwest::Url,
    config: &OAuth2Config,
    timeout: Duration,
) -> Result<Fetched, String> {
    let (form, basic) = form(config);
    let mut request = (client.post(url).timeout(timeout))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .body(form);
    if let Some(credentials) = basic {
        request = request.header(AUTHORIZATION, credentials);
    }
    let mut response = (request.send().await)
        .map_err(|e| format!("the token endpoint: {}", super::dispatch::describe(&e)))?;
    let status = response.status();
    let mut answer = Vec::new();
    while answer.len() < MAX_ANSWER {
        match response.chunk().await {
            Ok(Some(chunk)) => answer.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                let why = super::dispatch::describe(&e);
                return Err(format!("the token endpoint's answer was cut short: {why}"));
            }
        }
    }
    answer.truncate(MAX_ANSWER);
    if !status.is_success() {
        return Err(format!(
            "the token endpoint answered {status}{}",
            error_of(&answer)
        ));
    }
    token_of(&answer)
}

/// A token request's form, and its `authorization` header when the client authenticates by
/// HTTP Basic.
fn form(config: &OAuth2Config) -> (String, Option<String>) {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    if let Some(scope) = &config.scope {
        form.append_pair("scope", scope);
    }
    for (name, value) in &config.params {
        form.append_pair(name, value);
    }
    let basic = match config.client_auth {
        // RFC 6749 §2.3.1: each form-encoded, then joined and base64-encoded.
        ClientAuth::Basic => {
            let encode =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = [encode(&config.client_id), encode(&config.client_secret)].join(":");
            Some(format!("Basic {}", B64.encode(pair)))
        }
        ClientAuth::Body => {
            form.append_pair("client_id", &config.client_id);
            form.append_pair("client_secret", &config.client_secret);
            None
        }
    };
    (form.finish(), basic)
}

/// An error answer's `error` and `error_description` (RFC 6749 §5.2), as `: error
/// (description)`, if it has them.
fn error_of(answer: &[u8]) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(answer) else {
        return String::new();
    };
    let text = |key| map.get(key).and_then(|v| v.as_str());
    match (text("error"), text("error_description")) {
        (Some(error), Some(description)) => format!(": {error} ({description})"),
        (Some(error), None) => format!(": {error}"),
        _ => String::new(),
    }
}

/// A successful answer's token (RFC 6749 §5.1). `expires_in` may come as a string, as some
/// endpoints send it; without `token_type` a token is taken as a bearer token.
fn token_of(answer: &[u8]) -> Result<Fetched, String> {
    let not_a_token = |why: &str| format!("the token endpoint's answer is not a token: {why}");
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(answer) else {
        return Err(not_a_token("not a JSON object"));
    };
    let Some(access) = map.get("access_token").and_then(|v| v.as_str()) else {
        return Err(not_a_token("no `access_token`"));
    };
    if access.is_empty() || HeaderValue::from_str(&format!("Bearer {access}")).is_err() {
        return Err(not_a_token("its `access_token` cannot be sent in a header"));
    }
    if let Some(kind) = map.get("token_type").and_then(|v| v.as_str())
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(format!(
            "the token endpoint gave a `{kind}` token; only bearer tokens are supported"
        ));
    }
    let lifetime = match map.get("expires_in") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    };
    Ok(Fetched {
        access: access.to_string(),
        lifetime: lifetime.map(Duration::from_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(client_auth: ClientAuth) -> OAuth2Config {
        OAuth2Config {
            token_url: String::new(),
            client_id: "gw id".into(),
            client_secret: "s:e&cret".into(),
            scope: Some("events:write".into()),
            params: [("audience".to_string(), "https://api.example/".to_string())].into(),
            client_auth,
        }
    }

    /// A token endpoint that answers `answer` and tells what it was asked: the
    /// `authorization` header and the form.
    async fn endpoint(
        status: u16,
        answer: &'static str,
    ) -> (
        reqwest::Url,
        tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let auth = headers
                    .get("authorization")
                    .map_or("", |v| v.to_str().unwrap());
                tx.send((auth.to_string(), body)).unwrap();
                async move {
                    let status = axum::http::StatusCode::from_u16(status).unwrap();
                    (status, [("content-type", "application/json")], answer)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url.parse().unwrap(), rx)
    }

    #[tokio::test]
    async fn the_client_authenticates_by_basic_or_by_form_fields() {
        let answer = r#"{"access_token":"t-1","token_type":"Bearer","expires_in":3600}"#;
        let (url, mut asked) = endpoint(200, answer).await;
        let client = reqwest::Client::new();
        let second = Duration::from_secs(5);
        let fetched = request(&client, url.clone(), &config(ClientAuth::Basic), second).await;
        let expected = Fetched {
            access: "t-1".into(),
            lifetime: Some(Duration::from_secs(3600)),
        };
        assert_eq!(fetched, Ok(expected));
        let (auth, form) = asked.recv().await.unwrap();
        // "gw+id:s%3Ae%26cret", each part form-encoded first.
        assert_eq!(auth, format!("Basic {}", B64.encode("gw+id:s%3Ae%26cret")));
        assert_eq!(
            form,
            "grant_type=client_credentials&scope=events%3Awrite&audience=https%3A%2F%2Fapi.example%2F"
        );

        request(&client, url, &config(ClientAuth::Body), second)
            .await
            .unwrap();
        let (auth, form) = asked.recv().await.unwrap();
        assert_eq!(auth, "");
        assert!(
            form.ends_with("&client_id=gw+id&client_secret=s%3Ae%26cret"),
            "{form}"
        );
    }

    #[tokio::test]
    async fn a_refusal_names_the_endpoints_error() {
        let answer = r#"{"error":"invalid_client","error_description":"unknown client"}"#;
        let (url, _asked) = endpoint(401, answer).await;
        let client = reqwest::Client::new();
        let basic = config(ClientAuth::Basic);
        let refused = request(&client, url, &basic, Duration::from_secs(5)).await;
        assert_eq!(
            refused,
            Err(
                "the token endpoint answered 401 Unauthorized: invalid_client (unknown client)"
                    .into()
            )
        );
        assert_eq!(error_of(b"<html>busy</html>"), "");
    }

    #[test]
    fn answers_are_read_as_rfc_6749_says_and_as_endpoints_send_them() {
        let token = |s: &str| token_of(s.as_bytes());
        assert_eq!(
            token(r#"{"access_token":"a","expires_in":"60"}"#),
            Ok(Fetched {
                access: "a".into(),
                lifetime: Some(Duration::from_secs(60))
            })
        );
        assert_eq!(
            token(r#"{"access_token":"a","token_type":"bearer"}"#)
                .unwrap()
                .lifetime,
            None
        );
        let mac = token(r#"{"access_token":"a","token_type":"mac"}"#).unwrap_err();
        assert!(mac.contains("only bearer tokens"), "{mac}");
        let none = token(r#"{"token":"a"}"#).unwrap_err();
        assert!(none.ends_with("no `access_token`"), "{none}");
        let bad = token(r#"{"access_token":"a\nb"}"#).unwrap_err();
        assert!(bad.contains("cannot be sent in a header"), "{bad}");
        assert!(token("not json").is_err());
    }

    /// One fetch for the attempts that wait on it, a new one when the token is due for
    /// renewal or refused, and a failed fetch is the answer of those that waited for it.
    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_token_is_kept_renewed_and_replaced_when_refused() {
        let oauth = std::sync::Arc::new(OAuth2::new(config(ClientAuth::Basic)));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fetch = |lifetime: u64| {
            let fetches = fetches.clone();
            async move |_: &OAuth2Config| {
                let n = fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(Fetched {
                    access: format!("t-{n}"),
                    lifetime: Some(Duration::from_secs(lifetime)),
                })
            }
        };
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let (oauth, fetch) = (oauth.clone(), fetch(600));
                tokio::spawn(async move { oauth.token(HOUR, fetch).await })
            })
            .collect();
        let mut got = vec![];
        for w in waiting {
            got.push(w.await.unwrap().unwrap());
        }
        got.sort();
        let one = ("t-1".to_string(), false);
        assert_eq!(
            got,
            vec![
                one.clone(),
                one.clone(),
                one.clone(),
                one.clone(),
                ("t-1".into(), true)
            ]
        );
        // Renewed 60 s before it expires.
        tokio::time::advance(Duration::from_secs(539)).await;
        assert_eq!(oauth.token(HOUR, fetch(600)).await.unwrap(), one);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            oauth.token(HOUR, fetch(600)).await.unwrap(),
            ("t-2".into(), true)
        );
        // A refusal of an older token keeps the newer one; of this one, replaces it.
        oauth.rejected("t-1").await;
        assert_eq!(
            oauth.token(HOUR, fetch(600)).await.unwrap(),
            ("t-2".into(), false)
        );
        oauth.rejected("t-2").await;
        assert_eq!(
            oauth.token(HOUR, fetch(600)).await.unwrap(),
            ("t-3".into(), true)
        );

        // A failed fetch answers those that waited for it, not those that come later.
        oauth.rejected("t-3").await;
        let failing = async |_: &OAuth2Config| {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<Fetched, _>("the token endpoint answered 503 Service Unavailable".to_string())
        };
        let (first, second) =
            tokio::join!(oauth.token(HOUR, failing), oauth.token(HOUR, fetch(600)));
        assert!(first.unwrap_err().contains("503"));
        assert!(
            second.unwrap_err().contains("503"),
            "waited for the failed fetch"
        );
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(
            oauth.token(HOUR, fetch(600)).await.unwrap(),
            ("t-4".into(), true)
        );

        // A token due for renewal serves on while its renewal fails, until it expires.
        let failing = async |_: &OAuth2Config| Err::<Fetched, _>("503".to_string());
        let kept = ("t-4".to_string(), false);
        tokio::time::advance(Duration::from_secs(541)).await;
        assert_eq!(oauth.token(HOUR, failing).await.unwrap(), kept);
        tokio::time::advance(Duration::from_secs(58)).await;
        assert_eq!(oauth.token(HOUR, failing).await.unwrap(), kept);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(oauth.token(HOUR, failing).await.unwrap_err(), "503");
        let fifth = oauth.token(HOUR, fetch(600)).await.unwrap();
        assert_eq!(fifth, ("t-5".into(), true));

        // A waiter gives up at its own bound; the fetch it waited for goes on to its end.
        oauth.rejected("t-5").await;
        let short = Duration::from_millis(50);
        let (first, second) = tokio::join!(
            oauth.token(HOUR, fetch(600)),
            oauth.token(short, fetch(600))
        );
        assert_eq!(first.unwrap(), ("t-6".into(), true));
        assert_eq!(
            second.unwrap_err(),
            "none came within the attempt's timeout"
        );
    }
}
