"""enrich in Python: adds to an event what another service knows of it (a SIM's customer
from a CRM) by one GET (or POST) per event to that service (WIT `http`, 0.1.3), optionally remembered
for a while (WIT `state`).

The same behaviour as the Rust plugin in plugins/enrich (the conformance suite in
tests/it/conformance.rs checks that they agree).

Config:
  url             the service's URL, `{/pointer}` placeholders filled from the body,
                  percent-encoded (https://crm.example.com/sims/{/iccid}); the route must
                  allow its origin (`allow_http`)
  header.<name>   a header to send
  body            makes the request a POST of this JSON, `{/pointer}` placeholders replaced
                  by the event's values as JSON (a string quoted); content-type
                  application/json unless a header.content-type says otherwise
  into            a JSON pointer where the JSON answer goes (default /enrichment; "" for nowhere)
  metadata.<key>  a JSON pointer into the answer: its value becomes metadata `key`
  not_found       what a 404 means: pass (default), drop or error
  cache_ttl       seconds to remember an answer per URL (state; the key holds the URL
                  with its secret query values as ****, and a digest of its credentials:
                  routes with different ones never share an answer)

Build (bindings are generated from ../../wit by componentize-py; nothing hand-written):
  pip install -r requirements.txt
  componentize-py -d ../../wit -w checked-plugin componentize app -o enrich-py.wasm
"""

import hashlib
import json
import re
from urllib.parse import quote

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, http, state
from wit_world.imports.types import (
    PluginError_InvalidConfig,
    PluginError_InvalidEvent,
    PluginError_Other,
    Update,
    Verdict_Continue,
    Verdict_Drop,
)

MISSING = object()


def scalar_text(v):
    """Strings as they are, numbers as their text (like the Rust SDK's `scalar_text`)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def tokens(path):
    """The tokens of a JSON pointer (RFC 6901)."""
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def pointer(value, path):
    """The value at a JSON pointer, or MISSING."""
    v = value
    for token in tokens(path):
        if isinstance(v, list):
            if not re.fullmatch(r"0|[1-9][0-9]*", token) or int(token) >= len(v):
                return MISSING
            v = v[int(token)]
        elif isinstance(v, dict) and token in v:
            v = v[token]
        else:
            return MISSING
    return v


def percent_encoded(value):
    """A value in a URL: its text, every byte but A-Z a-z 0-9 - . _ ~ as %XX (as the Rust
    plugin does)."""
    return quote(scalar_text(value), safe="-._~")


def as_json(value):
    """A value in a JSON body: as JSON (a string quoted and escaped, as the Rust plugin
    writes it)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


SECRET = ("authorization", "cookie", "key", "token", "secret", "password", "signature")


def cache_key(url, sent, headers):
    """What an answer is remembered by: the URL (its secret query values as `****`: the API
    lists the keys) and the body a POST sends, then -- when the request carries what that
    leaves out (a secret in the URL, headers) -- ` #` and the first 16 hex digits of the
    SHA-256 of the whole URL and the headers (`\\nname: value` each), as the Rust plugin
    makes it: routes that ask one URL with different credentials never share an answer."""
    shown = without_query_secrets(url)
    key = shown if sent is None else f"{shown} {sent}"
    if shown != url or headers:
        credentials = url + "".join(f"\n{name}: {value}" for name, value in headers)
        key += " #" + hashlib.sha256(credentials.encode()).hexdigest()[:16]
    return key


def without_query_secrets(url):
    """`url` with the values of the query parameters whose names name a secret (`api_key`,
    `token`, ... as the gateway's API redacts them) as `****`."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    params = []
    for param in query.split("&"):
        name, eq, value = param.partition("=")
        secret = eq and value and (any(s in name.lower() for s in SECRET) or name.lower() in ("code", "sig"))
        params.append(f"{name}=****" if secret else param)
    return f"{base}?{'&'.join(params)}"


def fill(template, body, what, put):
    """`template` (the config's `what`) with each `{/pointer}` replaced by the body's value
    there (a string or a number), written by `put`."""
    out = ""
    rest = template
    while (start := rest.find("{/")) != -1:
        out += rest[:start]
        end = rest.find("}", start)
        if end == -1:
            raise Err(PluginError_InvalidConfig(f"`{what}` has an unclosed placeholder: `{template}`"))
        path = rest[start + 1 : end]
        found = pointer(body, path)
        if found is MISSING or scalar_text(found) is None:
            raise Err(PluginError_InvalidEvent(f"the body has no string or number at {path}"))
        out += put(found)
        rest = rest[end + 1 :]
    return out + rest


def set_pointer(body, path, value):
    """Sets `value` at `path` in `body`, making the objects missing on the way."""
    ts = tokens(path)
    at = body
    for i, token in enumerate(ts):
        if not isinstance(at, dict):
            raise Err(PluginError_InvalidEvent(f"cannot set {path}: the body is not an object on the way"))
        if i + 1 == len(ts):
            at[token] = value
        else:
            at = at.setdefault(token, {})


def update(metadata, body=None):
    content_type = None if body is None else "application/json"
    return Verdict_Continue(Update(body=body, content_type=content_type, headers=None, metadata=metadata))


def settings():
    """The config's `url`, `into`, `not_found` and `cache_ttl`; an `invalid-config` error if
    it is wrong (a placeholder of `url` or `body` not closed too)."""
    template = host.config_get("url")
    if template is None:
        raise Err(PluginError_InvalidConfig("`url` must name the service, e.g. https://crm.example.com/sims/{/iccid}"))
    into = host.config_get("into")
    into = "/enrichment" if into is None else into
    if into != "" and not into.startswith("/"):
        raise Err(PluginError_InvalidConfig(f"`into` must be a JSON pointer (it starts with /) or empty, not `{into}`"))
    not_found = host.config_get("not_found") or "pass"
    if not_found not in ("pass", "drop", "error"):
        raise Err(PluginError_InvalidConfig(f"`not_found` must be pass, drop or error, not `{not_found}`"))
    ttl = None
    t = host.config_get("cache_ttl")
    if t is not None:
        if not re.fullmatch(r"\+?[0-9]+", t.strip()) or int(t.strip()) > 4294967295:
            raise Err(PluginError_InvalidConfig(f"`cache_ttl` must be a number of seconds, not `{t}`"))
        ttl = int(t.strip())
    for what, text in (("url", template), ("body", host.config_get("body"))):
        rest = text or ""
        while (start := rest.find("{/")) != -1:
            end = rest.find("}", start)
            if end == -1:
                raise Err(PluginError_InvalidConfig(f"`{what}` has an unclosed placeholder: `{text}`"))
            rest = rest[end + 1 :]
    return template, into, not_found, ttl


class ConfigCheck(exports.ConfigCheck):
    """The route's configuration, checked when it comes into force (WIT `config-check`)."""

    def check(self):
        try:
            settings()
        except Err as e:
            raise Err(e.value.value)


class Handler(exports.Handler):
    def handle(self, event):
        template, into, not_found, ttl = settings()
        pairs = host.config()
        headers = [(k[len("header."):], v) for k, v in pairs if k.startswith("header.")]

        try:
            body = json.loads(event.body)
        except ValueError as e:
            raise Err(PluginError_InvalidEvent(f"body is not valid JSON: {e}"))
        url = fill(template, body, "url", percent_encoded)
        body_template = host.config_get("body")
        sent = None if body_template is None else fill(body_template, body, "body", as_json)
        method = "GET" if sent is None else "POST"
        key = cache_key(url, sent, headers)
        answer = MISSING
        if ttl is not None:
            kept = state.get(key)
            if kept is not None:
                try:
                    answer = json.loads(kept)
                except ValueError:
                    answer = MISSING
        if answer is MISSING:
            sent_headers = list(headers)
            if sent is not None and not any(k.lower() == "content-type" for k, _ in headers):
                sent_headers.append(("content-type", "application/json"))
            request_body = None if sent is None else sent.encode()
            try:
                response = http.send(http.Request(method=method, url=url, headers=sent_headers, body=request_body))
            except Err as e:
                raise Err(PluginError_Other(f"{method} {url}: {e.value}"))
            if response.status == 404:
                if not_found == "drop":
                    return Verdict_Drop(f"{method} {url} answered 404")
                if not_found == "error":
                    raise Err(PluginError_Other(f"{method} {url} answered 404"))
                return update([])
            if not 200 <= response.status <= 299:
                raise Err(PluginError_Other(f"{method} {url} answered {response.status}"))
            try:
                answer = json.loads(response.body)
            except ValueError as e:
                raise Err(PluginError_Other(f"{method} {url} did not answer JSON: {e}"))
            if ttl is not None:
                try:
                    state.set(key, json.dumps(answer, separators=(",", ":"), ensure_ascii=False), ttl)
                except Err:
                    pass  # Too large to keep: asked again next time.
        metadata = []
        for k, path in pairs:
            if k.startswith("metadata."):
                found = pointer(answer, path)
                v = None if found is MISSING else scalar_text(found)
                if v is not None:
                    metadata.append((k[len("metadata."):], v))
        if into == "":
            return update(metadata)
        set_pointer(body, into, answer)
        return update(metadata, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
