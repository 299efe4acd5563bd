// enrich in JavaScript: adds to an event what another service knows of it (a SIM's
// customer from a CRM) by one GET (or POST) per event to that service (WIT `http`, 0.1.3),
// optionally remembered for a while (WIT `state`). The same behaviour as the Rust plugin in
// plugins/enrich (the conformance suite in tests/it/conformance.rs checks that they agree).
//
// Config:
//   url               the service's URL, `{/pointer}` placeholders filled from the body,
//                     percent-encoded (https://crm.example.com/sims/{/iccid}); the route must
//                     allow its origin (`allow_http`)
//   header.<name>     a header to send
//   body              makes the request a POST of this JSON, `{/pointer}` placeholders
//                     replaced by the event's values as JSON (a string quoted); content-type
//                     application/json unless a header.content-type says otherwise
//   into              a JSON pointer where the JSON answer goes (default /enrichment; "" for
//                     nowhere)
//   metadata.<key>    a JSON pointer into the answer: its value becomes metadata `key`
//   not_found         what a 404 means: pass (default), drop or error
//   cache_ttl         seconds to remember an answer per URL (state; the key holds the URL
//                     with its secret query values as ****, and a digest of its
//                     credentials: routes with different ones never share an answer)
//
// Build: npm ci && npm run build   (bindings come from ../../wit; nothing hand-written)

import { config, configGet } from 'switchyard:plugin/host@0.1.4';
import { send } from 'switchyard:plugin/http@0.1.4';
import { get, set } from 'switchyard:plugin/state@0.1.4';

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

/** The tokens of a JSON pointer (RFC 6901). */
function tokens(path) {
  return path.split('/').slice(1).map((t) => t.replaceAll('~1', '/').replaceAll('~0', '~'));
}

/** The value at a JSON pointer, or undefined. */
function pointer(value, path) {
  let v = value;
  for (const token of tokens(path)) {
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

/** Every byte but A-Z a-z 0-9 - . _ ~ as %XX (UTF-8), as the Rust plugin does. */
function percentEncode(text) {
  let out = '';
  for (const b of new TextEncoder().encode(text)) {
    const c = String.fromCharCode(b);
    out += /[A-Za-z0-9\-._~]/.test(c) ? c : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** `template` (the config's `what`) with each `{/pointer}` replaced by the body's value
 * there (a string or a number), written by `put`. */
/** What an answer is remembered by: the URL (its secret query values as `****`: the API
 * lists the keys) and the body a POST sends, then — when the request carries what that
 * leaves out (a secret in the URL, headers) — ` #` and the first 16 hex digits of the
 * SHA-256 of the whole URL and the headers (`\nname: value` each), as the Rust plugin
 * makes it: routes that ask one URL with different credentials never share an answer. */
function cacheKey(url, sent, headers) {
  const shown = withoutQuerySecrets(url);
  let key = sent === undefined ? shown : `${shown} ${sent}`;
  if (shown !== url || headers.length > 0) {
    const credentials = url + headers.map(([name, value]) => `\n${name}: ${value}`).join('');
    key += ` #${sha256Hex(new TextEncoder().encode(credentials)).slice(0, 16)}`;
  }
  return key;
}

/** SHA-256 (FIPS 180-4) of bytes, as hex. (The engine's `crypto.subtle.digest` answers
 * with a promise, which a plugin's `handle` cannot wait for.) */
function sha256Hex(bytes) {
  const K = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
  ];
  const h = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
  // The message, a 1 bit, zeros, and its length in bits (64-bit big-endian): 64-byte blocks.
  const length = Math.ceil((bytes.length + 9) / 64) * 64;
  const m = new Uint8Array(length);
  m.set(bytes);
  m[bytes.length] = 0x80;
  const view = new DataView(m.buffer);
  view.setUint32(length - 8, Math.floor(bytes.length / 0x20000000));
  view.setUint32(length - 4, (bytes.length * 8) >>> 0);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  const w = new Uint32Array(64);
  for (let block = 0; block < length; block += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(block + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      [hh, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    [a, b, c, d, e, f, g, hh].forEach((v, i) => { h[i] = (h[i] + v) >>> 0; });
  }
  return h.map((v) => v.toString(16).padStart(8, '0')).join('');
}

/** `url` with the values of the query parameters whose names name a secret (`api_key`,
 * `token`, … as the gateway's API redacts them) as `****`. */
function withoutQuerySecrets(url) {
  const at = url.indexOf('?');
  if (at < 0) return url;
  const secret = ['authorization', 'cookie', 'key', 'token', 'secret', 'password', 'signature'];
  const params = url.slice(at + 1).split('&').map((param) => {
    const eq = param.indexOf('=');
    if (eq < 0 || eq === param.length - 1) return param;
    const name = param.slice(0, eq);
    const lower = name.toLowerCase();
    const isSecret = secret.some((s) => lower.includes(s)) || lower === 'code' || lower === 'sig';
    return isSecret ? `${name}=****` : param;
  });
  return `${url.slice(0, at)}?${params.join('&')}`;
}

function fill(template, body, what, put) {
  let out = '';
  let rest = template;
  for (let start = rest.indexOf('{/'); start !== -1; start = rest.indexOf('{/')) {
    out += rest.slice(0, start);
    const end = rest.indexOf('}', start);
    if (end === -1) throw pluginError('invalid-config', `\`${what}\` has an unclosed placeholder: \`${template}\``);
    const path = rest.slice(start + 1, end);
    const value = pointer(body, path);
    if (scalarText(value) === undefined) throw pluginError('invalid-event', `the body has no string or number at ${path}`);
    out += put(value);
    rest = rest.slice(end + 1);
  }
  return out + rest;
}

/** Sets `value` at `path` in `body`, making the objects missing on the way. */
function setPointer(body, path, value) {
  const ts = tokens(path);
  let at = body;
  for (let i = 0; i < ts.length; i++) {
    if (at === null || typeof at !== 'object' || Array.isArray(at)) {
      throw pluginError('invalid-event', `cannot set ${path}: the body is not an object on the way`);
    }
    if (i + 1 === ts.length) {
      at[ts[i]] = value;
    } else {
      if (!Object.hasOwn(at, ts[i])) at[ts[i]] = {};
      at = at[ts[i]];
    }
  }
}

const unchanged = { body: undefined, contentType: undefined, headers: undefined, metadata: [] };

/** The config's `url`, `into`, `not_found` and `cache_ttl`; an `invalid-config` error if
 * it is wrong (a placeholder of `url` or `body` not closed too). */
function settings() {
  const template = configGet('url');
  if (template === undefined) {
    throw pluginError('invalid-config', '`url` must name the service, e.g. https://crm.example.com/sims/{/iccid}');
  }
  const into = configGet('into') ?? '/enrichment';
  if (into !== '' && !into.startsWith('/')) {
    throw pluginError('invalid-config', `\`into\` must be a JSON pointer (it starts with /) or empty, not \`${into}\``);
  }
  const notFound = configGet('not_found') ?? 'pass';
  if (!['pass', 'drop', 'error'].includes(notFound)) {
    throw pluginError('invalid-config', `\`not_found\` must be pass, drop or error, not \`${notFound}\``);
  }
  let ttl;
  const t = configGet('cache_ttl');
  if (t !== undefined) {
    if (!/^\+?[0-9]+$/.test(t.trim()) || Number(t.trim()) > 4294967295) {
      throw pluginError('invalid-config', `\`cache_ttl\` must be a number of seconds, not \`${t}\``);
    }
    ttl = Number(t.trim());
  }
  for (const [what, text] of [['url', template], ['body', configGet('body')]]) {
    let rest = text ?? '';
    for (let start = rest.indexOf('{/'); start !== -1; start = rest.indexOf('{/')) {
      const end = rest.indexOf('}', start);
      if (end === -1) throw pluginError('invalid-config', `\`${what}\` has an unclosed placeholder: \`${text}\``);
      rest = rest.slice(end + 1);
    }
  }
  return { template, into, notFound, ttl };
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
    const { template, into, notFound, ttl } = settings();
    const all = config();
    const headers = all.filter(([k]) => k.startsWith('header.')).map(([k, v]) => [k.slice('header.'.length), v]);

    let body;
    try {
      body = JSON.parse(new TextDecoder().decode(event.body));
    } catch (e) {
      throw pluginError('invalid-event', `body is not valid JSON: ${e.message}`);
    }
    const url = fill(template, body, 'url', (v) => percentEncode(scalarText(v)));
    const bodyTemplate = configGet('body');
    const sent = bodyTemplate === undefined ? undefined : fill(bodyTemplate, body, 'body', (v) => JSON.stringify(v));
    const method = sent === undefined ? 'GET' : 'POST';
    const key = cacheKey(url, sent, headers);
    let answer;
    if (ttl !== undefined) {
      const kept = get(key);
      if (kept !== undefined) {
        try {
          answer = JSON.parse(kept);
        } catch {
          answer = undefined;
        }
      }
    }
    if (answer === undefined) {
      let response;
      try {
        const sentHeaders = [...headers];
        if (sent !== undefined && !headers.some(([k]) => k.toLowerCase() === 'content-type')) {
          sentHeaders.push(['content-type', 'application/json']);
        }
        response = send({ method, url, headers: sentHeaders, body: sent === undefined ? undefined : new TextEncoder().encode(sent) });
      } catch (e) {
        throw pluginError('other', `${method} ${url}: ${e.payload ?? e.message}`);
      }
      if (response.status === 404) {
        if (notFound === 'drop') return { tag: 'drop', val: `${method} ${url} answered 404` };
        if (notFound === 'error') throw pluginError('other', `${method} ${url} answered 404`);
        return { tag: 'continue', val: unchanged };
      }
      if (response.status < 200 || response.status > 299) {
        throw pluginError('other', `${method} ${url} answered ${response.status}`);
      }
      try {
        answer = JSON.parse(new TextDecoder().decode(response.body));
      } catch (e) {
        throw pluginError('other', `${method} ${url} did not answer JSON: ${e.message}`);
      }
      if (ttl !== undefined) {
        try {
          set(key, JSON.stringify(answer), ttl);
        } catch {
          // Too large to keep: asked again next time.
        }
      }
    }
    const metadata = [];
    for (const [k, path] of all) {
      if (!k.startsWith('metadata.')) continue;
      const v = scalarText(pointer(answer, path));
      if (v !== undefined) metadata.push([k.slice('metadata.'.length), v]);
    }
    if (into === '') return { tag: 'continue', val: { ...unchanged, metadata } };
    setPointer(body, into, answer);
    return {
      tag: 'continue',
      val: {
        body: new TextEncoder().encode(JSON.stringify(body)),
        contentType: 'application/json',
        headers: undefined,
        metadata,
      },
    };
  },
};
