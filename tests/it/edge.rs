//! The edge from outside: inbound signatures (HMAC and Standard Webhooks), IP allowlists
//! with trusted proxies, Standard Webhooks signatures on deliveries, and HTTPS destinations
//! of an internal CA with a client certificate.

use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hmac::Mac;
use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway, compress};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ROTATED: &str = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCE=";

fn config() -> String {
    format!(
        r#"
[[sources]]
name = "bondio"
verify = {{ scheme = "hmac-sha256", secret = "bondio-key", header = "bondio-signature" }}
[[sources]]
name = "sw"
verify = {{ scheme = "standard-webhooks", secrets = ["{ROTATED}", "{SECRET}"] }}
[[sources]]
name = "stripe"
verify = {{ scheme = "hmac-sha256", header = "stripe-signature", secret = "whsec_new", previous_secrets = ["whsec_old"], signature_key = "v1", timestamp_key = "t", signed = "{{timestamp}}.{{body}}" }}
[[sources]]
name = "slack"
verify = {{ scheme = "hmac-sha256", header = "x-slack-signature", prefix = "v0=", secret = "slack-key", timestamp_header = "x-slack-request-timestamp", signed = "v0:{{timestamp}}:{{body}}", tolerance = "1m" }}
challenge = {{ type = "url_verification", field = "challenge" }}
[[sources]]
name = "office"
allow_ips = ["10.0.0.0/8"]
[[sources]]
name = "local"
allow_ips = ["127.0.0.0/8"]
[[destinations]]
name = "signed"
url = "{{receiver}}/signed"
signing = {{ secret = "{SECRET}" }}
[[routes]]
source = "bondio"
destinations = ["signed"]
[[routes]]
source = "sw"
destinations = ["signed"]
[[routes]]
source = "stripe"
destinations = ["signed"]
[[routes]]
source = "slack"
destinations = ["signed"]
[[routes]]
source = "local"
destinations = ["signed"]
[[routes]]
source = "office"
destinations = ["signed"]
"#
    )
}

async fn post(
    gw: &TestGateway,
    source: &str,
    body: &str,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut req = gw
        .client
        .post(format!("{}/v1/ingest/{source}", gw.url))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).unwrap();
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

fn standard_signature(secret: &str, id: &str, ts: u64, body: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = HmacSha256::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

fn now_s() -> u64 {
    switchyard::delivery::now_ms() / 1000
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_signatures_are_checked_and_failures_store_nothing() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let body = r#"{"type":"attachment.activated","timestamp":1730474606}"#;

    let good = hmac_hex(b"bondio-key", body.as_bytes());
    assert_eq!(
        post(&gw, "bondio", body, &[("bondio-signature", good.clone())])
            .await
            .0,
        202
    );
    let (status, err) = post(
        &gw,
        "bondio",
        body,
        &[("bondio-signature", hmac_hex(b"wrong", body.as_bytes()))],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(err["error"], "the signature does not match");
    let (status, err) = post(
        &gw,
        "bondio",
        &body.replace("1730474606", "1730474607"),
        &[("bondio-signature", good)],
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (401, Some("the signature does not match")),
        "tampered body"
    );
    let (status, err) = post(&gw, "bondio", body, &[]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (401, Some("missing signature header `bondio-signature`"))
    );

    // Standard Webhooks, signed with the second of two secrets (rotation).
    let (mut id, ts) = ("msg_1", now_s());
    let sw = |id: &str, ts: u64, secret: &str| {
        vec![
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                standard_signature(secret, id, ts, body),
            ),
        ]
    };
    assert_eq!(post(&gw, "sw", body, &sw(id, ts, SECRET)).await.0, 202);
    // The sender's retry of that message (its `webhook-id` again), signed anew: the same
    // event, not a second one.
    let (status, again) = post(&gw, "sw", body, &sw(id, ts + 5, ROTATED)).await;
    assert_eq!(
        (status, &again["duplicate"]),
        (200, &json!(true)),
        "{again}"
    );
    id = "msg_2";
    assert_eq!(post(&gw, "sw", body, &sw(id, ts, ROTATED)).await.0, 202);
    let (status, err) = post(&gw, "sw", body, &sw(id, ts - 600, SECRET)).await;
    assert_eq!(status, 401, "stale timestamp");
    assert!(
        err["error"].as_str().unwrap().contains("tolerance"),
        "{err}"
    );
    let (status, _) = post(
        &gw,
        "sw",
        body,
        &sw(id, ts, "whsec_c29tZSBvdGhlciBzZWNyZXQgZW50aXJlbHk="),
    )
    .await;
    assert_eq!(status, 401, "unknown secret");

    rx.wait_for(3).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        rx.requests().len(),
        3,
        "refused requests store and deliver nothing"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"switchyard_events_received_total{source="bondio",result="rejected_signature"} 3"#
        ),
        "{metrics}"
    );
    // The source shows what it refused, newest first, as the sender was told.
    let (_, source) = gw.get("/v1/sources/bondio").await;
    let refused = &source["refused"];
    assert_eq!(refused["total"], 3, "{source}");
    let recent = refused["recent"].as_array().unwrap();
    let told: Vec<_> = recent
        .iter()
        .map(|r| (r["status"].clone(), r["error"].clone()))
        .collect();
    assert_eq!(
        told,
        [
            (
                json!(401),
                json!("missing signature header `bondio-signature`")
            ),
            (json!(401), json!("the signature does not match")),
            (json!(401), json!("the signature does not match")),
        ]
    );
    assert_eq!(recent[0]["reason"], "rejected_signature");
    assert!(recent[0]["at"].as_u64().unwrap() / 1000 >= now_s() - 60);
    let (_, local) = gw.get("/v1/sources/local").await;
    assert_eq!(local["refused"], json!({ "total": 0, "recent": [] }));
    gw.shutdown().await.unwrap();
}

/// Signatures over a timestamp and the body, as Stripe and Slack send them: a replay
/// after the tolerance is refused however well signed, and a secret being rotated out is
/// still accepted.
#[tokio::test(flavor = "multi_thread")]
async fn timestamped_hmac_signatures_refuse_replays_and_rotate() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let body = r#"{"id":"evt_1","type":"invoice.paid"}"#;
    let stripe = |ts: u64, keys: &[&str]| {
        let signed = format!("{ts}.{body}");
        let v1s: Vec<String> = (keys.iter())
            .map(|k| format!("v1={}", hmac_hex(k.as_bytes(), signed.as_bytes())))
            .collect();
        vec![("stripe-signature", format!("t={ts},{}", v1s.join(",")))]
    };
    let now = now_s();
    for keys in [
        &["whsec_new"][..],
        &["whsec_old"],
        &["whsec_other", "whsec_new"],
    ] {
        let (status, answer) = post(&gw, "stripe", body, &stripe(now, keys)).await;
        assert_eq!(status, 202, "{keys:?}: {answer}");
    }
    let (status, err) = post(&gw, "stripe", body, &stripe(now, &["whsec_other"])).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (401, Some("the signature does not match"))
    );
    let (status, err) = post(&gw, "stripe", body, &stripe(now - 301, &["whsec_new"])).await;
    assert_eq!(status, 401, "a replay after five minutes");
    assert!(
        err["error"].as_str().unwrap().contains("tolerance"),
        "{err}"
    );

    // Slack: a form body, the timestamp in a header of its own, a one-minute tolerance.
    let form = "token=abc&team_id=T1&command=%2Fdeploy&text=web";
    let signed_at = |ts: u64, body: &str| {
        let sig = hmac_hex(b"slack-key", format!("v0:{ts}:{body}").as_bytes());
        vec![
            ("x-slack-request-timestamp", ts.to_string()),
            ("x-slack-signature", format!("v0={sig}")),
            ("content-type", "application/x-www-form-urlencoded".into()),
        ]
    };
    let slack = |ts: u64| signed_at(ts, form);

    // Slack's URL check when the Events API is set up: answered with its challenge, once
    // signed, and not stored; an event of another type is stored as any.
    let check = r#"{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let answer_of_check =
        || json!({ "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" });
    let (status, answer) = post(&gw, "slack", check, &signed_at(now, check)).await;
    assert_eq!((status, answer), (200, answer_of_check()));
    assert_eq!(
        post(&gw, "slack", check, &[]).await.0,
        401,
        "unsigned: no answer"
    );
    // A dry run of it says what ingest answers, and runs no route; of another, no such key.
    let check_value: Value = serde_json::from_str(check).unwrap();
    let (status, dry) = (gw.send("POST", "/v1/sources/slack/dry-run", Some(check_value))).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["challenge"], answer_of_check(), "{dry}");
    assert_eq!(
        (dry["routes"].clone(), dry["deliveries"].clone()),
        (json!([]), json!([]))
    );
    let callback = json!({ "type": "event_callback", "challenge": "c" });
    let (_, dry) = (gw.send("POST", "/v1/sources/slack/dry-run", Some(callback))).await;
    assert!(dry.get("challenge").is_none(), "{dry}");
    assert_eq!(dry["deliveries"].as_array().unwrap().len(), 1, "{dry}");
    let (status, answer) = post(&gw, "slack", form, &slack(now)).await;
    assert_eq!(status, 202, "{answer}");
    let (status, _) = post(&gw, "slack", form, &slack(now - 61)).await;
    assert_eq!(status, 401, "older than the source's tolerance");
    let mut moved = slack(now);
    moved[0].1 = (now + 1).to_string();
    let (status, _) = post(&gw, "slack", form, &moved).await;
    assert_eq!(status, 401, "the timestamp is signed: it cannot be moved");

    rx.wait_for(4).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let delivered = rx.requests();
    assert_eq!(delivered.len(), 4, "refused requests store nothing");
    let slack_body = delivered.iter().find(|r| r.body.starts_with(b"token="));
    assert_eq!(slack_body.map(|r| &r.body[..]), Some(form.as_bytes()));
    assert!(
        !delivered.iter().any(|r| r.body.starts_with(b"{\"token\"")),
        "the check is not delivered"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .contains(r#"switchyard_events_received_total{source="slack",result="challenge"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await.unwrap();
}

/// URL checks in the query, as Meta (and Strava), Dropbox and Microsoft Graph make them,
/// and Twitch's in the body answered as text: each gets its challenge back as it expects,
/// before the signature check and with the verify token checked, and nothing is stored;
/// any other `GET` is `405`. Events from the same source are still checked and stored.
#[tokio::test(flavor = "multi_thread")]
async fn url_checks_in_the_query_are_answered_as_each_sender_expects() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "meta"
verify = { scheme = "hmac-sha256", header = "x-hub-signature-256", prefix = "sha256=", secret = "meta-app-secret" }
challenge = { query = "hub.challenge", token_query = "hub.verify_token", token = "meaty-token" }
[[sources]]
name = "dropbox"
challenge = { query = "challenge" }
[[sources]]
name = "graph"
challenge = { query = "validationToken" }
[[sources]]
name = "twitch"
challenge = { field = "challenge", answer = "text" }
[[sources]]
name = "plain"
[[destinations]]
name = "sink"
url = "{receiver}/sink"
[[routes]]
source = "meta"
destinations = ["sink"]
[[routes]]
source = "graph"
destinations = ["sink"]
[[routes]]
source = "twitch"
destinations = ["sink"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let client = reqwest::Client::new();
    let get = |path: String| {
        let request = client.get(format!("{}/v1/ingest/{path}", gw.url));
        async move {
            let resp = request.send().await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            (status, headers, resp.text().await.unwrap())
        }
    };
    // Meta: the challenge back as text once the verify token is this source's.
    let (status, headers, text) =
        get("meta?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meaty-token".into())
            .await;
    assert_eq!((status, text.as_str()), (200, "1158201444"));
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    for wrong in ["&hub.verify_token=guess", ""] {
        let (status, _, text) =
            get(format!("meta?hub.mode=subscribe&hub.challenge=1{wrong}")).await;
        assert_eq!(status, 403, "{text}");
        assert!(
            text.contains("`hub.verify_token` is missing or not"),
            "{text}"
        );
    }
    // A GET that is no URL check: 405, saying how events come.
    let (status, headers, text) = get("meta".into()).await;
    assert_eq!(status, 405, "{text}");
    assert_eq!(headers["allow"], "GET, POST");
    assert!(text.contains("with `hub.challenge` in its query"), "{text}");
    let (status, headers, text) = get("plain?challenge=x".into()).await;
    assert_eq!(status, 405, "{text}");
    assert_eq!(
        headers["allow"], "POST",
        "a source with no URL check by GET"
    );
    // (Nor is a HEAD, which the router takes with GET, ever an event.)
    let head = client
        .head(format!("{}/v1/ingest/plain", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 405);
    assert_eq!(get("nowhere?challenge=x".into()).await.0, 404);
    // Dropbox: no token, the challenge (decoded) back.
    let (status, _, text) = get("dropbox?challenge=a%20b".into()).await;
    assert_eq!((status, text.as_str()), (200, "a b"));
    // Microsoft Graph: a POST with the token in its query.
    let resp = (client.post(format!(
        "{}/v1/ingest/graph?validationToken=Validation%3A+Testing+client",
        gw.url
    )))
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "Validation: Testing client");
    // Twitch: the body's challenge, as text.
    let check = json!({ "challenge": "pogchamp-kappa-360noscope-vohiyo", "subscription": { "id": "f1c2a387" } });
    let (status, text) = {
        let resp = (client.post(format!("{}/v1/ingest/twitch", gw.url)))
            .json(&check)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(
        (status, text.as_str()),
        (200, "pogchamp-kappa-360noscope-vohiyo")
    );

    // Meta's events are signed, and checked as before.
    let event = r#"{"object":"whatsapp_business_account","entry":[]}"#;
    let signature = format!("sha256={}", hmac_hex(b"meta-app-secret", event.as_bytes()));
    let (status, answer) = post(&gw, "meta", event, &[("x-hub-signature-256", signature)]).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(post(&gw, "meta", event, &[]).await.0, 401);
    // Only the event arrives: the checks are not stored.
    let got = rx.wait_for(1).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(rx.requests().len(), 1);
    assert_eq!(got[0].body, event.as_bytes());
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_events_received_total{source="meta",result="challenge"} 1"#,
        r#"switchyard_events_received_total{source="meta",result="rejected_verify_token"} 2"#,
        r#"switchyard_events_received_total{source="meta",result="rejected_method"} 1"#,
        r#"switchyard_events_received_total{source="dropbox",result="challenge"} 1"#,
        r#"switchyard_events_received_total{source="graph",result="challenge"} 1"#,
        r#"switchyard_events_received_total{source="twitch",result="challenge"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // Made through the API, a source's verify token is shown redacted, kept when echoed.
    let source = json!({ "name": "strava", "challenge": { "query": "hub.challenge",
        "token_query": "hub.verify_token", "token": "strava-verify-token-0123" } });
    let made = gw.create("/v1/sources", source).await;
    assert_eq!(made["challenge"]["token"], "****0123", "{made}");
    let (status, changed) = gw
        .send(
            "PATCH",
            "/v1/sources/strava",
            Some(json!({ "challenge": made["challenge"] })),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    let (status, _, text) =
        get("strava?hub.challenge=15f7d1a91c1f40f8a748fd134752feb3&hub.verify_token=strava-verify-token-0123".into()).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "15f7d1a91c1f40f8a748fd134752feb3")
    );
    // A challenge in both places, or a token with no parameter, is refused naming its key.
    for (challenge, key) in [
        (json!({ "field": "c", "query": "c" }), "challenge.query"),
        (
            json!({ "query": "c", "token": "t" }),
            "challenge.token_query",
        ),
        (json!({}), "challenge.field"),
    ] {
        let body = json!({ "name": "bad", "challenge": challenge });
        let (status, e) = gw.send("POST", "/v1/sources", Some(body)).await;
        assert_eq!(status, 400, "{e}");
        assert!(e["error"].as_str().unwrap().contains(key), "{key}: {e}");
    }
    gw.shutdown().await.unwrap();
}

async fn post_encoded(
    gw: &TestGateway,
    source: &str,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut req = gw
        .client
        .post(format!("{}/v1/ingest/{source}", gw.url))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_bodies_are_decoded_before_the_checks_and_the_store() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let body = br#"{"type":"attachment.activated","timestamp":1730474606}"#;
    let signed = |data: &[u8]| vec![("bondio-signature", hmac_hex(b"bondio-key", data))];
    let encoded = |coding: &str| vec![("content-encoding", coding.to_string())];

    // Signed over the payload, sent compressed in each coding (`deflate` zlib-wrapped as
    // RFC 9110 has it, or raw as some senders do; two codings in a row).
    let sent = [
        ("gzip", compress("gzip", body)),
        ("x-gzip", compress("gzip", body)),
        ("deflate", compress("deflate", body)),
        ("deflate", compress("raw", body)),
        (
            "deflate, gzip",
            compress("gzip", &compress("deflate", body)),
        ),
    ];
    for (coding, wire) in &sent {
        let headers = [signed(body), encoded(coding)].concat();
        let (status, answer) = post_encoded(&gw, "bondio", wire.clone(), &headers).await;
        assert_eq!(status, 202, "{coding}: {answer}");
    }
    // Signed over the compressed bytes: let in too. Over neither: refused.
    let wire = compress("gzip", body);
    let headers = [signed(&wire), encoded("gzip")].concat();
    assert_eq!(
        post_encoded(&gw, "bondio", wire.clone(), &headers).await.0,
        202
    );
    let headers = [signed(b"something else"), encoded("gzip")].concat();
    let (status, answer) = post_encoded(&gw, "bondio", wire.clone(), &headers).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("the signature does not match"))
    );

    // What is stored and delivered is the payload, without the coding's header.
    let received = rx.wait_for(sent.len() + 1).await;
    for r in &received {
        assert_eq!(&r.body[..], &body[..], "{:?}", r.headers);
        assert_eq!(r.header("content-encoding"), None);
    }

    // A coding the gateway does not decode: 415, naming it; a body that is not what its
    // header says: 400; one that inflates past `max_body_bytes` (1 MiB here): 413.
    let (status, answer) = post_encoded(&gw, "local", body.to_vec(), &encoded("br")).await;
    assert_eq!(status, 415, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("`Content-Encoding: br` is not supported"),
        "{answer}"
    );
    let (status, answer) = post_encoded(&gw, "local", body.to_vec(), &encoded("gzip")).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("cannot decode the body as gzip"),
        "{answer}"
    );
    let bomb = compress("gzip", &vec![b' '; (1 << 20) + 1]);
    assert!(bomb.len() < 8192, "{}", bomb.len());
    let (status, answer) = post_encoded(&gw, "local", bomb, &encoded("gzip")).await;
    assert_eq!(status, 413, "{answer}");
    let thrice = compress("gzip", &compress("gzip", &compress("gzip", body)));
    let (status, answer) = post_encoded(&gw, "local", thrice, &encoded("gzip, gzip, gzip")).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("at most 2"),
        "{answer}"
    );
    let just = compress("gzip", &vec![b' '; 1 << 20]);
    assert_eq!(
        post_encoded(&gw, "local", just, &encoded("gzip")).await.0,
        202,
        "exactly the limit"
    );

    // A large body that compresses poorly (over 16 KiB compressed: inflated off the async
    // workers) arrives whole.
    let mut x: u64 = 1;
    let digits: String = (0..200_000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'0' + (x >> 60) as u8 % 10)
        })
        .collect();
    let large = format!(r#"{{"type":"dump","digits":"{digits}"}}"#);
    let wire = compress("gzip", large.as_bytes());
    assert!(wire.len() > 16 * 1024, "{}", wire.len());
    assert_eq!(
        post_encoded(&gw, "local", wire, &encoded("gzip")).await.0,
        202
    );
    let received = rx.wait_for(sent.len() + 3).await;
    assert!(
        received.iter().any(|r| r.body == large.as_bytes()),
        "the large body arrives whole"
    );
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_events_received_total{source="local",result="rejected_unsupported_encoding"} 1"#,
        r#"switchyard_events_received_total{source="local",result="rejected_bad_request"} 2"#,
        r#"switchyard_events_received_total{source="local",result="rejected_too_large"} 1"#,
        r#"switchyard_events_received_total{source="bondio",result="accepted"} 6"#,
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn allowlists_and_trusted_proxies() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let (status, err) = post(&gw, "office", "{}", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(
        err["error"],
        "address 127.0.0.1 is not allowed for this source"
    );
    // X-Forwarded-For is not believed from a peer that is not a trusted proxy.
    assert_eq!(
        post(
            &gw,
            "office",
            "{}",
            &[("x-forwarded-for", "10.1.2.3".into())]
        )
        .await
        .0,
        403
    );
    assert_eq!(post(&gw, "local", "{}", &[]).await.0, 202);
    gw.shutdown().await.unwrap();

    // A gateway behind a trusted proxy on loopback believes its X-Forwarded-For.
    let dir = TestGateway::dir_with_plugins(&[]);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n{}",
        config().replace("{receiver}", &rx.url)
    );
    let gw = TestGateway::start_raw(dir, &text, &|_| None).await.unwrap();
    assert_eq!(
        post(
            &gw,
            "office",
            "{}",
            &[("x-forwarded-for", "10.1.2.3".into())]
        )
        .await
        .0,
        202
    );
    assert_eq!(
        post(
            &gw,
            "office",
            "{}",
            &[("x-forwarded-for", "192.0.2.1".into())]
        )
        .await
        .0,
        403
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_carry_standard_webhooks_signatures() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let body = r#"{"type":"usage","n":1}"#;
    gw.accept("local", body).await;
    let got = rx.wait_for(1).await;
    let r = &got[0];
    let id = r.header("webhook-id").unwrap();
    let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!(ts.abs_diff(now_s()) < 60);
    // Verified with the HMAC primitive directly, as a receiver's library would.
    assert_eq!(
        r.header("webhook-signature").unwrap(),
        standard_signature(SECRET, id, ts, std::str::from_utf8(&r.body).unwrap())
    );
    assert_eq!(r.body, body.as_bytes());

    // And by the official Standard Webhooks library from PyPI, which shares no code with
    // ours; it also rejects a tampered body.
    let signature = r.header("webhook-signature").unwrap();
    let verify = |body: &[u8]| verify_with_library(SECRET, id, ts, signature, body);
    let (ok, stdout, stderr) = verify(&r.body);
    assert!(ok, "standardwebhooks rejected our signature: {stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["n"], 1);
    let (ok, _, stderr) = verify(br#"{"type":"usage","n":2}"#);
    assert!(
        !ok && stderr.contains("WebhookVerificationError"),
        "{stderr}"
    );
    gw.shutdown().await.unwrap();
}

/// A receiver that already checks a provider's HMAC — GitHub's `sha256=<hex>` over the
/// body, or one over a timestamp and the body — gets it from the gateway, computed over
/// the body as delivered, fresh on each attempt, in place of any header of that name.
#[tokio::test(flavor = "multi_thread")]
async fn deliveries_may_carry_an_hmac_in_the_receivers_header() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "gh"
url = "{receiver}/gh"
headers = { "x-hub-signature-256" = "sha256=stale" }
signing = { scheme = "hmac-sha256", secret = "gh-secret", header = "X-Hub-Signature-256", prefix = "sha256=" }
[[destinations]]
name = "ts"
url = "{receiver}/ts"
signing = { scheme = "hmac-sha256", secret = "ts-secret", header = "x-signature", encoding = "base64", timestamp_header = "x-timestamp", signed = "v0:{timestamp}:{body}" }
[[destinations]]
name = "pairs"
url = "{receiver}/pairs"
signing = { scheme = "hmac-sha256", secret = "whsec_pairs", previous_secrets = ["whsec_before"], header = "stripe-signature", signature_key = "v1", timestamp_key = "t", signed = "{timestamp}.{body}" }
[[routes]]
source = "s"
destinations = ["gh", "ts", "pairs"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let body = r#"{"type":"usage","n":1}"#;
    gw.accept("s", body).await;
    let got = rx.wait_for(3).await;
    let at = |path: &str| got.iter().find(|r| r.uri == path).unwrap();

    let gh = at("/gh");
    assert_eq!(gh.body, body.as_bytes());
    let sent: Vec<_> = gh.headers.get_all("x-hub-signature-256").iter().collect();
    assert_eq!(
        sent,
        [&format!(
            "sha256={}",
            hmac_hex(b"gh-secret", body.as_bytes())
        )],
        "one signature, the configured header's value replaced"
    );
    assert_eq!(gh.header("webhook-signature"), None);

    let ts = at("/ts");
    let timestamp = ts.header("x-timestamp").unwrap();
    assert!(timestamp.parse::<u64>().unwrap().abs_diff(now_s()) < 60);
    let mut mac = HmacSha256::new_from_slice(b"ts-secret").unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(ts.header("x-signature"), Some(expected.as_str()));

    // Stripe's form: `t=<timestamp>,v1=<hex of HMAC over "{t}.{body}">`, and during a
    // rotation a `v1` per secret, the current one's first (as Stripe signs then).
    let pairs = at("/pairs").header("stripe-signature").unwrap();
    let (t, v1s) = (pairs.strip_prefix("t=").and_then(|p| p.split_once(','))).unwrap();
    assert!(t.parse::<u64>().unwrap().abs_diff(now_s()) < 60, "{pairs}");
    let signed = format!("{t}.{body}");
    assert_eq!(
        v1s,
        format!(
            "v1={},v1={}",
            hmac_hex(b"whsec_pairs", signed.as_bytes()),
            hmac_hex(b"whsec_before", signed.as_bytes())
        )
    );

    // The test message is signed alike.
    let (status, answer) = gw.post_api("/v1/destinations/gh/test").await;
    assert_eq!((status, &answer["ok"]), (200, &json!(true)), "{answer}");
    let test = rx.wait_for(4).await.pop().unwrap();
    let signature = hmac_hex(b"gh-secret", &test.body);
    assert_eq!(
        test.header("x-hub-signature-256"),
        Some(format!("sha256={signature}").as_str())
    );
    gw.shutdown().await.unwrap();
}

/// The HMAC of `message` under `key` with Python's `hashlib` `hash` (`sha1`, `sha512`),
/// hex or base64: a second implementation to check the gateway's against.
fn python_hmac(hash: &str, key: &str, message: &[u8], encoding: &str) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, hmac, hashlib, base64\n\
             mac = hmac.new(sys.argv[2].encode(), sys.stdin.buffer.read(), getattr(hashlib, sys.argv[1])).digest()\n\
             print(mac.hex() if sys.argv[3] == 'hex' else base64.b64encode(mac).decode(), end='')",
            hash,
            key,
            encoding,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(message)?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `hmac-sha1` and `hmac-sha512`, in and out: Intercom's `x-hub-signature: sha1=<hex>` and
/// Paystack's SHA-512 hex are let in and others' hashes refused; deliveries carry Trello's
/// form (base64 of an HMAC-SHA1 over the body and the callback URL) and a SHA-512 hex — each
/// as Python's `hmac` computes them.
#[tokio::test(flavor = "multi_thread")]
async fn hmac_sha1_and_sha512_sign_and_verify_as_python_computes_them() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "intercom"
verify = { scheme = "hmac-sha1", secret = "intercom-key", header = "x-hub-signature", prefix = "sha1=" }
[[sources]]
name = "paystack"
verify = { scheme = "hmac-sha512", secret = "paystack-key", header = "x-paystack-signature" }
[[destinations]]
name = "trello"
url = "{receiver}/trello"
signing = { scheme = "hmac-sha1", secret = "trello-key", header = "x-trello-webhook", encoding = "base64", signed = "{body}https://hooks.example.com/trello" }
[[destinations]]
name = "p512"
url = "{receiver}/p512"
signing = { scheme = "hmac-sha512", secret = "p512-key", header = "x-signature" }
[[routes]]
source = "intercom"
destinations = ["trello"]
[[routes]]
source = "paystack"
destinations = ["p512"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let body = r#"{"type":"notification_event","topic":"conversation.user.created"}"#;
    let sha1 = python_hmac("sha1", "intercom-key", body.as_bytes(), "hex");
    let sha256 = python_hmac("sha256", "intercom-key", body.as_bytes(), "hex");
    let signed = |v: &str| vec![("x-hub-signature", format!("sha1={v}"))];
    assert_eq!(post(&gw, "intercom", body, &signed(&sha256)).await.0, 401);
    assert_eq!(post(&gw, "intercom", body, &signed(&sha1)).await.0, 202);
    let sha512 = python_hmac("sha512", "paystack-key", body.as_bytes(), "hex");
    let wrong = python_hmac("sha512", "other-key", body.as_bytes(), "hex");
    let paystack = |v: &str| vec![("x-paystack-signature", v.to_string())];
    assert_eq!(post(&gw, "paystack", body, &paystack(&wrong)).await.0, 401);
    assert_eq!(post(&gw, "paystack", body, &paystack(&sha512)).await.0, 202);

    let got = rx.wait_for(2).await;
    let at = |path: &str| got.iter().find(|r| r.uri == path).unwrap();
    let trello = at("/trello");
    let over = [&trello.body[..], b"https://hooks.example.com/trello"].concat();
    assert_eq!(
        trello.header("x-trello-webhook"),
        Some(python_hmac("sha1", "trello-key", &over, "base64").as_str())
    );
    let p512 = at("/p512");
    assert_eq!(
        p512.header("x-signature"),
        Some(python_hmac("sha512", "p512-key", &p512.body, "hex").as_str())
    );
    // The API shows each scheme by its name.
    let (_, source) = gw.get("/v1/sources/paystack").await;
    assert_eq!(source["verify"]["scheme"], "hmac-sha512", "{source}");
    let (_, destination) = gw.get("/v1/destinations/trello").await;
    assert_eq!(
        destination["signing"]["scheme"], "hmac-sha1",
        "{destination}"
    );
    gw.shutdown().await.unwrap();
}

/// A Twilio source from outside, with the request Twilio's own library's tests sign (auth
/// token `12345`): a form post to the URL set in Twilio's console, its query as sent, is
/// let in; the same with a parameter changed is refused. With `form_as_json` the form is
/// stored and delivered as a JSON object (its signature checked on the form as it came),
/// so a body field de-duplicates it.
#[tokio::test(flavor = "multi_thread")]
async fn a_twilio_source_checks_twilio_s_signature() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "twilio"
verify = { scheme = "twilio", url = "https://mycompany.com/myapp.php", secrets = ["12345"] }
form_as_json = true
idempotency_field = "CallSid"
[[destinations]]
name = "d"
url = "{receiver}/in"
[[routes]]
source = "twilio"
destinations = ["d"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let post = |params: &'static str| {
        let request = (gw.client)
            .post(format!("{}/v1/ingest/twilio?foo=1&bar=2", gw.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
            .body(params);
        async move {
            let resp = request.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let params = "CallSid=CA1234567890ABCDE&Digits=1234&From=%2B14158675309&To=%2B18005551212&Caller=%2B14158675309";
    let (status, answer) = post(params).await;
    assert_eq!(status, 202, "{answer}");
    let answer_id = answer["id"].clone();
    let (status, answer) = post("CallSid=CA1234567890ABCDE&Digits=9999&From=%2B14158675309&To=%2B18005551212&Caller=%2B14158675309").await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("the signature does not match"))
    );
    let (status, again) = post(params).await;
    assert_eq!(
        (status, &again["duplicate"]),
        (200, &json!(true)),
        "{again}"
    );
    let got = rx.wait_for(1).await;
    let fields = json!({
        "CallSid": "CA1234567890ABCDE",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
        "Caller": "+14158675309",
    });
    assert_eq!(got[0].json(), fields);
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    // The stored event's headers tell the stored body, not the form.
    let event = gw.event(answer_id.as_str().unwrap()).await;
    let length = (event["event"]["headers"].as_array().unwrap().iter())
        .find(|h| h[0] == "content-length")
        .map(|h| h[1].clone());
    assert_eq!(
        length,
        Some(json!(got[0].body.len().to_string())),
        "{event}"
    );
    // A repeated field is an array of its values; the dry run shows it as stored.
    let dry = (gw.client)
        .post(format!("{}/v1/sources/twilio/dry-run", gw.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("Digits=5678&Digits=1234&Sid=CA123")
        .send()
        .await
        .unwrap();
    let dry: Value = dry.json().await.unwrap();
    assert_eq!(
        dry["event"]["body"],
        json!({ "Digits": ["5678", "1234"], "Sid": "CA123" }),
        "{dry}"
    );
    assert_eq!(dry["event"]["content_type"], "application/json", "{dry}");
    gw.shutdown().await.unwrap();
}

/// Verifies a delivery with the official Standard Webhooks library from PyPI: whether it
/// passed, what it printed (the payload as JSON), its errors.
fn verify_with_library(
    secret: &str,
    id: &str,
    ts: u64,
    signature: &str,
    body: &[u8],
) -> (bool, String, String) {
    let out = std::process::Command::new(crate::tools::python_env().join("bin/python"))
        .args([
            "-c",
            "import sys, json\n\
             from standardwebhooks.webhooks import Webhook\n\
             h = json.loads(sys.argv[2])\n\
             print(json.dumps(Webhook(sys.argv[1]).verify(sys.stdin.buffer.read(), h)))",
            secret,
            &serde_json::json!({
                "webhook-id": id,
                "webhook-timestamp": ts.to_string(),
                "webhook-signature": signature,
            })
            .to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(body)?;
            child.wait_with_output()
        })
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rotating a destination's signing secret through the API: the new secret, and the old
/// one (echoed as the API shows it, redacted) as a previous secret. Each delivery then
/// carries a signature per secret, so receivers verify it with either.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_signs_deliveries_with_the_new_and_the_old_secret() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    gw.create("/v1/sources", serde_json::json!({ "name": "r" }))
        .await;
    gw.create(
        "/v1/destinations",
        serde_json::json!({ "name": "rot", "url": format!("{}/rot", rx.url),
            "signing": { "secret": SECRET } }),
    )
    .await;
    gw.create(
        "/v1/routes",
        serde_json::json!({ "name": "to-rot", "source": "r", "destinations": ["rot"] }),
    )
    .await;
    let (status, shown) = gw
        .send(
            "PATCH",
            "/v1/destinations/rot",
            Some(serde_json::json!({ "signing": {
                "secret": ROTATED, "previous_secrets": ["****LaSw"] } })),
        )
        .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(
        shown["signing"],
        serde_json::json!({ "scheme": "standard-webhooks", "secret": "****dCE=",
                            "previous_secrets": ["****LaSw"] })
    );

    let body = r#"{"type":"usage","n":7}"#;
    gw.accept("r", body).await;
    let got = rx.wait_for(1).await;
    let r = &got[0];
    let id = r.header("webhook-id").unwrap();
    let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    let signature = r.header("webhook-signature").unwrap();
    assert_eq!(
        signature,
        format!(
            "{} {}",
            standard_signature(ROTATED, id, ts, body),
            standard_signature(SECRET, id, ts, body)
        )
    );
    for secret in [ROTATED, SECRET] {
        let (ok, _, stderr) = verify_with_library(secret, id, ts, signature, &r.body);
        assert!(ok, "standardwebhooks rejected it with {secret}: {stderr}");
    }
    let (ok, _, _) = verify_with_library(
        "whsec_c29tZSBvdGhlciBzZWNyZXQgZW50aXJlbHk=",
        id,
        ts,
        signature,
        &r.body,
    );
    assert!(!ok, "a secret that signed nothing verifies nothing");
    gw.shutdown().await.unwrap();
}

/// An HTTPS receiver with the test PKI's server certificate (`tests/fixtures/tls`, made by
/// its `gen.sh`): answers 200 and records, per request, the client certificate presented
/// (DER), if any. A client that does not trust its CA fails the handshake.
async fn tls_receiver() -> (String, Arc<Mutex<Vec<Option<Vec<u8>>>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_fixture("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(tls_fixture("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(clients)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = (tls.get_ref().1.peer_certificates())
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let service = hyper::service::service_fn(move |_| {
                    record.lock().unwrap().push(client.clone());
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            axum::body::Body::empty(),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, seen)
}

fn tls_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tls")
        .join(name)
}

/// Source `s` routed to destination `internal` at `url`.
fn internal_route(url: &str) -> String {
    format!(
        "[[sources]]\nname = \"s\"\n[[destinations]]\nname = \"internal\"\nurl = \"{url}/in\"\n\
         [[routes]]\nsource = \"s\"\ndestinations = [\"internal\"]\n"
    )
}

/// Posts an event to `s` and waits for its delivery to fail because the gateway does not
/// know the receiver's CA: the event's id and record.
async fn refused_as_unknown_issuer(gw: &TestGateway) -> (String, Value) {
    let id = gw.accept("s", "{}").await;
    let e = gw
        .wait_event(&id, |e| e["deliveries"][0]["status"] == "failed")
        .await;
    let error = e["deliveries"][0]["attempts"][0]["error"].to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
    (id, e)
}

/// HTTPS destinations signed by an internal CA: refused (the attempt names the unknown
/// issuer) until `delivery.ca_certificates` lists the CA; with
/// `delivery.client_certificate`, deliveries present that certificate (mutual TLS);
/// `/metrics` shows when both expire.
#[tokio::test(flavor = "multi_thread")]
async fn https_destinations_of_an_internal_ca_with_a_client_certificate() {
    let rx = Receiver::start().await;
    let (url, seen) = tls_receiver().await;
    let route = internal_route(&url);

    let gw = TestGateway::start(&route, &rx, &[]).await;
    refused_as_unknown_issuer(&gw).await;
    assert!(seen.lock().unwrap().is_empty());
    gw.shutdown().await.unwrap();

    // (The harness's `[delivery]` table is open: these lines land in it.)
    let trusted = format!(
        "ca_certificates = [\"{}\"]\nclient_certificate = {{ cert = \"{}\", key = \"{}\" }}\n{route}",
        tls_fixture("ca.pem").display(),
        tls_fixture("client.pem").display(),
        tls_fixture("client.key").display()
    );
    let gw = TestGateway::start(&trusted, &rx, &[]).await;
    let id = gw.accept("s", "{}").await;
    gw.settled(&id).await;
    let presented = seen.lock().unwrap().clone();
    let client = rustls::pki_types::pem::PemObject::from_pem_file(tls_fixture("client.pem"))
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    assert_eq!(
        presented,
        vec![Some(client)],
        "one request, with our certificate"
    );
    // When they expire (`openssl x509 -noout -enddate` of the fixtures).
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_certificate_expiry_timestamp_seconds{certificate="delivery.ca_certificates[0]"} 4950017680"#,
        r#"switchyard_certificate_expiry_timestamp_seconds{certificate="delivery.client_certificate"} 4950017681"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}

/// The delivery client follows a reload: a gateway whose deliveries to an internal CA's
/// receiver fail (`UnknownIssuer`) trusts it, and presents its client certificate, once
/// the config names them and is reloaded — no restart — and `/metrics` shows them.
#[tokio::test(flavor = "multi_thread")]
async fn delivery_certificates_apply_at_a_reload() {
    let rx = Receiver::start().await;
    let (url, seen) = tls_receiver().await;
    let route = internal_route(&url);
    let gw = TestGateway::start_from_file(tempfile::tempdir().unwrap(), &route, &rx)
        .await
        .unwrap();
    let (id, e) = refused_as_unknown_issuer(&gw).await;
    assert!(!gw.metrics().await.contains("delivery.client_certificate"));

    let file = gw.dir().join("switchyard.toml");
    let text = std::fs::read_to_string(&file).unwrap().replacen(
        "[delivery]\n",
        &format!(
            "[delivery]\nca_certificates = [\"{}\"]\nclient_certificate = {{ cert = \"{}\", key = \"{}\" }}\n",
            tls_fixture("ca.pem").display(),
            tls_fixture("client.pem").display(),
            tls_fixture("client.key").display()
        ),
        1,
    );
    std::fs::write(&file, text).unwrap();
    gw.reload_applied().await;
    let delivery = e["deliveries"][0]["id"].as_str().unwrap();
    let (status, _) = gw
        .post_api(&format!("/v1/deliveries/{delivery}/retry"))
        .await;
    assert_eq!(status, 202);
    gw.wait_event(&id, |e| e["deliveries"][0]["status"] == "delivered")
        .await;
    let client = rustls::pki_types::pem::PemObject::from_pem_file(tls_fixture("client.pem"))
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    assert_eq!(seen.lock().unwrap().clone(), vec![Some(client)]);
    assert!(
        (gw.metrics().await.lines()).any(|l| l.starts_with(
            r#"switchyard_certificate_expiry_timestamp_seconds{certificate="delivery.client_certificate"}"#
        ))
    );
    gw.shutdown().await.unwrap();
}

/// A CA, client or server certificate file that cannot be used stops the start, naming
/// the key and what is wrong.
#[tokio::test(flavor = "multi_thread")]
async fn unusable_tls_files_are_named_at_start() {
    let rx = Receiver::start().await;
    for (line, key) in [
        (
            "ca_certificates = [\"/nonexistent/ca.pem\"]",
            "delivery.ca_certificates[0]",
        ),
        (
            &*format!(
                "ca_certificates = [\"{}\"]",
                tls_fixture("gen.sh").display()
            ),
            "delivery.ca_certificates[0]",
        ),
        (
            &*format!(
                "client_certificate = {{ cert = \"{}\", key = \"{}\" }}",
                tls_fixture("client.pem").display(),
                tls_fixture("ca.pem").display()
            ),
            "delivery.client_certificate",
        ),
        (
            &*format!(
                "[server.tls]\ncert = \"/nonexistent/gw.pem\"\nkey = \"{}\"",
                tls_fixture("server.key").display()
            ),
            "server.tls`: cannot read /nonexistent/gw.pem",
        ),
        (
            &*format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"",
                tls_fixture("server.pem").display(),
                tls_fixture("ca.pem").display()
            ),
            "holds no PEM private key",
        ),
        (
            &*format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"",
                tls_fixture("server.pem").display(),
                tls_fixture("client.key").display()
            ),
            "are not a certificate and its private key",
        ),
        (
            &*format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_crl = \"{}\"",
                tls_fixture("server.pem").display(),
                tls_fixture("server.key").display(),
                tls_fixture("ca.pem").display()
            ),
            "server.tls.client_crl`: needs server.tls.client_ca",
        ),
        (
            &*format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nclient_crl = \"{}\"",
                tls_fixture("server.pem").display(),
                tls_fixture("server.key").display(),
                tls_fixture("ca.pem").display(),
                tls_fixture("ca.pem").display()
            ),
            "holds no PEM revocation list",
        ),
    ] {
        let err = match TestGateway::try_start(&format!("{line}\n"), &rx, &[]).await {
            Ok(_) => panic!("started with {line}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(key), "{line}: {err}");
    }
}

/// Everything under `/v1` but ingest needs a token of `[api] tokens`, or, to read only, one
/// of `read_tokens`; the probes, `/metrics` and ingest stay open.
#[tokio::test(flavor = "multi_thread")]
async fn the_management_api_requires_a_bearer_token() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let bare = reqwest::Client::new();
    for path in [
        "/v1/destinations",
        "/v1/plugins",
        "/v1/deliveries",
        "/v1/events/x",
    ] {
        let resp = bare.get(format!("{}{path}", gw.url)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "missing or invalid bearer token");
        let wrong = bare
            .get(format!("{}{path}", gw.url))
            .bearer_auth("test-token-0124")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
    }
    let resp = bare
        .post(format!("{}/v1/reload", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(gw.get("/v1/destinations").await.0, 200, "with the token");
    // Ingest and the operational endpoints stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            bare.get(format!("{}{path}", gw.url))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    let resp = bare
        .post(format!("{}/v1/ingest/local", gw.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    gw.shutdown().await.unwrap();

    // A read token: every GET, nothing that changes anything.
    let dir = TestGateway::dir_with_plugins(&[]);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[api]\nread_tokens = [\"support-desk-1\"]\n{}",
        config().replace("{receiver}", &rx.url)
    );
    let gw = TestGateway::start_raw(dir, &text, &|_| None).await.unwrap();
    let reader = |method: reqwest::Method, path: &str| {
        bare.request(method, format!("{}{path}", gw.url))
            .bearer_auth("support-desk-1")
    };
    for path in [
        "/v1/destinations",
        "/v1/events",
        "/v1/stats",
        "/v1/openapi.json",
    ] {
        let resp = reader(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    for (method, path) in [
        (reqwest::Method::POST, "/v1/reload"),
        (reqwest::Method::DELETE, "/v1/destinations/signed"),
        (reqwest::Method::POST, "/v1/destinations/signed/restart"),
    ] {
        let resp = reader(method.clone(), path).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["error"],
            "this token may only read: changes need one of [api] tokens"
        );
    }
    assert_eq!(
        reader(reqwest::Method::GET, "/v1/destinations/signed")
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "still there"
    );
    gw.shutdown().await.unwrap();

    // Without tokens the management API is closed, not open.
    let dir = TestGateway::dir_with_plugins(&[]);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}",
        config().replace("{receiver}", &rx.url)
    );
    let gw = TestGateway::start_raw(dir, &text, &|_| None).await.unwrap();
    let (status, body) = gw.get("/v1/destinations").await;
    assert_eq!(status, 401);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("configure [api] tokens")
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ssrf_guard_refuses_private_destinations_unless_allowed() {
    let rx = Receiver::start().await;
    let port = rx.url.rsplit(':').next().unwrap().to_string();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[api]
tokens = ["{token}"]
[delivery]
retry_schedule = ["0s"]
[[sources]]
name = "s"
[[destinations]]
name = "by-name"
url = "http://localhost:{port}/by-name"
[[destinations]]
name = "literal"
url = "http://127.0.0.1:{port}/literal"
[[destinations]]
name = "metadata"
url = "http://169.254.169.254/latest/meta-data"
[[routes]]
source = "s"
destinations = ["by-name", "literal", "metadata"]
"#,
        token = crate::util::API_TOKEN
    );
    let gw = TestGateway::start_raw(TestGateway::dir_with_plugins(&[]), &text, &|_| None)
        .await
        .unwrap();
    let id = gw.accept("s", "{}").await;
    let e = gw.settled(&id).await;
    for d in e["deliveries"].as_array().unwrap() {
        assert_eq!(d["status"], "failed", "{d}");
        let error = d["attempts"][0]["error"].as_str().unwrap();
        assert!(
            error.contains("refused by the SSRF guard"),
            "{}: {error}",
            d["destination"]
        );
    }
    assert!(
        rx.requests().is_empty(),
        "nothing reached the loopback receiver"
    );
    gw.shutdown().await.unwrap();
}

/// Reads from `stream` until the server answers or closes: what it said (empty if it
/// closed without a word). Fails the test if neither happens within 20 s.
async fn answer_or_close(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the gateway kept a stalled connection open");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_senders_are_cut_off_and_store_nothing() {
    use tokio::io::AsyncWriteExt;
    let rx = Receiver::start().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\n\
         [api]\ntokens = [\"{}\"]\n[delivery]\nallowed_networks = [\"127.0.0.0/8\"]\n{}",
        crate::util::API_TOKEN,
        config().replace("{receiver}", &rx.url)
    );
    let gw = TestGateway::start_raw(TestGateway::dir_with_plugins(&[]), &text, &|_| None)
        .await
        .unwrap();
    let address = gw.url.trim_start_matches("http://").to_string();
    let connect = || tokio::net::TcpStream::connect(address.clone());

    // Headers that never end (slowloris), and a connection that says nothing: both closed.
    let mut trickling = connect().await.unwrap();
    trickling
        .write_all(b"POST /v1/ingest/local HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut silent = connect().await.unwrap();
    // An HTTP/2 connection (prior knowledge) that opens and then says nothing.
    let mut quiet_h2 = connect().await.unwrap();
    quiet_h2
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // A body that stops half-way: 408, with the error in JSON.
    let mut stalled = connect().await.unwrap();
    stalled
        .write_all(
            b"POST /v1/ingest/local HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"type\":",
        )
        .await
        .unwrap();
    // Meanwhile others are served (on a connection of their own: a pooled one would be
    // closed by the 1 s timeout while the checks below wait, just as they reuse it).
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let accepted = unpooled
        .post(format!("{}/v1/ingest/local", gw.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);

    assert_eq!(answer_or_close(&mut trickling).await, "");
    assert_eq!(answer_or_close(&mut silent).await, "");
    answer_or_close(&mut quiet_h2).await; // its SETTINGS, then closed
    let answer = answer_or_close(&mut stalled).await;
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(r#"{"error":"the body did not arrive within 1s"}"#),
        "{answer}"
    );
    // Only the complete event was stored.
    let (status, page) = gw.get("/v1/events").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"switchyard_events_received_total{source="local",result="rejected_timeout"} 1"#
        ),
        "{metrics}"
    );
    gw.shutdown().await.unwrap();
}

/// A sender's credentials in an accepted request are kept with the event (plugins and
/// replays see the request as it came) and never forwarded, and the API shows them
/// redacted, as it does its own secrets; other headers as they came.
#[tokio::test(flavor = "multi_thread")]
async fn the_event_view_hides_the_senders_credentials() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config(), &rx, &[]).await;
    let (status, body) = post(
        &gw,
        "local",
        "{}",
        &[
            ("authorization", "Bearer sender-secret-0123456789".into()),
            ("x-api-key", "k-0123456789abcdef".into()),
            ("idempotency-key", "order-42".into()),
            ("x-region", "eu".into()),
        ],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let event = gw.settled(body["id"].as_str().unwrap()).await;
    let shown = |name: &str| {
        event["event"]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str().unwrap().to_string())
    };
    assert_eq!(
        shown("authorization").as_deref(),
        Some("****6789"),
        "{event}"
    );
    assert_eq!(shown("x-api-key").as_deref(), Some("****cdef"), "{event}");
    assert_eq!(shown("idempotency-key").as_deref(), Some("order-42"));
    assert_eq!(shown("x-region").as_deref(), Some("eu"));
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].header("authorization"), None, "never forwarded");
    assert_eq!(got[0].header("x-region"), Some("eu"));
    gw.shutdown().await.unwrap();
}

/// Senders may speak HTTP/2: by ALPN over HTTPS, or with prior knowledge on plain HTTP (as
/// a load balancer in front does); HTTP/1.1 clients are served as before on the same
/// listener. The events arrive and are delivered whichever protocol brought them, and the
/// body limit holds over HTTP/2 as over HTTP/1.1.
#[tokio::test(flavor = "multi_thread")]
async fn senders_may_speak_http2() {
    let rx = Receiver::start().await;
    let objects = "[[sources]]\nname = \"s\"\n[[destinations]]\nname = \"ok\"\n\
                   url = \"{receiver}/ok\"\n[[routes]]\nsource = \"s\"\ndestinations = [\"ok\"]\n";
    let plain = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[api]\ntokens = [\"{}\"]\n\
         [delivery]\nallowed_networks = [\"127.0.0.0/8\"]\n{}",
        crate::util::API_TOKEN,
        objects.replace("{receiver}", &rx.url)
    );
    let plain = TestGateway::start_raw(TestGateway::dir_with_plugins(&[]), &plain, &|_| None)
        .await
        .unwrap();
    let https = TestGateway::start_raw(
        TestGateway::dir_with_plugins(&[]),
        &https_config("", objects, &rx),
        &|_| None,
    )
    .await
    .unwrap();

    let prior_knowledge = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let http1 = |client: reqwest::ClientBuilder| client.http1_only().build().unwrap();
    let https_url = https.url.replace("http://", "https://");
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(tls_fixture("ca.pem")).unwrap()).unwrap();
    let trusting_the_ca = reqwest::Client::builder().tls_certs_only([ca]);
    let sent = [
        (prior_knowledge, &plain.url, http::Version::HTTP_2),
        (
            http1(reqwest::Client::builder()),
            &plain.url,
            http::Version::HTTP_11,
        ),
        (sender_client(None), &https_url, http::Version::HTTP_2),
        // An HTTPS client that offers only HTTP/1.1 gets it.
        (http1(trusting_the_ca), &https_url, http::Version::HTTP_11),
    ];
    for (n, (client, url, version)) in sent.iter().enumerate() {
        let resp = (client.post(format!("{url}/v1/ingest/s")))
            .body(format!(r#"{{"n":{n}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (resp.status().as_u16(), resp.version()),
            (202, *version),
            "{url}"
        );
    }

    // Over HTTP/2 too, a body over `server.max_body_bytes` (1 MiB by default) gets 413,
    // announced or not (no content-length: streamed in DATA frames), and stores nothing.
    let prior_knowledge = &sent[0].0;
    let large = vec![b' '; 1 << 21];
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        large.chunks(1 << 16).map(|c| Ok(c.to_vec())).collect();
    let bodies = [
        reqwest::Body::from(large.clone()),
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
    ];
    for body in bodies {
        let resp = (prior_knowledge.post(format!("{}/v1/ingest/s", plain.url)))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            (resp.status().as_u16(), resp.version()),
            (413, http::Version::HTTP_2)
        );
    }

    let mut delivered: Vec<i64> = (rx.wait_for(4).await.iter())
        .map(|r| r.json()["n"].as_i64().unwrap())
        .collect();
    delivered.sort();
    assert_eq!(delivered, [0, 1, 2, 3]);
    let (status, page) = plain.get("/v1/events").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    plain.shutdown().await.unwrap();
    https.shutdown().await.unwrap();
}

/// `server.tls`: the real binary serves HTTPS with the configured certificate (a client
/// trusting the test CA ingests, the event is delivered; plain HTTP gets no answer), reads
/// the files again at a reload (a renewal is served to the next connection without a
/// restart), and keeps the certificate it has when a reload finds the files unusable.
#[tokio::test(flavor = "multi_thread")]
async fn the_listener_serves_https_and_a_reload_reads_a_renewed_certificate() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
    std::fs::copy(tls_fixture("server.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("server.key"), &key).unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "./data"
tls = {{ cert = "gw.pem", key = "gw.key" }}
[api]
tokens = ["tls-test-token"]
[delivery]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "ok"
url = "{}/ok"
[[routes]]
source = "s"
destinations = ["ok"]
"#,
            rx.url
        ),
    )
    .unwrap();
    let (_child, url) = crate::util::start_binary(&config).await;
    assert!(url.starts_with("https://"), "{url}");
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(tls_fixture("ca.pem")).unwrap()).unwrap();
    let trusting = || {
        reqwest::Client::builder()
            .tls_certs_only([ca.clone()])
            .build()
            .unwrap()
    };
    let resp = trusting()
        .post(format!("{url}/v1/ingest/s"))
        .body(r#"{"over":"tls"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(&rx.wait_for(1).await[0].body[..], br#"{"over":"tls"}"#);
    let plain = url.replace("https://", "http://");
    let refused = reqwest::get(format!("{plain}/healthz")).await;
    assert!(refused.is_err(), "plain HTTP answered: {refused:?}");

    // The certificate a client is shown, whatever it is.
    let served = || async {
        let client = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .tls_info(true)
            .build()
            .unwrap();
        let resp = client.get(format!("{url}/healthz")).send().await.unwrap();
        let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
        info.peer_certificate().unwrap().to_vec()
    };
    let der = |name: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(tls_fixture(name))
            .unwrap()
            .to_vec()
    };
    assert_eq!(served().await, der("server.pem"));
    let reload = || {
        trusting()
            .post(format!("{url}/v1/reload"))
            .bearer_auth("tls-test-token")
            .send()
    };

    // "Renewed": another certificate of the test CA in the same files.
    std::fs::copy(tls_fixture("client.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("client.key"), &key).unwrap();
    let report: Value = reload().await.unwrap().json().await.unwrap();
    assert_eq!(report["config"], "applied", "{report}");
    assert_eq!(served().await, der("client.pem"));
    // (It names neither 127.0.0.1 nor localhost: a verifying client now refuses it.)
    assert!(
        trusting()
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_err()
    );

    // A key that cannot be read: the reload is rejected, naming the key, and the
    // certificate in force keeps being served.
    std::fs::write(&key, "not a key").unwrap();
    let report: Value = (reqwest::Client::builder().tls_danger_accept_invalid_certs(true))
        .build()
        .unwrap()
        .post(format!("{url}/v1/reload"))
        .bearer_auth("tls-test-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["config"], "rejected", "{report}");
    let error = report["config_error"].as_str().unwrap();
    assert!(
        error.contains("server.tls") && error.contains("gw.key"),
        "{error}"
    );
    assert_eq!(served().await, der("client.pem"));
}

/// A self-signed certificate for 127.0.0.1, issued `days_ago` and valid for `days_left`
/// more, written as `dir/name.pem` and `dir/name.key`: its DER and its `notAfter` (seconds
/// since the epoch).
fn issue_certificate(dir: &Path, name: &str, days_ago: u64, days_left: u64) -> (Vec<u8>, i64) {
    let (now, day) = (now_s(), 24 * 3600);
    let not_after = now + days_left * day;
    let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.not_before = at(now - days_ago * day - 60).into();
    params.not_after = at(not_after).into();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    (cert.der().to_vec(), not_after as i64)
}

/// What the listener shows: the certificate it serves, and the expiry `/metrics` gives
/// for `server.tls`.
async fn served_certificate(url: &str) -> (Vec<u8>, Option<i64>) {
    let client = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .unwrap();
    let resp = client.get(format!("{url}/metrics")).send().await.unwrap();
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
    let der = info.peer_certificate().unwrap().to_vec();
    let text = resp.text().await.unwrap();
    let expiry = (text.lines())
        .find_map(|l| {
            l.strip_prefix(
                r#"switchyard_certificate_expiry_timestamp_seconds{certificate="server.tls"} "#,
            )
        })
        .map(|v| v.parse().unwrap());
    (der, expiry)
}

/// A listener certificate's life: one about to expire is named by `serve --check` and
/// warned of at start, `/metrics` shows when it expires, and a renewal made as certbot
/// makes it — new files, the symlinks in `live/` replaced — is served from the next
/// connection on with no reload asked for (the files' directory is watched).
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_about_to_expire_is_shown_and_its_renewal_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let (archive, live) = (dir.path().join("archive"), dir.path().join("live"));
    std::fs::create_dir_all(&archive).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let link = |target: &Path, link: &Path| {
        // Replaced atomically, as certbot does: a new link renamed over the old one.
        let tmp = link.with_extension("new");
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, link).unwrap();
    };
    let (old, old_expiry) = issue_certificate(&archive, "gw1", 88, 2);
    link(&archive.join("gw1.pem"), &live.join("gw.pem"));
    link(&archive.join("gw1.key"), &live.join("gw.key"));
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"./data\"\n\
         tls = { cert = \"live/gw.pem\", key = \"live/gw.key\" }\n",
    )
    .unwrap();

    let check = std::process::Command::new(crate::util::switchyard_bin())
        .args(["serve", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "an expiring certificate does not stop a start: {out}"
    );
    assert!(
        out.contains("certificate server.tls: expires at") && out.contains("renew it"),
        "{out}"
    );

    let (_child, url, log) = crate::util::start_binary_logging(&config, "info").await;
    let warned = log.lock().unwrap().iter().any(|l| {
        l["level"] == "WARN"
            && l["fields"]["certificate"] == "server.tls"
            && (l["fields"]["message"].as_str()).is_some_and(|m| m.contains("expires at"))
    });
    assert!(warned, "{:?}", log.lock().unwrap());
    assert_eq!(served_certificate(&url).await, (old, Some(old_expiry)));

    let (new, new_expiry) = issue_certificate(&archive, "gw2", 0, 90);
    link(&archive.join("gw2.pem"), &live.join("gw.pem"));
    link(&archive.join("gw2.key"), &live.join("gw.key"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let served = served_certificate(&url).await;
        if served.0 == new {
            assert_eq!(served.1, Some(new_expiry));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewal was not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let reloaded = log.lock().unwrap().iter().any(|l| {
        (l["fields"]["message"].as_str()).is_some_and(|m| m.contains("eload"))
            && l["fields"]["reason"] == "file change"
    });
    assert!(reloaded, "{:?}", log.lock().unwrap());
}

/// `delivery.proxy`: every delivery goes through the configured proxy (a receiver standing
/// in for it gets the request for the public address), and the SSRF guard still judges the
/// destination, not the proxy: an internal IP literal and a name that resolves to loopback
/// are refused before the proxy sees them, though the proxy itself is on loopback.
#[tokio::test(flavor = "multi_thread")]
async fn deliveries_go_through_the_configured_proxy_and_the_guard_judges_the_destination() {
    let proxy = Receiver::start().await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[api]
tokens = ["{}"]
[delivery]
retry_schedule = ["0s"]
proxy = "{}"
[[sources]]
name = "s"
[[destinations]]
name = "public"
url = "http://203.0.113.7/hook"
[[destinations]]
name = "internal"
url = "http://10.1.2.3/hook"
[[destinations]]
name = "named"
url = "http://localhost:9/hook"
[[routes]]
source = "s"
destinations = ["public", "internal", "named"]
"#,
        crate::util::API_TOKEN,
        proxy.url
    );
    let gw = TestGateway::start_raw(tempfile::tempdir().unwrap(), &config, &|_| None)
        .await
        .unwrap();
    let id = gw.accept("s", r#"{"via":"proxy"}"#).await;
    let e = gw.settled(&id).await;
    let got = proxy.wait_for(1).await;
    assert_eq!(
        got.len(),
        1,
        "only the public destination reached the proxy"
    );
    assert_eq!(got[0].headers["host"], "203.0.113.7");
    assert_eq!(&got[0].body[..], br#"{"via":"proxy"}"#);
    let error = |name: &str| {
        let d = (e["deliveries"].as_array().unwrap().iter())
            .find(|d| d["destination"] == name)
            .unwrap();
        d["attempts"][0]["error"].as_str().unwrap_or("").to_string()
    };
    assert!(
        error("internal").contains("refused by the SSRF guard: 10.1.2.3 is a private"),
        "{e}"
    );
    assert!(
        error("named").contains("localhost: refused by the SSRF guard"),
        "{e}"
    );
    assert_eq!(error("public"), "", "{e}");
    gw.shutdown().await.unwrap();
}

/// The environment's proxy variables are not used: with `HTTP_PROXY` and `ALL_PROXY`
/// pointing elsewhere, the real binary delivers straight to the destination.
#[tokio::test(flavor = "multi_thread")]
async fn the_environments_proxy_is_not_used() {
    let (rx, elsewhere) = (Receiver::start().await, Receiver::start().await);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"./data\"\n[delivery]\n\
             allowed_networks = [\"127.0.0.0/8\"]\n[[sources]]\nname = \"s\"\n\
             [[destinations]]\nname = \"ok\"\nurl = \"{}/direct\"\n\
             [[routes]]\nsource = \"s\"\ndestinations = [\"ok\"]\n",
            rx.url
        ),
    )
    .unwrap();
    let env: Vec<(&str, &std::ffi::OsStr)> = ["HTTP_PROXY", "http_proxy", "ALL_PROXY"]
        .into_iter()
        .map(|k| (k, std::ffi::OsStr::new(&elsewhere.url)))
        .collect();
    let (_child, url, _log) = crate::util::start_binary_with_env(&config, "info", &env).await;
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/ingest/s"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(rx.wait_for(1).await[0].uri, "/direct");
    assert!(elsewhere.requests().is_empty());
}

/// A certificate authority made for one test, and the certificates it issues (`pem`, `key`
/// files in `dir`); `names` become DNS subject alternative names, `common_name` the
/// subject's CN.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.distinguished_name).push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A client certificate: its PEM, chain and key together, as `reqwest::Identity` takes it.
    fn client(&self, names: &[&str], common_name: &str) -> Vec<u8> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        (params.distinguished_name).push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem()).into_bytes()
    }

    /// A revocation list (PEM) numbered `number`, issued now and due again in a week, that
    /// revokes these certificates (as `client` made them).
    fn revocation_list(&self, number: u64, revoked: &[&[u8]]) -> String {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let now = now
            + std::time::Duration::from_secs(
                (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH))
                    .unwrap()
                    .as_secs()
                    .saturating_sub(1_767_225_600),
            );
        let revoked_certs = (revoked.iter())
            .map(|pem| {
                let der: rustls::pki_types::CertificateDer<'static> =
                    rustls::pki_types::pem::PemObject::from_pem_slice(pem).unwrap();
                let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
                rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - std::time::Duration::from_secs(60),
            next_update: now + std::time::Duration::from_secs(7 * 24 * 3600),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

/// A gateway config serving HTTPS with the test server certificate (`tls` adds keys to
/// `server.tls`, e.g. `, client_ca = "ca.pem"`), the test API token and loopback
/// deliveries allowed, then `objects` with `{receiver}` replaced by `rx`'s URL.
fn https_config(tls: &str, objects: &str, rx: &Receiver) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\"{tls} }}\n\
         [api]\ntokens = [\"{}\"]\n[delivery]\nallowed_networks = [\"127.0.0.0/8\"]\n{}",
        tls_fixture("server.pem").display(),
        tls_fixture("server.key").display(),
        crate::util::API_TOKEN,
        objects.replace("{receiver}", &rx.url)
    )
}

/// A source `fleet` that takes events only from senders with a client certificate of these
/// names (TOML strings), delivered to the receiver.
fn fleet_of(names: &str) -> String {
    format!(
        r#"
[[sources]]
name = "fleet"
allow_client_names = [{names}]
[[destinations]]
name = "rx"
url = "{{receiver}}/in"
[[routes]]
source = "fleet"
destinations = ["rx"]
"#
    )
}

/// A client of the gateway's HTTPS listener (whose certificate `tests/fixtures/tls/ca.pem`
/// issued) presenting this client certificate and key (PEM), if any.
fn sender_client(identity: Option<&[u8]>) -> reqwest::Client {
    let server_ca =
        reqwest::Certificate::from_pem(&std::fs::read(tls_fixture("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder().tls_certs_only([server_ca]);
    if let Some(pem) = identity {
        b = b.identity(reqwest::Identity::from_pem(pem).unwrap());
    }
    b.build().unwrap()
}

/// Posts `{"n":1}` to a source at `url` (`https://…`); the answer's status and body, or the
/// error of a connection that failed (a refused client certificate fails the handshake).
async fn post_event(
    client: reqwest::Client,
    url: &str,
    source: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let resp = (client.post(format!("{url}/v1/ingest/{source}")))
        .body(r#"{"n":1}"#)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json::<Value>().await.unwrap()))
}

/// `switchyard send` to an HTTPS gateway whose certificate an internal CA issued
/// (`--ca-cert`), presenting a client certificate (`--client-cert`, `--client-key`) to a
/// source that requires one; without the CA it cannot connect, without the certificate the
/// source refuses it (exit 1 both).
#[tokio::test(flavor = "multi_thread")]
async fn send_trusts_an_internal_ca_and_presents_a_client_certificate() {
    let rx = Receiver::start().await;
    let ca = tls_fixture("ca.pem");
    let text = https_config(
        &format!(r#", client_ca = "{}""#, ca.display()),
        &fleet_of(r#""switchyard test client""#),
        &rx,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchyard.toml");
    std::fs::write(&file, &text).unwrap();
    let gw = TestGateway::start_raw(tempfile::tempdir().unwrap(), &text, &|_| None)
        .await
        .unwrap();
    let url = gw.url.replace("http://", "https://");
    let event = xtask::workspace_root().join("examples/events/onomondo-usage.json");
    let (cert, key) = (tls_fixture("client.pem"), tls_fixture("client.key"));
    let send = |extra: &[&std::path::Path]| {
        let mut args: Vec<String> = ["send", "--source", "fleet", "--url", &url]
            .iter()
            .map(|a| a.to_string())
            .collect();
        for (flag, path) in [("--config", &*file), ("--event", &*event)]
            .into_iter()
            .chain(
                ["--ca-cert", "--client-cert", "--client-key"]
                    .into_iter()
                    .zip(extra.iter().copied()),
            )
        {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::cli::run(&args)
        })
    };
    let (ok, _, stderr) = send(&[]).await.unwrap();
    assert!(!ok && stderr.contains("cannot post to"), "{stderr}");
    assert!(
        stderr.contains("UnknownIssuer"),
        "the cause is named: {stderr}"
    );
    let (ok, stdout, stderr) = send(&[&ca]).await.unwrap();
    assert!(!ok && stderr.contains("403"), "{stderr}");
    assert!(
        stdout.contains("this source requires a client certificate"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = send(&[&ca, &cert, &key]).await.unwrap();
    assert!(ok && stderr.contains("202"), "{stdout}{stderr}");
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].body, std::fs::read(&event).unwrap());
    let (ok, _, stderr) = send(&[&ca, &cert]).await.unwrap();
    assert!(!ok && stderr.contains("--client-key"), "{stderr}");
    gw.shutdown().await.unwrap();
}

/// `server.tls.client_ca`: the listener verifies the client certificates senders present
/// against it, and a source with `allow_client_names` takes events only from senders whose
/// certificate names one of them (a SAN DNS name or the CN, any case); `403` otherwise,
/// counted as `rejected_client_certificate`, nothing stored. Sources without it, the API and
/// probes stay open to clients without a certificate; a certificate another authority
/// issued fails the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_may_require_the_senders_client_certificate() {
    let rx = Receiver::start().await;
    let ca = TestCa::new("senders CA");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("senders-ca.pem"), &ca.pem).unwrap();
    let sources = |tls: &str| {
        https_config(
            tls,
            r#"
[[sources]]
name = "open"
[[sources]]
name = "fleet"
allow_client_names = ["sender.example", "Legacy-Sender"]
[[destinations]]
name = "rx"
url = "{receiver}/in"
[[routes]]
source = "open"
destinations = ["rx"]
[[routes]]
source = "fleet"
destinations = ["rx"]
"#,
            &rx,
        )
    };
    // Without the authority to verify them, names cannot be required: the start says so.
    let err = TestGateway::start_raw(tempfile::tempdir().unwrap(), &sources(""), &|_| None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("sources[1].allow_client_names") && err.contains("server.tls.client_ca"),
        "{err}"
    );

    let gw = TestGateway::start_raw(dir, &sources(r#", client_ca = "senders-ca.pem""#), &|_| {
        None
    })
    .await
    .unwrap();
    let url = gw.url.replace("http://", "https://");
    let client = sender_client;
    let post = |c: reqwest::Client, source: &'static str| post_event(c, &url, source);

    // No certificate: the open source, the probes and the API take it; `fleet` does not.
    let anonymous = client(None);
    assert_eq!(post(anonymous.clone(), "open").await.unwrap().0, 202);
    let (status, e) = post(anonymous.clone(), "fleet").await.unwrap();
    assert_eq!(status, 403, "{e}");
    assert_eq!(e["error"], "this source requires a client certificate");
    let health = anonymous
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // The right sender, by its SAN, and an older one by its CN in another case.
    let sender = ca.client(&["sender.example"], "fleet sender");
    assert_eq!(post(client(Some(&sender)), "fleet").await.unwrap().0, 202);
    let legacy = ca.client(&[], "legacy-sender");
    assert_eq!(post(client(Some(&legacy)), "fleet").await.unwrap().0, 202);

    // Another certificate of the same authority: verified, but not one of the names.
    let intruder = ca.client(&["intruder.example"], "intruder");
    let (status, e) = post(client(Some(&intruder)), "fleet").await.unwrap();
    assert_eq!(status, 403, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("intruder.example"),
        "{e}"
    );
    // A certificate of an authority the gateway does not know: no connection at all.
    let rogue = TestCa::new("rogue CA").client(&["sender.example"], "sender.example");
    assert!(post(client(Some(&rogue)), "fleet").await.is_err());

    // Three events accepted and delivered; the two refused stored nothing.
    let delivered = rx.wait_for(3).await;
    assert_eq!(delivered.len(), 3);
    let get = |path: &str| {
        (anonymous.get(format!("{url}{path}")))
            .bearer_auth(crate::util::API_TOKEN)
            .send()
    };
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for line in [
        r#"switchyard_events_received_total{source="fleet",result="rejected_client_certificate"} 2"#,
        r#"switchyard_events_received_total{source="fleet",result="accepted"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains(
            r#"switchyard_certificate_expiry_timestamp_seconds{certificate="server.tls.client_ca"}"#
        ),
        "{metrics}"
    );
    let events: Value = get("/v1/events?source=fleet")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(events["items"].as_array().unwrap().len(), 2, "{events}");
    gw.shutdown().await.unwrap();
}

/// `server.tls.client_crl`: a client certificate its authority revoked fails the
/// handshake; the others of that authority still connect. The list is read again at a
/// reload (a newer list applies to the next connections), its `nextUpdate` is on
/// `/metrics`, and a list no authority of `client_ca` issued is refused at the start.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_client_certificate_is_refused() {
    let rx = Receiver::start().await;
    let ca = TestCa::new("senders CA");
    let alice = ca.client(&["alice.example"], "alice");
    let bob = ca.client(&["bob.example"], "bob");
    let config = https_config(
        r#", client_ca = "senders-ca.pem", client_crl = "senders.crl""#,
        &fleet_of(r#""alice.example", "bob.example""#),
        &rx,
    );

    // A list another authority issued would never apply: refused, by its key.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("senders-ca.pem"), &ca.pem).unwrap();
    let other = TestCa::new("another CA").revocation_list(1, &[&bob]);
    std::fs::write(dir.path().join("senders.crl"), other).unwrap();
    let err = TestGateway::start_raw(dir, &config, &|_| None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("server.tls.client_crl") && err.contains("another CA"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("senders-ca.pem"), &ca.pem).unwrap();
    let crl = dir.path().join("senders.crl");
    std::fs::write(&crl, ca.revocation_list(1, &[&bob])).unwrap();
    let gw = TestGateway::start_from_raw_file(dir, &config)
        .await
        .unwrap();
    let url = gw.url.replace("http://", "https://");
    let post = |identity: &[u8]| post_event(sender_client(Some(identity)), &url, "fleet");
    assert_eq!(post(&alice).await.unwrap().0, 202);
    assert!(post(&bob).await.is_err(), "bob's certificate is revoked");

    // A newer list revokes alice and no longer bob: it applies once reloaded.
    std::fs::write(&crl, ca.revocation_list(2, &[&alice])).unwrap();
    let anonymous = sender_client(None);
    let reload = (anonymous.post(format!("{url}/v1/reload")))
        .bearer_auth(crate::util::API_TOKEN)
        .send()
        .await
        .unwrap();
    let report: Value = reload.json().await.unwrap();
    assert_eq!(report["config"], "applied", "{report}");
    assert_eq!(post(&bob).await.unwrap().0, 202);
    assert!(
        post(&alice).await.is_err(),
        "alice's certificate is revoked"
    );

    assert_eq!(rx.wait_for(2).await.len(), 2);
    let metrics = (anonymous.get(format!("{url}/metrics")))
        .bearer_auth(crate::util::API_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"switchyard_certificate_expiry_timestamp_seconds{certificate="server.tls.client_crl"}"#
        ),
        "{metrics}"
    );
    gw.shutdown().await.unwrap();
}

/// A source's `rate_limit`: a second's worth at once, then `429` with `Retry-After`,
/// counted as `rejected_rate_limited`, nothing stored; other sources are not held back, and
/// requests refused by the source's checks use none of its share.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_over_its_rate_limit_gets_429() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "noisy"
rate_limit = 2
verify = { scheme = "hmac-sha256", secret = "noisy-key", header = "x-signature" }
[[sources]]
name = "quiet"
[[destinations]]
name = "sink"
url = "{receiver}/in"
[[routes]]
source = "noisy"
destinations = ["sink"]
[[routes]]
source = "quiet"
destinations = ["sink"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let signed = |body: &str| vec![("x-signature", hmac_hex(b"noisy-key", body.as_bytes()))];
    // Forged requests first: refused by the signature check, they take no slot.
    for _ in 0..3 {
        let (status, _) = post(&gw, "noisy", "{}", &[("x-signature", "00".into())]).await;
        assert_eq!(status, 401);
    }
    for n in 0..2 {
        let body = format!(r#"{{"n":{n}}}"#);
        let (status, e) = post(&gw, "noisy", &body, &signed(&body)).await;
        assert_eq!(status, 202, "{e}");
    }
    let resp = (gw.client.post(format!("{}/v1/ingest/noisy", gw.url)))
        .header("x-signature", hmac_hex(b"noisy-key", b"{}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(wait, 1, "a slot every 500 ms: whole seconds, rounded up");
    let e: Value = resp.json().await.unwrap();
    assert_eq!(
        e["error"],
        "source `noisy` is over its rate limit of 2 events per second"
    );
    // Another source is not held back.
    let (status, _) = post(&gw, "quiet", "{}", &[]).await;
    assert_eq!(status, 202);

    assert_eq!(rx.wait_for(3).await.len(), 3);
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_events_received_total{source="noisy",result="rejected_rate_limited"} 1"#,
        r#"switchyard_events_received_total{source="noisy",result="accepted"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let (_, events) = gw.get("/v1/events?source=noisy").await;
    assert_eq!(events["items"].as_array().unwrap().len(), 2, "{events}");
    // Out of bounds: refused, naming the key.
    let (status, e) = gw
        .send(
            "POST",
            "/v1/sources",
            Some(json!({ "name": "x", "rate_limit": 0 })),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("rate_limit"), "{e}");
    gw.shutdown().await.unwrap();
}

/// An HTTPS receiver of the test CA that offers HTTP/2 and HTTP/1.1 by ALPN: the protocol
/// version of each request it answered.
async fn h2_receiver() -> (String, Arc<Mutex<Vec<http::Version>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_fixture("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let versions: Arc<Mutex<Vec<http::Version>>> = Arc::default();
    let seen = Arc::clone(&versions);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    seen.lock().unwrap().push(req.version());
                    async {
                        let mut resp = http::Response::new(axum::body::Body::empty());
                        *resp.status_mut() = http::StatusCode::NO_CONTENT;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    (url, versions)
}

/// HTTPS deliveries offer HTTP/2 by ALPN: a receiver that speaks it gets every delivery
/// over h2 (the other HTTPS tests' receivers offer nothing and get HTTP/1.1).
#[tokio::test(flavor = "multi_thread")]
async fn https_deliveries_use_http2_where_the_receiver_offers_it() {
    let rx = Receiver::start().await;
    let (url, versions) = h2_receiver().await;
    // (The harness's `[delivery]` table is open: the first line lands in it.)
    let config = format!(
        "ca_certificates = [\"{}\"]\n{}",
        tls_fixture("ca.pem").display(),
        internal_route(&url)
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(gw.accept("s", format!(r#"{{"n":{n}}}"#)).await);
    }
    for id in &ids {
        let event = gw.settled(id).await;
        assert_eq!(event["deliveries"][0]["status"], "delivered", "{event}");
    }
    let versions = versions.lock().unwrap().clone();
    assert_eq!(versions.len(), 20);
    assert!(
        versions.iter().all(|v| *v == http::Version::HTTP_2),
        "{versions:?}"
    );
    gw.shutdown().await.unwrap();
}

/// An OAuth 2.0 authorization server and the API it guards, in one: `/token` issues
/// `tok-1`, `tok-2`, … (the client credentials grant), and `/api` takes only the token
/// it issued last (unless `valid` is changed: a revocation).
#[derive(Default)]
struct Authority {
    issued: std::sync::atomic::AtomicUsize,
    valid: Mutex<String>,
    expires_in: std::sync::atomic::AtomicU64,
    refuse_client: std::sync::atomic::AtomicBool,
    /// The token endpoint does not answer (for a minute).
    hang: std::sync::atomic::AtomicBool,
    /// Each token request's `authorization` header and form.
    asked: Mutex<Vec<(String, String)>>,
    /// Each API request's token and status.
    called: Mutex<Vec<(String, u16)>>,
}

async fn authority() -> (String, Arc<Authority>) {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::Ordering::SeqCst;
    let auth = Arc::new(Authority::default());
    auth.expires_in.store(3600, SeqCst);
    let header = |headers: &HeaderMap| {
        let value = headers.get("authorization").map(|v| v.to_str().unwrap());
        value.unwrap_or("").to_string()
    };
    let (token_auth, api_auth) = (auth.clone(), auth.clone());
    let app = axum::Router::new()
        .route(
            "/token",
            axum::routing::post(move |headers: HeaderMap, form: String| async move {
                let a = token_auth;
                a.asked.lock().unwrap().push((header(&headers), form));
                if a.hang.load(SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                }
                if a.refuse_client.load(SeqCst) {
                    let error = json!({ "error": "invalid_client", "error_description": "bad secret" });
                    return (StatusCode::UNAUTHORIZED, axum::Json(error));
                }
                let token = format!("tok-{}", a.issued.fetch_add(1, SeqCst) + 1);
                *a.valid.lock().unwrap() = token.clone();
                let expires_in = a.expires_in.load(SeqCst);
                let answer = json!({ "access_token": token, "token_type": "Bearer", "expires_in": expires_in });
                (StatusCode::OK, axum::Json(answer))
            }),
        )
        .route(
            "/api",
            axum::routing::post(move |headers: HeaderMap| async move {
                let a = api_auth;
                let token = header(&headers).trim_start_matches("Bearer ").to_string();
                let ok = token == *a.valid.lock().unwrap();
                let status = if ok { 200 } else { 401 };
                a.called.lock().unwrap().push((token, status));
                StatusCode::from_u16(status).unwrap()
            }),
        );
    (crate::util::serve(app).await, auth)
}

/// Source `s` routed to destination `api` at the `authority`'s `/api`, with `extra` lines
/// and an `oauth2` of its `/token` for client `gw`, plus `more` of its keys.
fn oauth2_route(url: &str, extra: &str, more: &str) -> String {
    let more = if more.is_empty() {
        String::new()
    } else {
        format!(", {more}")
    };
    format!(
        r#"
[[sources]]
name = "s"
[[destinations]]
name = "api"
url = "{url}/api"
{extra}
oauth2 = {{ token_url = "{url}/token", client_id = "gw", client_secret = "cs-0123456789abcdef"{more} }}
[[routes]]
source = "s"
destinations = ["api"]
"#
    )
}

/// A destination with `oauth2` gets one token for many deliveries, a new one when the
/// API refuses the one kept (in the same attempt) or shortly before it expires, and an
/// endpoint that refuses the client fails the attempts with its reason; the API never
/// sees a delivery without a valid token, and the token is not stored with the delivery.
#[tokio::test(flavor = "multi_thread")]
async fn deliveries_carry_an_oauth2_token_renewed_and_replaced_when_refused() {
    use std::sync::atomic::Ordering::SeqCst;
    let (url, auth) = authority().await;
    let rx = Receiver::start().await;
    let oauth2 = r#"scope = "events:write", params = { audience = "fleet" }"#;
    let config = oauth2_route(&url, "", oauth2);
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_from_file(dir, &config, &rx)
        .await
        .unwrap();
    let delivered = async |body: &str| {
        let id = gw.accept("s", body.to_string()).await;
        gw.settled(&id).await
    };
    let ids: Vec<String> =
        futures_util::future::join_all((0..3).map(|n| gw.accept("s", format!(r#"{{"n":{n}}}"#))))
            .await;
    for id in &ids {
        let event = gw.settled(id).await;
        assert_eq!(event["deliveries"][0]["status"], "delivered", "{event}");
    }
    let asked = auth.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "one token for all: {asked:?}");
    let basic = base64::engine::general_purpose::STANDARD.encode("gw:cs-0123456789abcdef");
    assert_eq!(
        asked[0],
        (
            format!("Basic {basic}"),
            "grant_type=client_credentials&scope=events%3Awrite&audience=fleet".into()
        )
    );
    assert_eq!(*auth.called.lock().unwrap(), vec![("tok-1".into(), 200); 3]);

    // A reload that changes the destination but not its `oauth2` keeps the token.
    let file = gw.dir().join("switchyard.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replace(
        r#"url = "{url}/api""#.replace("{url}", &url).as_str(),
        &format!("url = \"{url}/api\"\ntimeout = \"5s\""),
    );
    assert!(text.contains("timeout = \"5s\""), "{text}");
    std::fs::write(&file, text).unwrap();
    gw.reload_applied().await;
    delivered(r#"{"n":2.5}"#).await;
    assert_eq!(
        auth.asked.lock().unwrap().len(),
        1,
        "no token asked for at a reload"
    );
    assert_eq!(auth.called.lock().unwrap()[3], ("tok-1".into(), 200));

    // Revoked: the API refuses tok-1; the same attempt gets tok-2 and delivers.
    *auth.valid.lock().unwrap() = "revoked".into();
    let event = delivered(r#"{"n":3}"#).await;
    let delivery = &event["deliveries"][0];
    assert_eq!(delivery["status"], "delivered", "{event}");
    assert_eq!(delivery["attempts"].as_array().unwrap().len(), 1, "{event}");
    assert_eq!(delivery["attempts"][0]["status_code"], 200, "{event}");
    let called = auth.called.lock().unwrap().clone();
    assert_eq!(called[4..], [("tok-1".into(), 401), ("tok-2".into(), 200)]);
    // Not stored: the deliveries' headers have no token.
    let db = rusqlite::Connection::open(gw.dir().join("data/switchyard.db")).unwrap();
    let stored: Vec<String> = (db.prepare("SELECT headers FROM deliveries").unwrap())
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored.len(), 5);
    assert!(stored.iter().all(|h| !h.contains("tok-")), "{stored:?}");

    // A token that expires in 2 s is renewed after 1 s, before the API would refuse it.
    auth.expires_in.store(2, SeqCst);
    *auth.valid.lock().unwrap() = "revoked".into();
    delivered(r#"{"n":4}"#).await; // tok-2 refused, tok-3 (2 s) delivers
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    delivered(r#"{"n":5}"#).await;
    let called = auth.called.lock().unwrap().clone();
    assert_eq!(
        called[6..],
        [
            ("tok-2".into(), 401),
            ("tok-3".into(), 200),
            ("tok-4".into(), 200)
        ]
    );
    assert_eq!(auth.asked.lock().unwrap().len(), 4);

    // The endpoint refuses the client once tok-4 has expired (until then it would serve
    // on): each attempt fails with its reason, and nothing is sent.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    auth.refuse_client.store(true, SeqCst);
    let id = gw.accept("s", r#"{"n":6}"#).await;
    let event = gw.failed_with(&id, "invalid_client").await;
    let error = event["deliveries"][0]["attempts"][0]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.starts_with("no OAuth 2.0 token: the token endpoint answered 401 Unauthorized: invalid_client (bad secret)"),
        "{event}"
    );
    let called = auth.called.lock().unwrap().clone();
    assert_eq!(called.len(), 9, "{called:?}");
    // Each request to the token endpoint is counted, by how it went.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"switchyard_oauth2_token_requests_total{destination="api",outcome="ok"} 4"#
        ),
        "{metrics}"
    );
    // (One failed request per attempt of the last delivery: the harness makes three.)
    assert!(
        metrics.contains(
            r#"switchyard_oauth2_token_requests_total{destination="api",outcome="failed"} 3"#
        ),
        "{metrics}"
    );
    // The API shows the client secret redacted.
    let (status, shown) = gw.get("/v1/destinations/api").await;
    assert_eq!(status, 200);
    assert_eq!(shown["oauth2"]["client_secret"], "****cdef", "{shown}");
    gw.shutdown().await.unwrap();
}

/// A source whose senders can only add a fixed header (1NCE's webhook headers), put
/// credentials in their URL, or be given a URL with a secret parameter checks that header's
/// or parameter's value against its secrets (several during a rotation): missing or wrong
/// is a `401` naming it, and the credential is not kept — neither shown in the event view
/// nor forwarded to the destination.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_may_check_a_secret_header_basic_credentials_or_a_query_secret() {
    let rx = Receiver::start().await;
    let basic = base64::engine::general_purpose::STANDARD.encode("onenc:pa55-w0rd-0123");
    let config = format!(
        r#"
[[sources]]
name = "1nce"
verify = {{ scheme = "header", header = "x-api-key", secrets = ["k-new-0123456789abcdef", "k-old-0123456789abcdef"] }}
[[sources]]
name = "basic"
verify = {{ scheme = "header", header = "authorization", secrets = ["Basic {basic}"] }}
[[sources]]
name = "onomondo"
verify = {{ scheme = "query", param = "token", secrets = ["q-0123456789abcdef/+"] }}
[[destinations]]
name = "d"
url = "{{receiver}}/in"
[[routes]]
source = "1nce"
destinations = ["d"]
[[routes]]
source = "basic"
destinations = ["d"]
[[routes]]
source = "onomondo"
destinations = ["d"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let body = r#"{"type":"usage"}"#;
    let key = |k: &str| vec![("x-api-key", k.to_string()), ("x-trace", "t-1".to_string())];
    assert_eq!(
        post(&gw, "1nce", body, &[]).await,
        (401, json!({ "error": "missing header `x-api-key`" }))
    );
    assert_eq!(
        post(&gw, "1nce", body, &key("k-new-0123456789abcdeX")).await,
        (
            401,
            json!({ "error": "the `x-api-key` header does not hold an accepted secret" })
        )
    );
    let mut ids = vec![];
    for k in ["k-new-0123456789abcdef", "k-old-0123456789abcdef"] {
        let (status, answer) = post(&gw, "1nce", body, &key(k)).await;
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    // A sender with credentials in its URL (HTTP Basic), as a plain client sends them.
    let sender = reqwest::Client::new();
    let url = gw.url.replace("http://", "http://onenc:pa55-w0rd-0123@");
    let sent = (sender.post(format!("{url}/v1/ingest/basic")).body(body))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    let url = gw.url.replace("http://", "http://onenc:guess@");
    let sent = (sender.post(format!("{url}/v1/ingest/basic")).body(body))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 401);

    // A sender that can only be given a URL: the secret in a query parameter.
    let at = |query: &str| format!("{}/v1/ingest/onomondo{query}", gw.url);
    let post_to = |url: String| {
        let sent = sender.post(url).body(body).send();
        async move {
            let sent = sent.await.unwrap();
            (sent.status().as_u16(), sent.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(
        post_to(at("")).await,
        (401, json!({ "error": "missing query parameter `token`" }))
    );
    assert_eq!(
        post_to(at("?token=q-0123456789abcdef")).await,
        (
            401,
            json!({ "error": "the `token` query parameter does not hold an accepted secret" })
        )
    );
    let (status, answer) = post_to(at("?site=a%20b&token=q-0123456789abcdef%2F%2B")).await;
    assert_eq!(status, 202, "{answer}");
    let event = gw.event(answer["id"].as_str().unwrap()).await;
    assert_eq!(
        event["event"]["query"], "site=a%20b",
        "the secret is not kept: {event}"
    );

    let got = rx.wait_for(4).await;
    for r in &got {
        assert_eq!(r.header("x-api-key"), None, "{:?}", r.headers);
        assert_eq!(r.header("authorization"), None, "{:?}", r.headers);
    }
    assert_eq!(
        got.iter()
            .filter(|r| r.header("x-trace") == Some("t-1"))
            .count(),
        2
    );
    let event = gw.event(&ids[0]).await;
    let headers = event["event"]["headers"].as_array().unwrap();
    assert!(!headers.iter().any(|h| h[0] == "x-api-key"), "{event}");
    // The API shows the secrets redacted.
    let (_, source) = gw.get("/v1/sources/1nce").await;
    assert_eq!(
        source["verify"]["secrets"],
        json!(["****cdef", "****cdef"]),
        "{source}"
    );
    gw.shutdown().await.unwrap();
}

/// A token endpoint that does not answer costs each attempt no more than the
/// destination's timeout — the one that asked and those waiting for its answer alike —
/// and only one request to the endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_that_hangs_fails_attempts_within_their_timeout() {
    use std::sync::atomic::Ordering::SeqCst;
    let (url, auth) = authority().await;
    auth.hang.store(true, SeqCst);
    let rx = Receiver::start().await;
    let extra = "timeout = \"1s\"\nretry = { retry_schedule = [\"0s\"] }";
    let config = oauth2_route(&url, extra, "");
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let ids: Vec<String> =
        futures_util::future::join_all((0..3).map(|n| gw.accept("s", format!(r#"{{"n":{n}}}"#))))
            .await;
    let mut took = vec![];
    for id in &ids {
        let event = gw.failed_with(id, "no OAuth 2.0 token").await;
        let attempt = &event["deliveries"][0]["attempts"][0];
        took.push(attempt["duration_ms"].as_u64().unwrap());
    }
    // The one that asked waited out its timeout; none waited much longer.
    let longest = took.iter().max().unwrap();
    assert!((900..1_900).contains(longest), "{took:?}");
    assert_eq!(
        auth.asked.lock().unwrap().len(),
        1,
        "one request to the endpoint"
    );
    assert!(
        auth.called.lock().unwrap().is_empty(),
        "nothing sent without a token"
    );
    gw.shutdown().await.unwrap();
}
