"""change-filter in Python: passes an event on only when what it says of a thing (a SIM, a
device) changed since the last event about that thing, and drops the repeats — the values
it compares kept between events in the gateway's store (WIT `state`, 0.1.2).

The same behaviour as the Rust plugin in plugins/change-filter (the conformance suite in
tests/it/conformance.rs checks that they agree).

Config:
  key     a JSON pointer to what identifies the thing (/iccid)
  fields  comma-separated JSON pointers to the values watched (/network/mcc,/network/mnc)
  ttl     seconds a thing's last values are remembered (default: plugins.state_ttl)
  scope   a prefix of the remembered keys, keeping routes that share the plugin apart

Build (bindings are generated from ../../wit by componentize-py; nothing hand-written):
  pip install -r requirements.txt
  componentize-py -d ../../wit -w checked-plugin componentize app -o change-filter-py.wasm
Try:
  switchyard plugin run change-filter-py.wasm --event ../../examples/events/onomondo-location.json \
      --config key=/iccid --config fields=/network/mcc,/network/mnc
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, state
from wit_world.imports.types import (
    PluginError_InvalidConfig,
    PluginError_InvalidEvent,
    PluginError_Other,
    Update,
    Verdict_Continue,
    Verdict_Drop,
)

MISSING = object()
# How many times a value changed by another event meanwhile is read again.
SWAPS = 10


def scalar_text(v):
    """Strings as they are, numbers as their text (like the Rust SDK's `scalar_text`)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def pointer(value, path):
    """The value at a JSON pointer (RFC 6901), or MISSING."""
    v = value
    for raw in path.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(v, list):
            if not re.fullmatch(r"0|[1-9][0-9]*", token) or int(token) >= len(v):
                return MISSING
            v = v[int(token)]
        elif isinstance(v, dict) and token in v:
            v = v[token]
        else:
            return MISSING
    return v


def update(metadata):
    return Verdict_Continue(Update(body=None, content_type=None, headers=None, metadata=metadata))


def settings():
    """The config: `key`, `fields` and `ttl`; an `invalid-config` error if it is wrong."""
    key = host.config_get("key")
    if key is None:
        raise Err(PluginError_InvalidConfig("`key` must name a JSON pointer, e.g. /iccid"))
    fields = [f.strip() for f in (host.config_get("fields") or "").split(",") if f.strip()]
    if not fields:
        raise Err(PluginError_InvalidConfig("`fields` must list at least one JSON pointer, e.g. /network/mcc"))
    for p in [key, *fields]:
        if not p.startswith("/"):
            raise Err(PluginError_InvalidConfig(f"`{p}` is not a JSON pointer (it starts with /)"))
    ttl = None
    t = host.config_get("ttl")
    if t is not None:
        if not re.fullmatch(r"\+?[0-9]+", t.strip()) or int(t.strip()) > 4294967295:
            raise Err(PluginError_InvalidConfig(f"`ttl` must be a number of seconds, not `{t}`"))
        ttl = int(t.strip())
    return key, fields, ttl


class ConfigCheck(exports.ConfigCheck):
    """The route's configuration, checked when it comes into force (WIT `config-check`)."""

    def check(self):
        try:
            settings()
        except Err as e:
            raise Err(e.value.value)


class Handler(exports.Handler):
    def handle(self, event):
        key, fields, ttl = settings()
        try:
            body = json.loads(event.body)
        except ValueError as e:
            raise Err(PluginError_InvalidEvent(f"body is not valid JSON: {e}"))
        found = pointer(body, key)
        ident = None if found is MISSING else scalar_text(found)
        if ident is None:
            return update([])
        values = [pointer(body, p) for p in fields]
        now = json.dumps([None if v is MISSING else v for v in values], separators=(",", ":"), ensure_ascii=False)
        remembered = f"{host.config_get('scope') or ''}{key}={ident}"
        # What was read is replaced only if it is still there (`swap`): of two events of one
        # SIM handled at once, one passes and the other, reading again, is a repeat.
        # What is kept: the values, the event that set them, the values before (one line
        # each; only the values in what an older version kept). The event that set them
        # passes again (a replay, a run done again); another with the same values is a repeat.
        for _ in range(SWAPS):
            before = state.get(remembered)
            values, by, was = (before.split("\n", 2) + [None, None])[:3] if before is not None else (None, None, None)
            if values == now:
                if by == event.id:
                    return update([("previous", was if was is not None else "[]")])
                return Verdict_Drop(f"{key} {ident}: {','.join(fields)} unchanged ({now})")
            # Received before the event that set them (ids are UUIDv7): passes, keeps the newer.
            if by is not None and event.id < by:
                return update([("newer", values)])
            previous = values if values is not None else "[]"
            try:
                swapped = state.swap(remembered, before, f"{now}\n{event.id}\n{previous}", ttl)
            except Err as e:
                raise Err(PluginError_Other(str(e.value)))
            if swapped:
                return update([("previous", previous)])
        raise Err(PluginError_Other(f"{key} {ident}: its values changed under every one of {SWAPS} tries"))
