// The Switchyard dashboard: a single page over the public /v1 API (anything shown here can
// be scripted with the same calls). No framework, no build step, no outside fetches.

const main = document.getElementById('main');
const TOKEN_KEY = 'switchyard-token';
let poller = null;

// Calls `refresh` every `ms` while the page is shown, never two at once: on a large store
// a slow answer must not pile more requests up behind it.
function every(ms, refresh) {
  let busy = false;
  return setInterval(async () => {
    if (busy) return;
    busy = true;
    try { await refresh(); } finally { busy = false; }
  }, ms);
}

// ---- helpers ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const badge = (s) => h('span', { class: `badge ${s}` }, s);
const time = (ms) => (ms ? new Date(ms).toLocaleString() : '');
const short = (sha) => (sha ? sha.slice(0, 12) : '');

function toast(message) {
  const t = document.getElementById('toast');
  t.textContent = message;
  t.classList.add('show');
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove('show'), 3000);
}

class ApiError extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const resp = await fetch(path, {
    ...options,
    headers: { authorization: `Bearer ${token}`, ...(options.headers || {}) },
  });
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    route();
    throw new ApiError('signed out');
  }
  const text = await resp.text();
  const body = text ? JSON.parse(text) : null;
  if (!resp.ok) throw new ApiError(body && body.error ? body.error : `HTTP ${resp.status}`);
  return body;
}

function page(title, ...content) {
  main.replaceChildren(h('h1', {}, title), ...content.flat());
  document.title = `${title} · Switchyard`;
}

function failed(e) {
  if (!(e instanceof ApiError && e.message === 'signed out')) {
    main.append(h('p', { class: 'error', role: 'alert' }, `Error: ${e.message}`));
  }
}

// A JSON editor for the sources, destinations and routes made through the API (`kind`: the
// collection's path): a new one from `template`, or one of `origin: "api"` changed (a merge
// patch of what the editor holds; the fields the API only shows left out) or deleted.
// Objects of the config file are read-only here, as over the API.
function objectEditor(kind, noun, template, shownOnly, refresh) {
  const title = h('h2', {});
  const text = h('textarea', { class: 'object-json', rows: 10, spellcheck: 'false', 'aria-label': `${noun} as JSON` });
  let editing = null;
  // A route's `js-transform` and `py-transform` entries get their code in an editor of its
  // own: a function is not written as a JSON string. Kept in step with the JSON both ways.
  const codes = h('div', { class: 'plugin-codes' });
  const languages = { 'js-transform': 'JavaScript', 'py-transform': 'Python' };
  const renderCodes = () => {
    let object;
    try { object = JSON.parse(text.value); } catch { return; }
    const entries = (Array.isArray(object?.plugins) ? object.plugins : [])
      .map((p, i) => [p, i]).filter(([p]) => p && Object.hasOwn(languages, p.name));
    codes.replaceChildren(...entries.map(([p, i]) => h('label', { class: 'plugin-code' },
      `plugins[${i}]: ${p.name}'s code`,
      h('textarea', { rows: 10, spellcheck: 'false', 'aria-label': `${languages[p.name]} of plugins[${i}]`,
        oninput: (e) => {
          let now;
          try { now = JSON.parse(text.value); } catch { toast('Fix the JSON first: the code goes into it.'); return; }
          now.plugins[i].config = { ...(now.plugins[i].config || {}), code: e.target.value };
          text.value = JSON.stringify(now, null, 2);
        } }, (p.config && p.config.code) || ''))));
  };
  text.addEventListener('input', renderCodes);
  const card = h('div', { class: `card editor ${kind}-editor`, hidden: true }, title, text, codes);
  const close = () => { card.hidden = true; editing = null; };
  const save = h('button', { class: 'save', onclick: async () => {
    let body;
    try { body = JSON.parse(text.value); } catch (err) { toast(`Not JSON: ${err.message}`); return; }
    try {
      if (editing) {
        if (body && body.name === editing) delete body.name;
        await api(`/v1/${kind}/${encodeURIComponent(editing)}`, { method: 'PATCH', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
        toast(`${noun} ${editing} changed.`);
      } else {
        const made = await api(`/v1/${kind}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
        toast(`${noun} ${made.name} created.`);
      }
      close();
      refresh();
    } catch (err) { toast(err.message); }
  } }, 'Create');
  card.append(h('div', { class: 'row' }, save, h('button', { class: 'cancel', onclick: close }, 'Cancel')));
  const open = (object) => {
    editing = object ? object.name : null;
    title.textContent = object ? `Change ${noun.toLowerCase()} ${object.name}` : `New ${noun.toLowerCase()}`;
    const shown = object ? Object.fromEntries(Object.entries(object).filter(([k]) => k !== 'origin' && !shownOnly.includes(k))) : template;
    text.value = JSON.stringify(shown, null, 2);
    renderCodes();
    save.textContent = object ? 'Save' : 'Create';
    card.hidden = false;
    text.focus();
  };
  const remove = async (object) => {
    if (!confirm(`Delete ${noun.toLowerCase()} ${object.name}?`)) return;
    try {
      await api(`/v1/${kind}/${encodeURIComponent(object.name)}`, { method: 'DELETE' });
      toast(`${noun} ${object.name} deleted.`);
      if (editing === object.name) close();
      refresh();
    } catch (err) { toast(err.message); }
  };
  // The buttons a listed object gets: Edit and Delete if it was made through the API.
  const actions = (object) => object.origin !== 'api' ? [] : [
    h('button', { class: 'edit', onclick: () => open(object) }, 'Edit'),
    h('button', { class: 'delete', onclick: () => remove(object) }, 'Delete')];
  const create = h('button', { class: `new-${kind}`, onclick: () => open(null) }, `New ${noun.toLowerCase()}`);
  return { card, create, actions };
}

// ---- sign in --------------------------------------------------------------------------

function signIn() {
  const input = h('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'current-password', required: true });
  const message = h('p', { class: 'error', role: 'alert' });
  const form = h('form', {
    onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value);
      const resp = await fetch('/v1/plugins', { headers: { authorization: `Bearer ${input.value}` } });
      if (resp.ok) {
        location.hash = '#/events';
        route();
      } else {
        sessionStorage.removeItem(TOKEN_KEY);
        message.textContent = 'That token was not accepted.';
      }
    },
  },
  h('label', { for: 'token' }, 'API token', input),
  h('button', { class: 'primary', type: 'submit' }, 'Sign in'),
  message);
  main.replaceChildren(h('div', { class: 'signin card' }, h('h1', {}, 'Sign in'),
    h('p', { class: 'muted' }, 'Use a bearer token from [api] tokens.'), form));
  input.focus();
}

// ---- events -----------------------------------------------------------------------------

const filters = { source: '', type: '', field: '', status: '', route_result: '', since: '' };

function chart(minutes) {
  const w = 720, hgt = 150, pad = 20;
  const series = [['received', '#1f5fbf'], ['delivered', '#17794a'], ['failed', '#b3261e']];
  const max = Math.max(1, ...minutes.flatMap((m) => series.map(([k]) => m[k])));
  const x = (i) => pad + (i * (w - 2 * pad)) / Math.max(1, minutes.length - 1);
  const y = (v) => hgt - pad - (v * (hgt - 2 * pad)) / max;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
  svg.setAttribute('class', 'chart');
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  const total = (k) => minutes.reduce((a, m) => a + m[k], 0);
  svg.setAttribute('aria-label', `Last hour: ${total('received')} received, ${total('delivered')} delivered, ${total('failed')} failed`);
  const axis = document.createElementNS(ns, 'line');
  Object.entries({ x1: pad, x2: w - pad, y1: hgt - pad, y2: hgt - pad, stroke: '#b9c2cc' }).forEach(([k, v]) => axis.setAttribute(k, v));
  svg.append(axis);
  const label = document.createElementNS(ns, 'text');
  Object.entries({ x: pad, y: 12, 'font-size': 11, fill: '#5d6875' }).forEach(([k, v]) => label.setAttribute(k, v));
  label.textContent = `max ${max}/min`;
  svg.append(label);
  for (const [k, color] of series) {
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', minutes.map((m, i) => `${x(i)},${y(m[k])}`).join(' '));
    line.setAttribute('fill', 'none');
    line.setAttribute('stroke', color);
    line.setAttribute('stroke-width', '2');
    svg.append(line);
  }
  const legend = h('div', { class: 'legend' }, series.map(([k, c]) =>
    h('span', {}, h('i', { style: `background:${c}` }), `${k} ${total(k)}`)));
  return h('div', { class: 'card' }, h('div', { class: 'row' }, h('strong', {}, 'Last hour, per minute'), legend), svg);
}

async function eventsPage() {
  const sources = await api('/v1/sources?limit=500').catch(() => ({ items: [] }));
  const search = h('input', { id: 'search', name: 'id', placeholder: 'event id', 'aria-label': 'Find an event by id' });
  const field = (name, el) => { el.value = filters[name]; el.addEventListener('change', () => { filters[name] = el.value; refresh(); }); return el; };
  const form = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); if (search.value.trim()) location.hash = `#/events/${search.value.trim()}`; } },
    h('label', {}, 'Source', field('source', h('select', { name: 'source' }, h('option', { value: '' }, 'all'),
      sources.items.map((s) => h('option', { value: s.name }, s.name))))),
    h('label', {}, 'Type', field('type', h('input', { name: 'type', placeholder: 'usage' }))),
    h('label', {}, 'Body field', field('field', h('input', { name: 'field', placeholder: 'iccid=8945…', title: 'A field of the JSON body (keys separated by dots) and the value it must have' }))),
    h('label', {}, 'Status', field('status', h('select', { name: 'status' }, h('option', { value: '' }, 'all'),
      h('option', { value: 'queued' }, 'queued'), h('option', { value: 'processed' }, 'processed')))),
    h('label', {}, 'Routes', field('route_result', h('select', { name: 'route_result' }, h('option', { value: '' }, 'any'),
      h('option', { value: 'failed' }, 'dead-lettered'), h('option', { value: 'dropped' }, 'dropped'),
      h('option', { value: 'delivering' }, 'delivering')))),
    h('label', {}, 'Since', field('since', h('input', { name: 'since', type: 'datetime-local' }))),
    h('label', {}, 'Find by id', search),
    h('button', { type: 'submit' }, 'Open'));
  const chartBox = h('div');
  const table = h('div', { class: 'card' });
  page('Events', chartBox, h('div', { class: 'card' }, form), table);

  function query(limit) {
    const q = new URLSearchParams({ limit });
    if (filters.source) q.set('source', filters.source);
    if (filters.type) q.set('type', filters.type);
    if (filters.field) {
      // `data.iccid=8945…`: the field, and the value after the first `=`.
      const at = filters.field.indexOf('=');
      q.set('field', at < 0 ? filters.field : filters.field.slice(0, at));
      q.set('equals', at < 0 ? '' : filters.field.slice(at + 1));
    }
    if (filters.status) q.set('status', filters.status);
    if (filters.route_result) q.set('route_result', filters.route_result);
    if (filters.since) q.set('since', String(new Date(filters.since).getTime()));
    return q;
  }

  // Every dead letter the filters select, through the current plugins again, a page at a time.
  async function replayDeadLetters() {
    if (!confirm('Run every dead-lettered event these filters select through the current plugins again?')) return;
    const q = query('500');
    let replayed = 0;
    try {
      for (let cursor = null, first = true; first || cursor; first = false) {
        if (cursor) q.set('cursor', cursor);
        const r = await api(`/v1/events/replay?${q}`, { method: 'POST' });
        replayed += r.replayed.length;
        cursor = r.next_cursor;
      }
      toast(`${replayed} ${replayed === 1 ? 'event' : 'events'} replayed.`);
    } catch (err) { toast(err.message); }
    refresh();
  }

  // Every event the filters select, erased for good with its deliveries and attempts, a
  // page at a time; those still being processed or delivered are left, and counted.
  async function eraseSelected() {
    if (!confirm('Erase for good every event these filters select, with its deliveries and attempts?')) return;
    const q = query('500');
    let erased = 0, busy = 0;
    try {
      for (let cursor = null, first = true; first || cursor; first = false) {
        if (cursor) q.set('cursor', cursor);
        const r = await api(`/v1/events/erase?${q}`, { method: 'POST' });
        erased += r.erased.length;
        busy += r.busy.length;
        cursor = r.next_cursor;
      }
      toast(`${erased} ${erased === 1 ? 'event' : 'events'} erased${busy ? `; ${busy} still being processed or delivered, left` : ''}.`);
    } catch (err) { toast(err.message); }
    refresh();
  }

  async function refresh() {
    try {
      const [events, stats] = await Promise.all([api(`/v1/events?${query('100')}`), api('/v1/stats?minutes=60')]);
      chartBox.replaceChildren(chart(stats.minutes));
      const deadLetters = filters.route_result === 'failed' && events.items.length > 0;
      // (The API erases only a list that a filter narrows.)
      const narrowed = [filters.source, filters.type, filters.field, filters.route_result, filters.since].some(Boolean);
      table.replaceChildren(events.items.length === 0 ? h('p', { class: 'muted' }, 'No events yet.') : h('div', {},
        (deadLetters || narrowed) ? h('div', { class: 'row' },
          deadLetters ? h('button', { class: 'replay-all', onclick: replayDeadLetters }, 'Replay dead letters') : null,
          narrowed ? h('button', { class: 'erase-all danger', title: 'Erase for good every event these filters select (a device\'s history, on request)', onclick: eraseSelected }, 'Erase these events') : null) : null,
        h('table', { id: 'events' },
          h('thead', {}, h('tr', {}, h('th', {}, 'Received'), h('th', {}, 'Source'), h('th', { class: 'hide-narrow' }, 'Type'),
            h('th', {}, 'Status'), h('th', { class: 'num' }, 'Delivered'), h('th', { class: 'num hide-narrow' }, 'Pending'),
            h('th', { class: 'num hide-narrow' }, 'Failed'))),
          h('tbody', {}, events.items.map((e) => h('tr', { 'data-id': e.id },
            h('td', {}, h('a', { href: `#/events/${e.id}` }, time(e.received_at))),
            h('td', {}, e.source), h('td', { class: 'hide-narrow' }, e.event_type || ''), h('td', {}, badge(e.status),
              e.failed_routes ? ' ' : null, e.failed_routes ? h('span', { class: 'badge failed', title: `${e.failed_routes} route(s) failed: open the event to see why, then replay it` }, 'dead-letter') : null),
            h('td', { class: 'num' }, e.delivered), h('td', { class: 'num hide-narrow' }, e.pending),
            h('td', { class: `num hide-narrow ${e.failed ? 'error' : ''}` }, e.failed)))))));
    } catch (e) { failed(e); }
  }
  await refresh();
  poller = every(2000, refresh);
}

// A body as the API shows it (`body`, with `body_encoding` beside it) as text to read or
// edit: JSON indented, text as it is; null for bytes that are not text (their `body` is
// `{"base64": …}`).
function bodyText(body, encoding) {
  if (encoding === 'base64') return null;
  return encoding === 'text' ? body : JSON.stringify(body, null, 2);
}

// Each route's outcome: its plugin steps with verdict, version and duration, and the result
// (an event's runs, or a dry run's).
function routeCards(routes) {
  return routes.map((r) => h('div', { class: 'card route' },
    h('div', { class: 'row' }, h('strong', {}, r.name ? `Route ${r.name}` : `Route #${r.route}`), h('span', { class: 'muted' }, `run ${r.run}`),
      badge(r.result.result), r.result.reason ? h('span', {}, r.result.reason) : null, r.result.error ? h('span', { class: 'error' }, r.result.error) : null),
    h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'Plugin'), h('th', {}, 'Version'), h('th', { class: 'num' }, 'Duration'), h('th', {}, 'Verdict'))),
      h('tbody', {}, r.steps.map((s) => h('tr', { class: 'step' },
        h('td', {}, s.plugin), h('td', { class: 'mono', title: s.sha256 }, short(s.sha256)),
        h('td', { class: 'num' }, `${s.duration_us} µs`),
        h('td', {}, s.outcome === 'verdict' ? h('pre', {}, JSON.stringify(s.verdict, null, 2)) : h('span', { class: 'error' }, s.error))))))));
}

async function eventPage(id) {
  let e;
  try { e = await api(`/v1/events/${encodeURIComponent(id)}`); } catch (err) { page('Event'); failed(err); return; }
  const ev = e.event;
  const text = bodyText(ev.body, ev.body_encoding);
  const replay = h('button', { class: 'primary', id: 'replay', onclick: async () => {
    try { await api(`/v1/events/${ev.id}/replay`, { method: 'POST' }); toast('Replayed: a new run is queued.'); setTimeout(() => eventPage(id), 700); } catch (err) { toast(err.message); }
  } }, 'Replay');
  const dryBox = h('div', { id: 'dry-result' });
  const dryReplay = h('button', { id: 'dry-replay', title: 'What a replay would do: this event through the plugins in force, nothing stored or sent', onclick: async () => {
    try {
      const r = await api(`/v1/events/${encodeURIComponent(ev.id)}/dry-run`, { method: 'POST' });
      dryBox.replaceChildren(h('div', { class: 'card dry' }, h('h2', {}, 'A replay would do this (dry run)'), ...dryRunResult(r, 'h3')));
    } catch (err) { toast(err.message); }
  } }, 'Dry run a replay');
  const tryIt = h('button', { id: 'dry-run', disabled: text === null, title: text === null
    ? 'This payload is not text (shown as base64), so it cannot be edited here: dry run a replay instead'
    : 'Open this payload in the dry run, to edit it and run it through the routes in force', onclick: () => {
    draft = { source: ev.source, body: text, contentType: ev.content_type || 'application/json' };
    location.hash = `#/dry-run/${encodeURIComponent(ev.source)}`;
  } }, 'Edit payload');
  const erase = h('button', { id: 'erase', class: 'danger', title: 'Erase this event for good, with its deliveries and attempts (a pending delivery is not sent)', onclick: async () => {
    if (!confirm(`Erase event ${ev.id} for good, with its deliveries and attempts?`)) return;
    try { await api(`/v1/events/${encodeURIComponent(ev.id)}`, { method: 'DELETE' }); toast('Event erased.'); location.hash = '#/events'; } catch (err) { toast(err.message); }
  } }, 'Erase');
  const routes = routeCards(e.routes);
  const deliveries = e.deliveries.map((d) => h('div', { class: 'card delivery', 'data-id': d.id },
    h('div', { class: 'row' }, h('strong', {}, d.destination), badge(d.status), h('span', { class: 'mono muted' }, d.id),
      h('span', { class: 'muted' }, `run ${d.run}`),
      (d.status === 'failed' || d.status === 'pending') ? h('button', { onclick: async () => {
        try { await api(`/v1/deliveries/${d.id}/retry`, { method: 'POST' }); toast('Retry queued.'); setTimeout(() => eventPage(id), 700); } catch (err) { toast(err.message); }
      } }, 'Retry') : null),
    h('div', { class: 'mono muted' }, d.url),
    d.status === 'pending' ? h('p', { class: 'next muted' }, d.next_attempt_at
      ? `Next attempt ${time(d.next_attempt_at)}.` : 'Held until the destination is restarted.') : null,
    d.attempts.length === 0 ? h('p', { class: 'muted' }, 'No attempt yet.') :
      h('table', { class: 'attempts' }, h('thead', {}, h('tr', {}, h('th', {}, 'At'), h('th', {}, 'Status'), h('th', { class: 'num' }, 'Duration'), h('th', {}, 'Error or response'))),
        h('tbody', {}, d.attempts.map((a) => h('tr', { class: 'attempt' },
          h('td', {}, time(a.at)), h('td', {}, a.status_code ?? '—'), h('td', { class: 'num' }, `${a.duration_ms} ms`),
          h('td', {}, a.error ? h('span', { class: 'error' }, a.error) : h('code', {}, (a.response || '').slice(0, 200)))))))));
  page(`Event ${ev.id}`,
    h('div', { class: 'card' }, h('div', { class: 'row' }, badge(e.status),
      e.routes.some((r) => r.run === ev.run && r.result.result === 'failed')
        ? h('span', { class: 'badge failed', title: 'A route failed on this run: see Routes below; replay once fixed' }, 'dead-letter') : null,
      h('span', {}, `${ev.source} · ${time(ev.received_at)} · run ${ev.run}`), replay, dryReplay, tryIt, erase)),
    dryBox,
    h('h2', {}, 'Payload'), h('div', { class: 'card' }, text === null ? h('p', { class: 'muted' }, 'Not text: shown as base64.') : null,
      h('pre', { id: 'payload' }, text ?? JSON.stringify(ev.body, null, 2))),
    h('h2', {}, 'Headers'), h('div', { class: 'card' }, h('table', {}, h('tbody', {}, ev.headers.map(([k, v]) => h('tr', {}, h('th', {}, k), h('td', { class: 'mono' }, v)))))),
    h('h2', {}, 'Routes'), routes.length ? routes : h('p', { class: 'muted' }, 'Not processed yet.'),
    h('h2', {}, 'Deliveries'), deliveries.length ? deliveries : h('p', { class: 'muted' }, 'No deliveries.'));
  if (e.status === 'queued' || e.deliveries.some((d) => d.status === 'pending')) {
    poller = setInterval(() => { clearInterval(poller); eventPage(id); }, 1500);
  }
}

// ---- dry run --------------------------------------------------------------------------------

// The payload the dry-run page opens with, when another page sends one there.
let draft = null;

// A dry run's answer: each route's outcome, the HTTP requests its plugins asked for, and
// every request it would send.
function dryRunResult(r, heading = 'h2') {
  const asked = r.requests || [];
  return [
    h(heading, {}, 'Routes'), r.routes.length ? routeCards(r.routes) : h('p', { class: 'muted' }, 'No route takes events from this source.'),
    asked.length === 0 ? null : [h(heading, {}, 'Plugins asked'),
      h('div', { class: 'card' }, h('table', { id: 'dry-requests' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Plugin'), h('th', {}, 'Request'), h('th', {}, 'Answer'))),
        h('tbody', {}, asked.map((q) => h('tr', { class: 'request' },
          h('td', {}, q.plugin), h('td', { class: 'mono' }, `${q.method} ${q.url}`),
          h('td', {}, q.error ? h('span', { class: 'error' }, q.error) : String(q.status)))))))],
    h(heading, {}, 'Would send'), r.deliveries.length === 0 ? h('p', { class: 'muted' }, 'Nothing.') :
      r.deliveries.map((d) => h('div', { class: 'card planned', 'data-destination': d.destination },
        h('div', { class: 'row' }, h('strong', {}, d.destination), badge(d.status === 'pending' ? 'would send' : d.status)),
        h('div', { class: 'mono muted url' }, `POST ${d.url}`),
        h('table', {}, h('tbody', {}, d.headers.map(([k, v]) => h('tr', {}, h('th', {}, k), h('td', { class: 'mono' }, v))))),
        h('pre', { class: 'body' }, bodyText(d.body, d.body_encoding) ?? JSON.stringify(d.body, null, 2))))].flat().filter((c) => c);
}

// A payload through a source's routes as they are in force: the plugins' verdicts and the
// requests each destination would get. Nothing is stored or sent.
async function dryRunPage(source) {
  const sources = await api('/v1/sources?limit=500');
  const start = draft && draft.source === source ? draft : { body: '{\n  "type": "usage"\n}', contentType: 'application/json' };
  draft = null;
  const pick = h('select', { name: 'source', id: 'dry-source' },
    sources.items.map((s) => h('option', { value: s.name, selected: s.name === source }, s.name)));
  const payload = h('textarea', { id: 'dry-payload', name: 'payload', rows: 12, spellcheck: 'false' });
  payload.value = start.body;
  const contentType = h('input', { id: 'dry-type', name: 'content_type', value: start.contentType });
  const result = h('div', { id: 'dry-result' });
  const form = h('form', { class: 'dry-run', onsubmit: async (e) => {
    e.preventDefault();
    try {
      const r = await api(`/v1/sources/${encodeURIComponent(pick.value)}/dry-run`, { method: 'POST', headers: { 'content-type': contentType.value }, body: payload.value });
      result.replaceChildren(...dryRunResult(r));
    } catch (err) { result.replaceChildren(h('p', { class: 'error', role: 'alert' }, `Error: ${err.message}`)); }
  } },
  h('div', { class: 'row' }, h('label', {}, 'Source', pick), h('label', {}, 'Content type', contentType),
    h('button', { type: 'button', id: 'dry-latest', title: "Fill in the payload of this source's newest event", onclick: async () => {
      try {
        const list = await api(`/v1/events?source=${encodeURIComponent(pick.value)}&limit=1`);
        if (list.items.length === 0) { toast(`No events from ${pick.value} yet.`); return; }
        const e = await api(`/v1/events/${encodeURIComponent(list.items[0].id)}`);
        const text = bodyText(e.event.body, e.event.body_encoding);
        if (text === null) { toast(`The newest event from ${pick.value} is not text: dry run a replay of it from its page.`); return; }
        payload.value = text;
        contentType.value = e.event.content_type || 'application/json';
      } catch (err) { toast(err.message); }
    } }, 'Newest event')),
  h('label', { class: 'payload' }, 'Payload', payload),
  h('div', { class: 'row' }, h('button', { class: 'primary', type: 'submit' }, 'Run'),
    h('span', { class: 'muted' }, 'Runs the routes in force on this payload; stores, sends and counts nothing.')));
  page('Dry run', h('div', { class: 'card' }, form), result);
}

// ---- destinations and plugins ---------------------------------------------------------

async function destinationsPage() {
  const box = h('div', { class: 'card' });
  const editor = objectEditor('destinations', 'Destination', { name: '', url: 'https://', event_types: ['*'] },
    ['state', 'state_since', 'consecutive_failures', 'last_error', 'pending', 'failed', 'last_delivered_at', 'next_test_at'], () => refresh());
  // One destination's failed deliveries (oldest first), opened from its failed count.
  const failures = h('div', { class: 'card failures', hidden: true });
  async function showFailed(name) {
    try {
      const r = await api(`/v1/deliveries?status=failed&destination=${encodeURIComponent(name)}&limit=50`);
      const last = (d) => d.attempts[d.attempts.length - 1] || {};
      failures.replaceChildren(h('h2', {}, `Failed deliveries to ${name}`),
        r.items.length === 0 ? h('p', { class: 'muted' }, 'None.') : h('table', { id: 'failed-deliveries' },
          h('thead', {}, h('tr', {}, h('th', {}, 'Event'), h('th', {}, 'Last attempt'), h('th', { class: 'num' }, 'Status'), h('th', {}, 'Error'))),
          h('tbody', {}, r.items.map((d) => h('tr', { 'data-id': d.id },
            h('td', {}, h('a', { href: `#/events/${d.event_id}`, class: 'mono' }, d.event_id)),
            h('td', {}, time(last(d).at)), h('td', { class: 'num' }, last(d).status_code ?? ''),
            h('td', { class: 'error' }, last(d).error || ''))))),
        r.next_cursor ? h('p', { class: 'muted' }, 'The oldest 50 are shown.') : null,
        h('button', { class: 'close', onclick: () => { failures.hidden = true; } }, 'Close'));
      failures.hidden = false;
    } catch (err) { toast(err.message); }
  }
  page('Destinations', h('div', { class: 'row' }, editor.create), editor.card, failures, box);
  async function refresh() {
    try {
      const list = await api('/v1/destinations?limit=500');
      box.replaceChildren(h('table', { id: 'destinations' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'State'), h('th', { class: 'num' }, 'Pending'),
          h('th', { class: 'num' }, 'Failed'), h('th', { class: 'hide-narrow' }, 'Last error'), h('th', {}, 'Actions'))),
        h('tbody', {}, list.items.map((d) => h('tr', { 'data-name': d.name },
          h('td', {}, h('div', {}, d.name), h('div', { class: 'mono muted hide-narrow' }, d.url),
            h('div', { class: 'muted last-delivered' }, d.last_delivered_at ? `last delivered ${time(d.last_delivered_at)}` : 'nothing delivered since start')),
          h('td', {}, badge(d.state), d.state !== 'ACTIVE' && d.state_since
            ? h('div', { class: 'muted state-since' }, `since ${time(d.state_since)}`) : null, d.next_test_at
            ? h('div', { class: 'muted next-test', title: 'restart_after: a test message that passes makes it ACTIVE again' }, `tested again ${time(d.next_test_at)}`) : null),
          h('td', { class: 'num' }, d.pending), h('td', { class: 'num' }, d.failed > 0
            ? h('button', { class: 'link failed-count', title: 'list them', onclick: () => showFailed(d.name) }, d.failed) : d.failed),
          h('td', { class: 'hide-narrow error' }, d.last_error || ''),
          h('td', {}, h('div', { class: 'row' },
            h('button', { class: 'restart', onclick: async () => {
              try { await api(`/v1/destinations/${d.name}/restart`, { method: 'POST' }); toast(`${d.name} restarted.`); } catch (err) { toast(err.message); }
              refresh();
            } }, 'Restart'),
            h('button', { class: 'test', onclick: async () => {
              try { const r = await api(`/v1/destinations/${d.name}/test`, { method: 'POST' }); toast(r.ok ? `Test: ${r.status_code}` : `Test failed: ${r.error}`); } catch (err) { toast(err.message); }
            } }, 'Test'),
            d.state === 'ACTIVE' ? h('button', { class: 'pause', onclick: async () => {
              if (!confirm(`Pause ${d.name}? Its deliveries wait until it is restarted.`)) return;
              try { await api(`/v1/destinations/${d.name}/pause`, { method: 'POST' }); toast(`${d.name} paused.`); } catch (err) { toast(err.message); }
              refresh();
            } }, 'Pause') : null,
            d.failed > 0 ? h('button', { class: 'recover', onclick: async () => {
              if (!confirm(`Send the ${d.failed} failed deliveries to ${d.name} again?`)) return;
              try {
                const r = await api(`/v1/destinations/${d.name}/recover`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ since: 0 }) });
                toast(`${r.retried} failed ${r.retried === 1 ? 'delivery' : 'deliveries'} to ${d.name} sent again.`);
              } catch (err) { toast(err.message); }
              refresh();
            } }, 'Resend failed') : null,
            editor.actions(d))))))));
    } catch (e) { failed(e); }
  }
  await refresh();
  poller = every(2000, refresh);
}

// Each route as the gateway runs it: its source (and how that source is checked), the
// plugin chain with each plugin's status, and the destinations with their states.
async function routesPage() {
  const box = h('div', { class: 'card' });
  const sourcesBox = h('div', { class: 'card' });
  const routeEditor = objectEditor('routes', 'Route', { name: '', source: '', plugins: [], destinations: [] }, ['error'], () => refresh());
  const sourceEditor = objectEditor('sources', 'Source', { name: '' }, ['refused', 'last_accepted_at'], () => refresh());
  page('Routes', h('div', { class: 'row' }, routeEditor.create, sourceEditor.create), routeEditor.card, sourceEditor.card, box,
    h('h2', {}, 'Sources'), sourcesBox);
  async function refresh() {
    try {
      const [routes, sources, plugins, destinations] = await Promise.all(
        ['routes', 'sources', 'plugins', 'destinations'].map((what) => api(`/v1/${what}${what === 'plugins' ? '' : '?limit=500'}`)));
      const byName = (list) => Object.fromEntries(list.items.map((x) => [x.name, x]));
      const [src, plugin, dest] = [byName(sources), byName(plugins), byName(destinations)];
      // How a source's senders are checked: a signature, a secret header, an address, a certificate.
      const verified = (v) => !v || v.scheme === 'none' ? null
        : v.scheme === 'header' ? `secret header (${v.header})`
        : v.scheme === 'query' ? `secret query parameter (${v.param})`
        : `signed (${v.scheme})`;
      const checks = (s) => [s && verified(s.verify),
        s && s.allow_ips && s.allow_ips.length ? 'IP allowlist' : null,
        s && s.allow_client_names && s.allow_client_names.length ? 'client certificate' : null].filter(Boolean).join(', ') || 'not verified';
      // What a source refused lately (a wrong secret, an address not allowed…): such
      // requests store nothing, so this is where a sender's misconfiguration shows.
      const refused = (s) => !s || !s.refused || !s.refused.total ? null
        : h('div', { class: 'error refused', title: s.refused.recent.map((r) => `${time(r.at)}: ${r.status} ${r.error}`).join('\n') },
          `${s.refused.total} refused, latest ${time(s.refused.recent[0].at)}: ${s.refused.recent[0].status} ${s.refused.recent[0].error}`);
      const showEvents = (source) => h('a', { href: '#/events', class: 'events', onclick: () => { Object.assign(filters, { source, type: '', field: '', status: '', route_result: '', since: '' }); } }, 'Events');
      box.replaceChildren(routes.items.length === 0 ? h('p', { class: 'muted' }, 'No routes: events are stored and go nowhere.') :
        h('table', { id: 'routes' },
          h('thead', {}, h('tr', {}, h('th', {}, 'Route'), h('th', {}, 'Source'), h('th', {}, 'Plugins'),
            h('th', {}, 'Destinations'), h('th', { class: 'hide-narrow' }, 'On error'), h('th', {}, ''))),
          h('tbody', {}, routes.items.map((r) => h('tr', { 'data-name': r.name },
            h('td', {}, h('div', {}, r.name), h('div', { class: 'muted' }, r.origin),
              // A route made through the API that its plugin no longer takes: its events
              // fail there until it is changed.
              r.error ? h('div', { class: 'error route-error' }, r.error) : null),
            h('td', {}, h('div', {}, r.source), h('div', { class: 'muted hide-narrow' }, checks(src[r.source])),
              h('div', { class: 'muted last-accepted' }, src[r.source] && src[r.source].last_accepted_at ? `last event ${time(src[r.source].last_accepted_at)}` : 'no event since start'),
              src[r.source] && src[r.source].retention ? h('div', { class: 'muted retention hide-narrow' },
                `events kept ${Object.entries(src[r.source].retention).map(([k, v]) => `${v} if ${k}`).join(', ')}`) : null,
              refused(src[r.source])),
            h('td', { class: 'chain' }, r.plugins.length === 0 ? h('span', { class: 'muted' }, 'none') :
              r.plugins.flatMap((p, i) => [i ? ' → ' : null, h('span', { class: 'plugin' }, p.name,
                p.on_error ? h('span', { class: 'muted', title: 'this plugin\'s own on_error' }, ` (${p.on_error})`) : null,
                plugin[p.name] && plugin[p.name].status !== 'ok' ? [' ', badge(plugin[p.name].status)] : null,
                plugin[p.name] && plugin[p.name].degraded ? [' ', h('span', { class: 'badge error' }, 'degraded')] : null)])),
            h('td', {}, r.destinations.map((d) => h('div', { class: 'destination' }, d, ' ',
              dest[d] && dest[d].state !== 'ACTIVE' ? badge(dest[d].state) : null))),
            h('td', { class: 'hide-narrow' }, r.on_error),
            h('td', {}, h('div', { class: 'row' }, showEvents(r.source),
              h('a', { href: `#/dry-run/${encodeURIComponent(r.source)}`, class: 'dry-run' }, 'Dry run'),
              routeEditor.actions(r))))))));
      // Every source, those no route takes events from included (their events are stored
      // and go nowhere).
      const routed = new Set(routes.items.map((r) => r.source));
      sourcesBox.replaceChildren(h('table', { id: 'sources' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Source'), h('th', {}, 'Checked'), h('th', {}, 'Routes'), h('th', {}, ''))),
        h('tbody', {}, sources.items.map((s) => h('tr', { 'data-name': s.name },
          h('td', {}, h('div', {}, s.name), h('div', { class: 'muted' }, s.origin)),
          h('td', {}, checks(s)),
          h('td', {}, routed.has(s.name) ? routes.items.filter((r) => r.source === s.name).map((r) => r.name).join(', ') : h('span', { class: 'muted' }, 'none')),
          h('td', {}, h('div', { class: 'row' }, sourceEditor.actions(s))))))));
    } catch (e) { failed(e); }
  }
  await refresh();
  poller = every(5000, refresh);
}

// What plugins keep between events (`state`): one plugin's values by key, a prefix to
// narrow them, a value forgotten by hand (the plugin finds nothing under its key then).
function keptValues(names) {
  const plugin = h('select', { id: 'state-plugin', name: 'plugin' }, names.map((n) => h('option', { value: n }, n)));
  const prefix = h('input', { id: 'state-prefix', name: 'prefix', placeholder: 'key prefix' });
  const rows = h('div');
  async function load() {
    const p = plugin.value;
    try {
      const page = await api(`/v1/plugins/${encodeURIComponent(p)}/state?limit=100&prefix=${encodeURIComponent(prefix.value)}`);
      rows.replaceChildren(page.items.length === 0 ? h('p', { class: 'muted' }, `${p} keeps no values${prefix.value ? ' under this prefix' : ''}.`) :
        h('table', { id: 'state' },
          h('thead', {}, h('tr', {}, h('th', {}, 'Key'), h('th', {}, 'Value'), h('th', { class: 'hide-narrow' }, 'Expires'), h('th', {}))),
          h('tbody', {}, page.items.map((v) => h('tr', { 'data-key': v.key },
            h('td', { class: 'mono' }, v.key), h('td', { class: 'mono' }, v.value), h('td', { class: 'hide-narrow' }, time(v.expires_at)),
            h('td', {}, h('button', { onclick: async () => {
              if (!confirm(`Forget ${p}'s value under ${v.key}?`)) return;
              try {
                await api(`/v1/plugins/${encodeURIComponent(p)}/state?key=${encodeURIComponent(v.key)}`, { method: 'DELETE' });
                toast(`${p} forgot ${v.key}.`);
              } catch (err) { toast(err.message); }
              load();
            } }, 'Forget')))))),
        ...(page.next_cursor ? [h('p', { class: 'muted' }, 'The first 100 shown: narrow them with a prefix.')] : []));
    } catch (e) { rows.replaceChildren(h('p', { class: 'error' }, e.message)); }
  }
  // Every value under the prefix (all of the plugin's without one): the plugin starts afresh.
  const forgetAll = h('button', { type: 'button', onclick: async () => {
    const p = plugin.value;
    const what = prefix.value ? `every value of ${p} whose key starts with ${prefix.value}` : `every value ${p} keeps`;
    if (!confirm(`Forget ${what}?`)) return;
    try {
      const r = await api(`/v1/plugins/${encodeURIComponent(p)}/state?prefix=${encodeURIComponent(prefix.value)}`, { method: 'DELETE' });
      toast(`${p} forgot ${r.removed} ${r.removed === 1 ? 'value' : 'values'}.`);
    } catch (err) { toast(err.message); }
    load();
  } }, 'Forget all');
  const form = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); load(); } },
    h('label', {}, 'Plugin', plugin), h('label', {}, 'Key starts with', prefix), h('button', { type: 'submit' }, 'Show'), forgetAll);
  plugin.addEventListener('change', load);
  if (names.length) load();
  return [h('h2', {}, 'Values kept between events'), h('div', { class: 'card' }, form, rows)];
}

async function pluginsPage() {
  const box = h('div', { class: 'card' });
  const tablesBox = h('section', { hidden: true });
  const stateBox = h('section');
  page('Plugins', box, tablesBox, stateBox);
  try {
    const [list, tables] = await Promise.all([api('/v1/plugins'), api('/v1/tables')]);
    // The lookup tables plugins read (`[tables]`), when the config has any.
    tablesBox.hidden = tables.items.length === 0;
    tablesBox.replaceChildren(h('h2', {}, 'Lookup tables'), h('div', { class: 'card' }, h('table', { id: 'tables' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', { class: 'num' }, 'Rows'), h('th', { class: 'hide-narrow' }, 'File'))),
      h('tbody', {}, tables.items.map((t) => h('tr', { 'data-name': t.name },
        h('td', {}, t.name), h('td', { class: 'num' }, String(t.rows)), h('td', { class: 'hide-narrow mono' }, t.file)))))));
    box.replaceChildren(h('table', { id: 'plugins' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Status'), h('th', {}, 'Version'), h('th', { class: 'hide-narrow' }, 'Loaded'),
        h('th', { class: 'num' }, 'Calls'), h('th', { class: 'num' }, 'Mean call'), h('th', {}, 'Routes'), h('th', { class: 'hide-narrow' }, 'Last error'))),
      h('tbody', {}, list.items.map((p) => h('tr', { 'data-name': p.name },
        h('td', {}, p.name, p.degraded ? h('span', { class: 'badge error' }, 'degraded') : null,
          p.stateful ? h('span', { class: 'badge', title: 'Keeps values between events (state)' }, 'keeps state') : null,
          p.sends_http ? h('span', { class: 'badge', title: 'Sends HTTP requests to the origins its routes allow (http)' }, 'sends HTTP') : null),
        h('td', {}, badge(p.status)), h('td', { class: 'mono', title: p.sha256 || '' }, short(p.sha256)),
        h('td', { class: 'hide-narrow' }, p.loaded_at ? time(p.loaded_at) : ''),
        h('td', { class: 'num' }, p.calls ?? ''), h('td', { class: 'num' }, p.mean_call_us !== undefined ? `${p.mean_call_us} µs` : ''),
        h('td', {}, (p.routes || []).join(', ')), h('td', { class: 'hide-narrow error' }, p.last_error || ''))))));
    // (Only plugins that import `state` keep values; the section is left out without one.)
    const stateful = list.items.filter((p) => p.stateful).map((p) => p.name);
    stateBox.replaceChildren(...(stateful.length ? keptValues(stateful) : []));
  } catch (e) { failed(e); }
}

// ---- router -------------------------------------------------------------------------------

async function route() {
  clearInterval(poller);
  const signedIn = !!sessionStorage.getItem(TOKEN_KEY);
  document.getElementById('signout').hidden = !signedIn;
  if (!signedIn) { signIn(); return; }
  const [, name, id] = (location.hash || '#/events').split('/');
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  try {
    if (name === 'events' && id) await eventPage(decodeURIComponent(id));
    else if (name === 'routes') await routesPage();
    else if (name === 'dry-run') await dryRunPage(id ? decodeURIComponent(id) : '');
    else if (name === 'destinations') await destinationsPage();
    else if (name === 'plugins') await pluginsPage();
    else await eventsPage();
  } catch (e) { failed(e); }
  main.focus();
}

// ---- readiness, on every page ---------------------------------------------------------

// `/readyz` (open, as for a load balancer): while the gateway is not ready — its store has
// stopped answering, say — a banner at the top says why, on every page, until it is.
const health = document.getElementById('health');
async function checkHealth() {
  let why;
  try {
    const resp = await fetch('/readyz', { signal: AbortSignal.timeout(4000) });
    if (resp.ok) { health.hidden = true; return; }
    const body = await resp.json().catch(() => null);
    why = body && body.error ? body.error.replace(/^not ready: /, '') : `HTTP ${resp.status}`;
  } catch { why = 'it does not answer'; }
  const text = `The gateway is not ready: ${why}. Senders are refused or kept waiting meanwhile.`;
  // (Set only when it changes: an alert is read out again at each change.)
  if (health.textContent !== text) health.textContent = text;
  health.hidden = false;
}
every(5000, checkHealth);
window.addEventListener('hashchange', checkHealth);
checkHealth();

document.getElementById('signout').addEventListener('click', () => { sessionStorage.removeItem(TOKEN_KEY); route(); });
window.addEventListener('hashchange', route);
route();
