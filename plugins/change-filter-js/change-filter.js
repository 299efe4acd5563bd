// change-filter in JavaScript: passes an event on only when what it says of a thing (a SIM,
// a device) changed since the last event about that thing, and drops the repeats — the
// values it compares kept between events in the gateway's store (WIT `state`, 0.1.2).
// The same behaviour as the Rust plugin in plugins/change-filter (the conformance suite in
// tests/it/conformance.rs checks that they agree).
//
// Config:
//   key     a JSON pointer to what identifies the thing (/iccid)
//   fields  comma-separated JSON pointers to the values watched (/network/mcc,/network/mnc)
//   ttl     seconds a thing's last values are remembered (default: plugins.state_ttl)
//   scope   a prefix of the remembered keys, keeping routes that share the plugin apart
//
// Build: npm ci && npm run build   (bindings come from ../../wit; nothing hand-written)
// Try:   switchyard plugin run dist/change-filter-js.wasm --event ../../examples/events/onomondo-location.json \
//          --config key=/iccid --config fields=/network/mcc,/network/mnc

import { configGet } from 'switchyard:plugin/host@0.1.4';
import { get, swap } from 'switchyard:plugin/state@0.1.4';

/** How many times a value changed by another event meanwhile is read again. */
const SWAPS = 10;

/** A `result` error of the WIT `plugin-error` variant. */
function pluginError(tag, message) {
  const e = new Error(message);
  e.payload = { tag, val: message };
  return e;
}

/** Strings as they are, numbers as their text (like the Rust SDK's `scalar_text`). */
function scalarText(v) {
  if (typeof v === 'string') return v;
  if (typeof v === 'number') return String(v);
  return undefined;
}

/** The value at a JSON pointer (RFC 6901), or undefined. */
function pointer(value, path) {
  let v = value;
  for (const raw of path.split('/').slice(1)) {
    const token = raw.replaceAll('~1', '/').replaceAll('~0', '~');
    if (Array.isArray(v)) {
      if (!/^(0|[1-9][0-9]*)$/.test(token)) return undefined;
      v = v[Number(token)];
    } else if (v !== null && typeof v === 'object' && Object.hasOwn(v, token)) {
      v = v[token];
    } else {
      return undefined;
    }
    if (v === undefined) return undefined;
  }
  return v;
}

/** A kept value's lines: values, event id, values before (the last two absent when an
 * older version kept only the values). */
function splitKept(text) {
  const first = text.indexOf('\n');
  if (first < 0) return [text, undefined, undefined];
  const second = text.indexOf('\n', first + 1);
  if (second < 0) return [text.slice(0, first), text.slice(first + 1), undefined];
  return [text.slice(0, first), text.slice(first + 1, second), text.slice(second + 1)];
}

/** The config: `key`, `fields` and `ttl`; an `invalid-config` error if it is wrong. */
function settings() {
  const key = configGet('key');
  if (key === undefined) {
    throw pluginError('invalid-config', '`key` must name a JSON pointer, e.g. /iccid');
  }
  const fields = (configGet('fields') ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  if (fields.length === 0) {
    throw pluginError(
      'invalid-config',
      '`fields` must list at least one JSON pointer, e.g. /network/mcc',
    );
  }
  const bad = [key, ...fields].find((p) => !p.startsWith('/'));
  if (bad !== undefined) {
    throw pluginError('invalid-config', `\`${bad}\` is not a JSON pointer (it starts with /)`);
  }
  let ttl;
  const t = configGet('ttl');
  if (t !== undefined) {
    const n = Number(t.trim());
    if (!/^\+?[0-9]+$/.test(t.trim()) || n > 4294967295) {
      throw pluginError('invalid-config', `\`ttl\` must be a number of seconds, not \`${t}\``);
    }
    ttl = n;
  }
  return { key, fields, ttl };
}

// The route's configuration, checked when it comes into force (WIT `config-check`): an
// error's message is the refusal.
export const configCheck = {
  check() {
    try {
      settings();
    } catch (e) {
      const refused = new Error(e?.payload?.val ?? String(e));
      refused.payload = refused.message;
      throw refused;
    }
  },
};

export const handler = {
  handle(event) {
    const { key, fields, ttl } = settings();
    let body;
    try {
      body = JSON.parse(new TextDecoder().decode(event.body));
    } catch (e) {
      throw pluginError('invalid-event', `body is not valid JSON: ${e.message}`);
    }
    const id = scalarText(pointer(body, key));
    if (id === undefined) {
      return { tag: 'continue', val: { body: undefined, contentType: undefined, headers: undefined, metadata: [] } };
    }
    const now = JSON.stringify(fields.map((p) => pointer(body, p) ?? null));
    const remembered = `${configGet('scope') ?? ''}${key}=${id}`;
    // What was read is replaced only if it is still there (`swap`): of two events of one
    // SIM handled at once, one passes and the other, reading again, is a repeat.
    // What is kept: the values, the event that set them, the values before (one line each;
    // only the values in what an older version kept). The event that set them passes again
    // (a replay, a run done again); another with the same values is a repeat.
    const passes = (previous) => ({
      tag: 'continue',
      val: { body: undefined, contentType: undefined, headers: undefined, metadata: [['previous', previous]] },
    });
    for (let i = 0; i < SWAPS; i++) {
      const before = get(remembered);
      const [values, by, was] = before === undefined ? [] : splitKept(before);
      if (values === now) {
        if (by === event.id) return passes(was ?? '[]');
        return { tag: 'drop', val: `${key} ${id}: ${fields.join(',')} unchanged (${now})` };
      }
      // Received before the event that set them (ids are UUIDv7): passes, keeps the newer.
      if (by !== undefined && event.id < by) {
        return {
          tag: 'continue',
          val: { body: undefined, contentType: undefined, headers: undefined, metadata: [['newer', values]] },
        };
      }
      const previous = values ?? '[]';
      let swapped;
      try {
        swapped = swap(remembered, before, `${now}\n${event.id}\n${previous}`, ttl);
      } catch (e) {
        throw pluginError('other', String(e.payload ?? e.message));
      }
      if (swapped) return passes(previous);
    }
    throw pluginError('other', `${key} ${id}: its values changed under every one of ${SWAPS} tries`);
  },
};
