// js-transform: runs the route's own JavaScript on each event — reshape its body, add
// metadata, drop it, choose its destinations — with no build step: the code is the
// plugin's config, and runs in this plugin's sandbox (its deadline and memory cap; no
// network, no files).
//
// Config:
//   code   JavaScript that defines `function transform(event)`; anything else it defines
//          is its own. `event` is
//            { id, source, receivedAt, method, path, query, contentType,
//              headers: { name: value, … }   (lower-case names; a repeated one's last value)
//              body,                         (its JSON value; its text if it is not JSON)
//              metadata: { key: value, … } } (earlier plugins')
//          and the code may call `lookup(table, key)` (a row of a lookup table, or
//          undefined), `log(message)` (a line in the gateway's log),
//          `state.get(key)`, `state.set(key, value, ttlSeconds)`, `state.remove(key)`,
//          `state.swap(key, expected, value, ttlSeconds)` (sets only over `expected`:
//          true when it did) (text values this plugin keeps between events: WIT
//          `state`; every route using js-transform shares its keys unless given a
//          `scope`), and
//          `http(url, { method, headers, body })` → `{ status, headers, body, json() }`
//          (a request to an origin the route allows: `allow_http`; WIT `http`).
//          transform returns
//            nothing, or the event           the event goes on as changed: its `body`
//                                            (a string is sent as it is, anything else as
//                                            JSON), `metadata` (keys added or changed),
//                                            `headers` (replaced, if changed), `contentType`
//            an object                       the same, from its fields (those missing
//                                            stay as they were)
//            null                            the event is dropped
//          and with `destinations: ["a", "b"]` in what it returns the event goes to those
//          destinations instead of the route's. A throw is the plugin's error (the route's
//          `on_error` applies); so is code that does not compile, or defines no transform.
//
//   scope  a prefix of the code's state keys, keeping its values apart from those of
//          the other routes using js-transform (`scope = "roaming"`)
//
// Build: npm ci && npm run build   (bindings come from ../../wit; nothing hand-written)
// Try:   switchyard plugin run dist/js-transform.wasm --event ../../examples/events/onomondo-usage.json \
//          --config 'code=function transform(e) { e.body.kb = e.body.bytes / 1000; }'

import { configGet, log as hostLog, lookup as hostLookup } from 'switchyard:plugin/host@0.1.4';
import { send } from 'switchyard:plugin/http@0.1.4';
import { get, remove, set, swap } from 'switchyard:plugin/state@0.1.4';

/** A `result` error of the WIT `plugin-error` variant. */
function pluginError(tag, message) {
  const e = new Error(message);
  e.payload = { tag, val: message };
  return e;
}

/** What the code may call besides the language. */
function lookup(table, key) {
  const row = hostLookup(String(table), String(key));
  return row === undefined ? undefined : JSON.parse(row);
}

function log(message) {
  hostLog('info', String(message));
}

/** What the plugin keeps between events, by key: text values (WIT `state`), the keys
 * prefixed by the route's `scope` (read at each call: routes share the instance). */
const scoped = (key) => `${configGet('scope') ?? ''}${key}`;
const state = Object.freeze({
  get: (key) => get(scoped(key)),
  set(key, value, ttlSeconds) {
    if (typeof value !== 'string') throw new TypeError('state.set: the value is a string (JSON.stringify it)');
    set(scoped(key), value, ttlSeconds === undefined ? undefined : Number(ttlSeconds));
  },
  /** Sets `key` to `value` only if it holds `expected` now (undefined: nothing): true when
   * this call set it — of two events handled at once, only one replaces what both read. */
  swap(key, expected, value, ttlSeconds) {
    if (typeof value !== 'string') throw new TypeError('state.swap: the value is a string (JSON.stringify it)');
    return swap(scoped(key), expected ?? undefined, value, ttlSeconds === undefined ? undefined : Number(ttlSeconds));
  },
  remove: (key) => remove(scoped(key)),
});

/** One HTTP request (WIT `http`): the whole response, whatever its status. */
function http(url, options = {}) {
  const method = (options.method ?? (options.body === undefined ? 'GET' : 'POST')).toUpperCase();
  const headers = Object.entries(options.headers ?? {}).map(([k, v]) => [k.toLowerCase(), String(v)]);
  let body = options.body;
  if (body !== undefined && typeof body !== 'string') {
    body = JSON.stringify(body);
    if (!headers.some(([k]) => k === 'content-type')) headers.push(['content-type', 'application/json']);
  }
  let response;
  try {
    response = send({ method, url: String(url), headers, body: body === undefined ? undefined : new TextEncoder().encode(body) });
  } catch (e) {
    throw new Error(`${method} ${url}: ${e.payload ?? e.message}`);
  }
  const text = new TextDecoder().decode(response.body);
  return {
    status: response.status,
    headers: object(response.headers),
    body: text,
    json: () => JSON.parse(text),
  };
}

// Compiled code by its text: an instance kept between events (warm, as a component this
// size is by default) compiles each route's code once. Bounded: routes are few.
const compiled = new Map();
const COMPILED_MAX = 32;

function transformOf(code) {
  let transform = compiled.get(code);
  if (transform !== undefined) return transform;
  let made;
  try {
    made = new Function('lookup', 'log', 'state', 'http',
      `${code}\n;return typeof transform === 'function' ? transform : undefined;`)(lookup, log, state, http);
  } catch (e) {
    throw pluginError('invalid-config', `\`code\` does not compile: ${e}${where(e)}`);
  }
  if (made === undefined) {
    throw pluginError('invalid-config', '`code` must define `function transform(event)`');
  }
  if (compiled.size >= COMPILED_MAX) compiled.clear();
  compiled.set(code, made);
  return made;
}

/** Where in `code` an error is, when the engine says: ` (line N)`. */
function where(e) {
  // (The code is compiled as the body of a function whose header takes two lines: its
  // frames show as `… > Function:LINE:COLUMN`. An error made by a helper here — `http` —
  // is placed at the code's call of it; a syntax error has no frame of the code.)
  const frame = typeof e?.stack === 'string' ? /> Function:(\d+):\d+/.exec(e.stack) : null;
  const line = frame ? Number(frame[1]) - 2
    : (e && typeof e.lineNumber === 'number' && e instanceof SyntaxError ? e.lineNumber - 2 : 0);
  return line > 0 ? ` (line ${line})` : '';
}

/** Pairs as an object, a repeated name's last value winning. */
function object(pairs) {
  const o = {};
  for (const [k, v] of pairs) o[k] = v;
  return o;
}

/** The body as the code sees it: its JSON value, else its text. */
function readBody(bytes) {
  const text = new TextDecoder().decode(bytes);
  try {
    return { value: JSON.parse(text), json: true };
  } catch {
    return { value: text, json: false };
  }
}

/** What the code sees of a value it was given back, to tell whether it changed. */
function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

function text(v, what) {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  throw pluginError('other', `${what} is ${JSON.stringify(v)}: a string or a number`);
}

/** The route's `code`, or an `invalid-config` error. */
function codeOf() {
  const code = configGet('code');
  if (code === undefined || code.trim() === '') {
    throw pluginError('invalid-config',
      '`code` must be JavaScript that defines `function transform(event)`');
  }
  return code;
}

// The route's code compiled when the route comes into force (`serve --check`, a start, a
// reload, the management API), so that one that does not compile, or defines no
// `transform`, is refused then rather than failing its first event. (Its top-level
// statements run: `state` and `http` do nothing during the check.)
export const configCheck = {
  check() {
    try {
      transformOf(codeOf());
    } catch (e) {
      const refused = new Error(e?.payload?.val ?? String(e));
      refused.payload = refused.message;
      throw refused;
    }
  },
};

export const handler = {
  handle(event) {
    const transform = transformOf(codeOf());
    const body = readBody(event.body);
    const given = {
      id: event.id,
      source: event.source,
      receivedAt: Number(event.receivedAt),
      method: event.method,
      path: event.path,
      query: event.query,
      contentType: event.contentType ?? null,
      headers: object(event.headers),
      body: body.value,
      metadata: object(event.metadata),
    };
    const before = { headers: { ...given.headers }, metadata: { ...given.metadata }, body: JSON.stringify(given.body) };
    let out;
    try {
      out = transform(given);
    } catch (e) {
      if (e && e.payload) throw e;
      throw pluginError('other', `transform threw: ${e}${where(e)}`);
    }
    if (out === null) return { tag: 'drop', val: 'transform returned null' };
    if (out === undefined) out = given;
    if (typeof out !== 'object' || Array.isArray(out)) {
      throw pluginError('other',
        `transform returned ${JSON.stringify(out)}: return nothing, the event, an object or null`);
    }

    // The content type, if set; the body, if it changed: a string as it is, anything else
    // as JSON (`application/json` unless the event's already is JSON or one is set).
    let contentType;
    if (out.contentType !== undefined && out.contentType !== null
      && out.contentType !== given.contentType) {
      contentType = text(out.contentType, '`contentType`');
    }
    let newBody;
    if ('body' in out && (out !== given || JSON.stringify(out.body) !== before.body)) {
      if (typeof out.body === 'string') {
        newBody = out.body;
      } else {
        let json;
        try {
          json = JSON.stringify(out.body);
        } catch (e) {
          throw pluginError('other', `the body transform returned is not JSON: ${e}`);
        }
        if (json === undefined) {
          throw pluginError('other', 'the body transform returned is not JSON (undefined or a function)');
        }
        newBody = json;
        const isJson = body.json && /json/i.test(given.contentType ?? '');
        if (contentType === undefined && !isJson) contentType = 'application/json';
      }
    }
    // Metadata added or changed (a removed key stays: the contract only adds).
    const metadata = [];
    if (out.metadata !== undefined) {
      if (out.metadata === null || typeof out.metadata !== 'object' || Array.isArray(out.metadata)) {
        throw pluginError('other', '`metadata` is an object of keys and their values');
      }
      for (const [k, v] of Object.entries(out.metadata)) {
        if (!(k in before.metadata) || !same(before.metadata[k], v)) {
          metadata.push([k, text(v, `metadata \`${k}\``)]);
        }
      }
    }
    // Headers, if changed: the event's replaced; with destinations, those added or changed
    // go with each delivery.
    let headers;
    if (out.headers !== undefined && !same(out.headers, before.headers)) {
      if (out.headers === null || typeof out.headers !== 'object' || Array.isArray(out.headers)) {
        throw pluginError('other', '`headers` is an object of names and their values');
      }
      headers = Object.entries(out.headers)
        .map(([k, v]) => [k.toLowerCase(), text(v, `header \`${k}\``)]);
    }
    const encoded = newBody === undefined ? undefined : new TextEncoder().encode(newBody);

    if (out.destinations !== undefined) {
      const list = out.destinations;
      if (!Array.isArray(list) || list.some((d) => typeof d !== 'string')) {
        throw pluginError('other', '`destinations` is a list of destination names');
      }
      const added = (headers ?? []).filter(([k, v]) => before.headers[k] !== v);
      return {
        tag: 'route',
        val: list.map((destination) => ({
          destination,
          body: encoded,
          contentType,
          headers: added,
          metadata,
        })),
      };
    }
    return { tag: 'continue', val: { body: encoded, contentType, headers, metadata } };
  },
};
