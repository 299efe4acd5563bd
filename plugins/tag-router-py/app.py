"""tag-router in Python: chooses destinations by SIM label or tag, or by ICCID prefix.

The same behaviour as the Rust plugin in plugins/tag-router (the conformance suite in
tests/it/conformance.rs checks that they agree).

Config (keys are rules, values comma-separated destination names):
  label.<label>   events whose `sim_label` is <label>
  tag.<tag>       events whose `tags` list (or `tag` field) holds <tag>
  iccid.<prefix>  events whose ICCID starts with <prefix>
  meta.<name>.<value>  events whose metadata <name> (the last value) is <value>
  default         when no rule matches (without it, such events are dropped)

Build (bindings are generated from ../../wit by componentize-py; nothing hand-written):
  pip install -r requirements.txt
  componentize-py -d ../../wit -w checked-plugin componentize app -o tag-router-py.wasm
Try:
  switchyard plugin run tag-router-py.wasm --event ../../examples/events/onomondo-location.json \
      --config label.valid-example=fleet --config default=archive
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Delivery,
    PluginError_InvalidConfig,
    PluginError_InvalidEvent,
    Verdict_Drop,
    Verdict_Route,
)


def scalar_text(v):
    """Strings as they are, integers as their text (like the Rust SDK's `scalar_text`)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def fields(v):
    """An object's fields; nothing for any other JSON value."""
    return v if isinstance(v, dict) else {}


def metadata(event, name):
    """The last value of a metadata key (when a key repeats, the last pair wins)."""
    found = None
    for k, v in event.metadata:
        if k == name:
            found = v
    return found


def add(chosen, destinations):
    for d in (s.strip() for s in destinations.split(",")):
        if d and d not in chosen:
            chosen.append(d)


def bad_rule(key):
    """What is wrong with a config key, if it is not a rule; else None."""
    if key.startswith("meta."):
        name, dot, _ = key[len("meta."):].partition(".")
        return None if name and dot else f"`{key}`: a metadata rule is meta.NAME.VALUE"
    if key.startswith(("label.", "tag.", "iccid.")) or key == "default":
        return None
    return f"unknown rule `{key}` (use label.X, tag.X, iccid.PREFIX, meta.NAME.VALUE or default)"


class ConfigCheck(exports.ConfigCheck):
    """The route's configuration, checked when it comes into force (WIT `config-check`)."""

    def check(self):
        for key, _ in host.config():
            why = bad_rule(key)
            if why is not None:
                raise Err(why)


class Handler(exports.Handler):
    def handle(self, event):
        try:
            body = json.loads(event.body)
        except ValueError as e:
            raise Err(PluginError_InvalidEvent(f"the body is not JSON: {e}"))
        # Any JSON value is accepted; only an object's fields are looked at.
        top = fields(body)
        # A CloudEvents envelope: look at its `data`.
        payload = fields(top["data"] if "specversion" in top and "data" in top else body)
        label = payload.get("sim_label") if isinstance(payload.get("sim_label"), str) else None
        tags = payload.get("tags")
        if isinstance(tags, list):
            tags = [t for t in tags if isinstance(t, str)]
        elif isinstance(payload.get("tag"), str):
            tags = [payload["tag"]]
        else:
            tags = []
        iccid = metadata(event, "iccid")
        if iccid is None:
            for k in ("iccid", "esimIccid", "esim"):
                iccid = scalar_text(payload.get(k))
                if iccid is not None:
                    break
        if iccid is None:
            iccid = scalar_text(fields(payload.get("data")).get("esim"))

        chosen = []
        fallback = None
        for key, destinations in host.config():
            why = bad_rule(key)
            if why is not None:
                raise Err(PluginError_InvalidConfig(why))
            if key.startswith("label."):
                matched = label == key[len("label."):]
            elif key.startswith("tag."):
                matched = key[len("tag."):] in tags
            elif key.startswith("iccid."):
                matched = iccid is not None and iccid.startswith(key[len("iccid."):])
            elif key.startswith("meta."):
                name, _, value = key[len("meta."):].partition(".")
                matched = metadata(event, name) == value
            else:
                # (`default`: the only other key `bad_rule` lets through.)
                fallback = destinations
                matched = False
            if matched:
                add(chosen, destinations)
        if not chosen:
            if fallback is None:
                return Verdict_Drop("no routing rule matched")
            add(chosen, fallback)
        return Verdict_Route(
            [Delivery(destination=d, body=None, content_type=None, headers=[], metadata=[]) for d in chosen]
        )
