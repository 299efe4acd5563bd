"""py-transform: runs the route's own Python on each event — reshape its body, add metadata,
drop it, choose its destinations — with no build step: the code is the plugin's config, and
runs in this plugin's sandbox (its deadline and memory cap; no network, no files). The
Python counterpart of js-transform (plugins/js-transform), with the same answers.

Config:
  code   Python that defines `def transform(event)`; anything else it defines is its own.
         `event` is a dict:
           { "id", "source", "received_at", "method", "path", "query", "content_type",
             "headers": { name: value, ... }   (lower-case names; a repeated one's last value)
             "body",                           (its JSON value; its text if it is not JSON)
             "metadata": { key: value, ... } } (earlier plugins')
         and the code may call `lookup(table, key)` (a row of a lookup table, or None),
         `log(message)` (a line in the gateway's log), `state.get(key)`,
         `state.set(key, value, ttl_seconds=None)`, `state.remove(key)`,
         `state.swap(key, expected, value, ttl_seconds=None)` (sets only over `expected`:
         True when it did) (text values this plugin keeps between events: WIT `state`;
         every route using py-transform shares its keys unless given a `scope`), and
         `http(url, method=None, headers=None, body=None)` -> a response with `status`,
         `headers`, `body` (text) and `json()` (a request to an origin the route allows:
         `allow_http`; WIT `http`). transform returns
           None, or the event     the event goes on as changed: its "body" (a str is sent as
                                  it is, bytes too, anything else as JSON), "metadata" (keys
                                  added or changed), "headers" (replaced, if changed),
                                  "content_type"
           a dict                 the same, from its keys (those missing stay as they were)
           DROP                   the event is dropped
         and with "destinations": ["a", "b"] in what it returns the event goes to those
         destinations instead of the route's. A raise is the plugin's error (the route's
         `on_error` applies); so is code that does not compile, or defines no transform.

  scope  a prefix of the code's state keys, keeping its values apart from those of the
         other routes using py-transform (`scope = "roaming:"`)

Build (bindings are generated from ../../wit by componentize-py; nothing hand-written):
  pip install -r requirements.txt
  componentize-py -d ../../wit -w checked-plugin componentize app -o py-transform.wasm
Try:
  switchyard plugin run py-transform.wasm --event ../../examples/events/onomondo-usage.json \\
    --config 'code=def transform(e): e["body"]["kb"] = e["body"]["bytes"] / 1000'
"""

import builtins
import json
import traceback

# The standard library modules the route's code may import besides `json`: a component
# holds the modules its app imports when it is built, and no others (ModuleNotFoundError).
# What would act on the world (files, sockets, processes) finds nothing in the sandbox.
import base64  # noqa: F401
import binascii  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import hmac  # noqa: F401
import itertools  # noqa: F401
import math  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import statistics  # noqa: F401
import string  # noqa: F401
import struct  # noqa: F401
import textwrap  # noqa: F401
import time  # noqa: F401
import urllib.parse  # noqa: F401
import uuid  # noqa: F401
import zlib  # noqa: F401

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports import http as wit_http
from wit_world.imports import state as wit_state
from wit_world.imports.types import (
    Delivery,
    PluginError_InvalidConfig,
    PluginError_Other,
    Update,
    Verdict_Continue,
    Verdict_Drop,
    Verdict_Route,
)

# The file name the route's code is compiled under: its frames in a traceback.
CODE = "<code>"


class _Drop:
    """What transform returns to drop the event."""

    def __repr__(self):
        return "DROP"


DROP = _Drop()


def lookup(table, key):
    """A lookup table's row (a dict), or None."""
    row = host.lookup(str(table), str(key))
    return None if row is None else json.loads(row)


def log(message):
    host.log(host.LogLevel.INFO, str(message))


def scoped(key):
    """A state key with the route's `scope` before it (read at each call)."""
    return f"{host.config_get('scope') or ''}{key}"


class State:
    """What the plugin keeps between events, by key: text values (WIT `state`)."""

    @staticmethod
    def get(key):
        return wit_state.get(scoped(key))

    @staticmethod
    def set(key, value, ttl_seconds=None):
        if not isinstance(value, str):
            raise TypeError("state.set: the value is a str (json.dumps it)")
        try:
            wit_state.set(scoped(key), value, None if ttl_seconds is None else int(ttl_seconds))
        except Err as e:
            raise RuntimeError(f"state.set: {e.value}") from None

    @staticmethod
    def swap(key, expected, value, ttl_seconds=None):
        """Sets `key` to `value` only if it holds `expected` now (None: nothing): True when
        this call set it -- of two events handled at once, only one replaces what both
        read."""
        if not isinstance(value, str):
            raise TypeError("state.swap: the value is a str (json.dumps it)")
        try:
            return wit_state.swap(scoped(key), expected, value, None if ttl_seconds is None else int(ttl_seconds))
        except Err as e:
            raise RuntimeError(f"state.swap: {e.value}") from None

    @staticmethod
    def remove(key):
        wit_state.remove(scoped(key))


state = State()


class Response:
    """The whole answer to `http`, whatever its status."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status}>"


def http(url, method=None, headers=None, body=None):
    """One HTTP request (WIT `http`)."""
    method = (method or ("GET" if body is None else "POST")).upper()
    sent_headers = [(str(k).lower(), str(v)) for k, v in (headers or {}).items()]
    if body is not None and not isinstance(body, (str, bytes)):
        body = dumps(body)
        if not any(k == "content-type" for k, _ in sent_headers):
            sent_headers.append(("content-type", "application/json"))
    if isinstance(body, str):
        body = body.encode()
    try:
        response = wit_http.send(wit_http.Request(method=method, url=str(url), headers=sent_headers, body=body))
    except Err as e:
        raise RuntimeError(f"{method} {url}: {e.value}") from None
    return Response(response.status, dict(response.headers), response.body.decode("utf-8", "replace"))


def dumps(value):
    """JSON as the gateway and js-transform write it: compact, UTF-8, numbers plain."""
    return json.dumps(plain(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def plain(value):
    """A float with no fraction as an integer (`120.0` as `120`), as JavaScript writes it: a
    receiver that reads the field as an integer (Go's, say) refuses `120.0`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def where(e):
    """Where in `code` an error is, when its traceback says: ` (line N)`."""
    if isinstance(e, SyntaxError) and e.filename == CODE and e.lineno:
        return f" (line {e.lineno})"
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == CODE]
    return f" (line {lines[-1]})" if lines else ""


def described(e):
    """An exception as `SyntaxError: invalid syntax (line 2)`."""
    message = e.msg if isinstance(e, SyntaxError) else str(e)
    return f"{type(e).__name__}: {message}{where(e)}" if message else f"{type(e).__name__}{where(e)}"


# Compiled code by its text: an instance kept between events (warm, as a component this size
# is by default) compiles each route's code once; what the code defines stays in its own
# namespace. Bounded: routes are few.
compiled = {}
COMPILED_MAX = 32


def transform_of(code):
    made = compiled.get(code)
    if made is not None:
        return made
    namespace = {
        "__builtins__": builtins,
        "__name__": "transform",
        "lookup": lookup,
        "log": log,
        "state": state,
        "http": http,
        "DROP": DROP,
    }
    try:
        exec(compile(code, CODE, "exec"), namespace)
    except SyntaxError as e:
        raise Err(PluginError_InvalidConfig(f"`code` does not compile: {described(e)}"))
    except BaseException as e:  # noqa: BLE001 -- the route's own code: anything it raises
        raise Err(PluginError_InvalidConfig(f"`code` raised as it was loaded: {described(e)}"))
    made = namespace.get("transform")
    if not callable(made):
        raise Err(PluginError_InvalidConfig("`code` must define `def transform(event)`"))
    if len(compiled) >= COMPILED_MAX:
        compiled.clear()
    compiled[code] = made
    return made


def code_of():
    """The route's `code`, or an `invalid-config` error."""
    code = host.config_get("code")
    if code is None or not code.strip():
        raise Err(PluginError_InvalidConfig("`code` must be Python that defines `def transform(event)`"))
    return code


def read_body(data):
    """The body as the code sees it: its JSON value (and True), else its text (and False)."""
    text = data.decode("utf-8", "replace")
    try:
        return json.loads(text, parse_constant=not_json), True
    except ValueError:
        return text, False


def not_json(constant):
    """NaN and Infinity are not JSON (Python's reader takes them)."""
    raise ValueError(f"{constant} is not JSON")


def text(v, what):
    """A header's or metadata value's text: a str, a number or a bool."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(plain(v))
    raise Err(PluginError_Other(f"{what} is {v!r}: a str or a number"))


def alike(value, before):
    """Whether a value is, as JSON, the text `before` (a value that is not JSON is not)."""
    try:
        return dumps(value) == before
    except (TypeError, ValueError):
        return False


def same(a, b):
    """Whether two values are alike as JSON."""
    try:
        return alike(a, dumps(b))
    except (TypeError, ValueError):
        return False


class ConfigCheck(exports.ConfigCheck):
    """The route's code compiled when the route comes into force (`serve --check`, a start, a
    reload, the management API), so that code that does not compile, or defines no
    `transform`, is refused then rather than failing its first event. (Its top-level
    statements run: `state` and `http` do nothing during the check.)"""

    def check(self):
        try:
            transform_of(code_of())
        except Err as e:
            raise Err(e.value.value)


class Handler(exports.Handler):
    def handle(self, event):
        transform = transform_of(code_of())
        body, was_json = read_body(event.body)
        given = {
            "id": event.id,
            "source": event.source,
            "received_at": event.received_at,
            "method": event.method,
            "path": event.path,
            "query": event.query,
            "content_type": event.content_type,
            "headers": dict(event.headers),
            "body": body,
            "metadata": dict(event.metadata),
        }
        before_headers = dict(given["headers"])
        before_metadata = dict(given["metadata"])
        before_body = dumps(body)
        try:
            out = transform(given)
        except Err:
            raise
        except BaseException as e:  # noqa: BLE001 -- the route's own code: anything it raises
            raise Err(PluginError_Other(f"transform raised: {described(e)}"))
        if out is DROP:
            return Verdict_Drop("transform returned DROP")
        if out is None:
            out = given
        if not isinstance(out, dict):
            raise Err(PluginError_Other(f"transform returned {out!r}: return nothing, the event, a dict or DROP"))

        # The content type, if set; the body, if it changed: a str or bytes as they are,
        # anything else as JSON (`application/json` unless the event's already is JSON or
        # one is set).
        content_type = None
        if out.get("content_type") is not None and out.get("content_type") != given["content_type"]:
            content_type = text(out["content_type"], "`content_type`")
        new_body = None
        if "body" in out and (out is not given or not alike(out["body"], before_body)):
            b = out["body"]
            if isinstance(b, bytes):
                new_body = b
            elif isinstance(b, str):
                new_body = b.encode()
            else:
                try:
                    new_body = dumps(b).encode()
                except (TypeError, ValueError) as e:
                    raise Err(PluginError_Other(f"the body transform returned is not JSON: {e}"))
                is_json = was_json and "json" in (given["content_type"] or "").lower()
                if content_type is None and not is_json:
                    content_type = "application/json"
        # Metadata added or changed (a removed key stays: the contract only adds).
        metadata = []
        if out.get("metadata") is not None:
            if not isinstance(out["metadata"], dict):
                raise Err(PluginError_Other("`metadata` is a dict of keys and their values"))
            for k, v in out["metadata"].items():
                if k not in before_metadata or not same(before_metadata[k], v):
                    metadata.append((str(k), text(v, f"metadata `{k}`")))
        # Headers, if changed: the event's replaced; with destinations, those added or changed
        # go with each delivery.
        headers = None
        if out.get("headers") is not None and not same(out["headers"], before_headers):
            if not isinstance(out["headers"], dict):
                raise Err(PluginError_Other("`headers` is a dict of names and their values"))
            headers = [(str(k).lower(), text(v, f"header `{k}`")) for k, v in out["headers"].items()]

        if out.get("destinations") is not None:
            chosen = out["destinations"]
            if not isinstance(chosen, (list, tuple)) or any(not isinstance(d, str) for d in chosen):
                raise Err(PluginError_Other("`destinations` is a list of destination names"))
            added = [(k, v) for k, v in (headers or []) if before_headers.get(k) != v]
            return Verdict_Route(
                [
                    Delivery(destination=d, body=new_body, content_type=content_type, headers=added, metadata=metadata)
                    for d in chosen
                ]
            )
        return Verdict_Continue(Update(body=new_body, content_type=content_type, headers=headers, metadata=metadata))
