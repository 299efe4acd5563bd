//! Answers given in advance to plugins' HTTP requests, for runs that must reach no service:
//! a golden case of `switchyard dry-run --cases` (its `http`), `dry-run --http FILE`,
//! `plugin run --http FILE`. A run given answers sends nothing: a request is answered by
//! the first answer for its method and URL, and one with none fails, naming what to add.
//! The route's grant (`allow_http`) and the call's limits apply as for requests sent.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::outbound::{Request, Response, SendError, Sender};

/// What a run's plugins' requests are answered with (a JSON array of [`AnswerSpec`]s).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "Vec<AnswerSpec>")]
pub struct Answers(Vec<Answer>);

/// One answer as written: the request it answers (`method`, `GET` unless given, and the
/// whole `url`, query included) and either the response (`status`, 200 unless given;
/// `headers`; `body`: a string is sent as it is, any other JSON value as JSON, with
/// `content-type: application/json` unless `headers` say otherwise) or `error`, why there is
/// none (the request fails with it, as one that found no service would).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerSpec {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Clone, Debug)]
struct Answer {
    method: http::Method,
    url: url::Url,
    reply: Result<Response, String>,
}

impl TryFrom<Vec<AnswerSpec>> for Answers {
    type Error = String;

    fn try_from(specs: Vec<AnswerSpec>) -> Result<Self, String> {
        let answers = (specs.into_iter().enumerate())
            .map(|(i, spec)| spec.answer().map_err(|e| format!("answer [{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self(answers))
    }
}

impl AnswerSpec {
    fn answer(self) -> Result<Answer, String> {
        let method = self.method.as_deref().unwrap_or("GET");
        let method = (method.parse::<http::Method>())
            .ok()
            .filter(|m| m.as_str() == method.to_ascii_uppercase())
            .ok_or_else(|| format!("`{method}` is not an HTTP method"))?;
        let url = url::Url::parse(&self.url)
            .map_err(|e| format!("`{}` is not an absolute URL: {e}", self.url))?;
        let reply = match self.error {
            Some(error) => {
                if self.status.is_some() || self.body.is_some() || !self.headers.is_empty() {
                    return Err("an answer has either `error` or a response \
                                (`status`, `headers`, `body`), not both"
                        .into());
                }
                Err(error)
            }
            None => {
                let status = self.status.unwrap_or(200);
                if !(100..=999).contains(&status) {
                    return Err(format!("`status` {status} is not an HTTP status"));
                }
                let mut headers: Vec<(String, String)> = self.headers.into_iter().collect();
                let body = match self.body {
                    None => Vec::new(),
                    Some(serde_json::Value::String(text)) => text.into_bytes(),
                    Some(value) => {
                        if !headers
                            .iter()
                            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                        {
                            headers.push(("content-type".into(), "application/json".into()));
                        }
                        value.to_string().into_bytes()
                    }
                };
                Ok(Response {
                    status,
                    headers,
                    body,
                })
            }
        };
        Ok(Answer { method, url, reply })
    }
}

#[async_trait::async_trait]
impl Sender for Answers {
    async fn send(
        &self,
        request: Request,
        _timeout: std::time::Duration,
        max_bytes: usize,
    ) -> Result<Response, SendError> {
        let answer = (self.0.iter()).find(|a| a.method == request.method && a.url == request.url);
        let Some(answer) = answer else {
            return Err(SendError::Failed(format!(
                "no answer for `{} {}` among the run's (`http`): a run given answers sends \
                 nothing, so each request it makes needs one",
                request.method, request.url
            )));
        };
        match &answer.reply {
            Err(error) => Err(SendError::Failed(error.clone())),
            Ok(response) if response.body.len() > max_bytes => Err(SendError::Failed(format!(
                "the response's body is larger than {max_bytes} bytes \
                 (`plugins.http_max_response_bytes`)"
            ))),
            Ok(response) => Ok(response.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, url: &str) -> Request {
        Request {
            method: method.parse().unwrap(),
            url: url::Url::parse(url).unwrap(),
            headers: Vec::new(),
            body: None,
        }
    }

    async fn send(answers: &Answers, method: &str, url: &str) -> Result<Response, String> {
        let timeout = std::time::Duration::from_secs(1);
        (answers.send(request(method, url), timeout, 64).await).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_request_gets_the_first_answer_for_its_method_and_url() {
        let answers: Answers = serde_json::from_value(serde_json::json!([
            {"url": "https://crm.example.com/sims/1?x=1", "body": {"customer": "acme"}},
            {"url": "https://crm.example.com/sims/1?x=1", "body": "second"},
            {"method": "POST", "url": "https://crm.example.com", "status": 201,
             "headers": {"content-type": "text/plain"}, "body": "made"},
            {"url": "https://down.example.com/", "error": "connection refused"},
            {"url": "https://big.example.com/", "body": "x".repeat(65)},
        ]))
        .unwrap();

        let r = send(&answers, "GET", "https://crm.example.com/sims/1?x=1")
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &br#"{"customer":"acme"}"#[..])
        );
        assert_eq!(
            r.headers,
            [("content-type".into(), "application/json".into())]
        );
        // The URL compared as parsed: the origin's `/` is implied.
        let r = send(&answers, "POST", "https://crm.example.com/")
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"made"[..]));
        assert_eq!(r.headers, [("content-type".into(), "text/plain".into())]);

        let e = send(&answers, "DELETE", "https://crm.example.com/sims/1?x=1").await;
        assert!(
            e.unwrap_err()
                .contains("no answer for `DELETE https://crm.example.com/sims/1?x=1`")
        );
        let e = send(&answers, "GET", "https://crm.example.com/sims/1").await;
        assert!(e.unwrap_err().contains("no answer for"));
        assert_eq!(
            send(&answers, "GET", "https://down.example.com/")
                .await
                .unwrap_err(),
            "connection refused"
        );
        let e = send(&answers, "GET", "https://big.example.com/")
            .await
            .unwrap_err();
        assert!(e.contains("larger than 64 bytes"), "{e}");
    }

    #[test]
    fn bad_answers_are_refused_saying_which_and_why() {
        let refused = |json: serde_json::Value| {
            serde_json::from_value::<Answers>(json)
                .unwrap_err()
                .to_string()
        };
        let e = refused(serde_json::json!([{"url": "https://a.example/"}, {"url": "/sims"}]));
        assert!(
            e.contains("answer [1]: `/sims` is not an absolute URL"),
            "{e}"
        );
        let e = refused(serde_json::json!([{"url": "https://a.example/", "method": "get"}]));
        assert!(e.contains("`get` is not an HTTP method"), "{e}");
        let e = refused(serde_json::json!([{"url": "https://a.example/", "status": 42}]));
        assert!(e.contains("`status` 42 is not an HTTP status"), "{e}");
        let e = refused(
            serde_json::json!([{"url": "https://a.example/", "error": "x", "status": 200}]),
        );
        assert!(e.contains("either `error` or a response"), "{e}");
        let e = refused(serde_json::json!([{"url": "https://a.example/", "response": {}}]));
        assert!(e.contains("unknown field `response`"), "{e}");
    }
}
