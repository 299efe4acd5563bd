// tag-router in JavaScript: chooses destinations by SIM label or tag, or by ICCID prefix.
// The same behaviour as the Rust plugin in plugins/tag-router (the conformance suite in
// tests/it/conformance.rs checks that they agree).
//
// Config (keys are rules, values comma-separated destination names):
//   label.<label>   events whose `sim_label` is <label>
//   tag.<tag>       events whose `tags` list (or `tag` field) holds <tag>
//   iccid.<prefix>  events whose ICCID starts with <prefix>
//   meta.<name>.<value>  events whose metadata <name> (the last value) is <value>
//   default         when no rule matches (without it, such events are dropped)
//
// Build: npm ci && npm run build   (bindings come from ../../wit; nothing hand-written)
// Try:   switchyard plugin run dist/tag-router-js.wasm --event ../../examples/events/onomondo-location.json \
//          --config label.valid-example=fleet --config default=archive

import { config } from 'switchyard:plugin/host@0.1.4';

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

/** The last value of a metadata key (when a key repeats, the last pair wins). */
function metadata(event, name) {
  let found;
  for (const [k, v] of event.metadata) if (k === name) found = v;
  return found;
}

function add(chosen, list) {
  for (const d of list.split(',').map((s) => s.trim())) {
    if (d !== '' && !chosen.includes(d)) chosen.push(d);
  }
}

/** What is wrong with a config key, if it is not a rule. */
function badRule(key) {
  if (key.startsWith('meta.')) {
    const dot = key.slice(5).indexOf('.');
    return dot <= 0 ? `\`${key}\`: a metadata rule is meta.NAME.VALUE` : undefined;
  }
  if (['label.', 'tag.', 'iccid.'].some((p) => key.startsWith(p)) || key === 'default') return undefined;
  return `unknown rule \`${key}\` (use label.X, tag.X, iccid.PREFIX, meta.NAME.VALUE or default)`;
}

// The route's configuration, checked when it comes into force (WIT `config-check`): an
// error's message is the refusal.
export const configCheck = {
  check() {
    const why = config().map(([key]) => badRule(key)).find((w) => w !== undefined);
    if (why !== undefined) {
      const refused = new Error(why);
      refused.payload = why;
      throw refused;
    }
  },
};

export const handler = {
  handle(event) {
    let body;
    try {
      body = JSON.parse(new TextDecoder().decode(event.body));
    } catch (e) {
      throw pluginError('invalid-event', `the body is not JSON: ${e.message}`);
    }
    // Any JSON value is accepted; only an object's fields are looked at.
    const fields = (v) => (v !== null && typeof v === 'object' && !Array.isArray(v) ? v : {});
    const top = fields(body);
    // A CloudEvents envelope: look at its `data`.
    const payload = fields('specversion' in top && 'data' in top ? top.data : body);
    const label = typeof payload.sim_label === 'string' ? payload.sim_label : undefined;
    let tags = [];
    if (Array.isArray(payload.tags)) tags = payload.tags.filter((t) => typeof t === 'string');
    else if (typeof payload.tag === 'string') tags = [payload.tag];
    let iccid = metadata(event, 'iccid');
    if (iccid === undefined) {
      for (const k of ['iccid', 'esimIccid', 'esim']) {
        iccid = scalarText(payload[k]);
        if (iccid !== undefined) break;
      }
    }
    if (iccid === undefined) iccid = scalarText(fields(payload.data).esim);

    const chosen = [];
    let fallback;
    for (const [key, destinations] of config()) {
      const why = badRule(key);
      if (why !== undefined) throw pluginError('invalid-config', why);
      let matched = false;
      if (key.startsWith('label.')) matched = label === key.slice(6);
      else if (key.startsWith('tag.')) matched = tags.includes(key.slice(4));
      else if (key.startsWith('iccid.')) matched = iccid !== undefined && iccid.startsWith(key.slice(6));
      else if (key.startsWith('meta.')) {
        const rule = key.slice(5);
        const dot = rule.indexOf('.');
        matched = metadata(event, rule.slice(0, dot)) === rule.slice(dot + 1);
      } else fallback = destinations; // (`default`: the only other key `badRule` lets through.)
      if (matched) add(chosen, destinations);
    }
    if (chosen.length === 0) {
      if (fallback === undefined) return { tag: 'drop', val: 'no routing rule matched' };
      add(chosen, fallback);
    }
    return {
      tag: 'route',
      val: chosen.map((destination) => ({
        destination,
        body: undefined,
        contentType: undefined,
        headers: [],
        metadata: [],
      })),
    };
  },
};
