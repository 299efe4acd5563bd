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
//                     with its secret query values as ****)
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
/** `url` with the values of the query parameters whose names name a secret (`api_key`,
 * `token`, … as the gateway's API redacts them) as `****`: what the answer is remembered
 * by, a key the API lists, holds no secret. */
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
    // What the answer is remembered by: the URL, and the body a POST sends.
    const method = sent === undefined ? 'GET' : 'POST';
    const key = sent === undefined ? withoutQuerySecrets(url) : `${withoutQuerySecrets(url)} ${sent}`;
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
