// End-to-end test of the dashboard in headless Chromium, driven by playwright-core.
// Started by tests/it/ui.rs with a running gateway:
//   node dashboard.mjs <gateway-url> <api-token> <receiver-control-url> <artifact-dir> <held-event-id>
// It signs in, sees a freshly ingested event appear, replays the dead letters in bulk,
// opens an event (plugin verdicts, attempt),
// replays it (a new attempt), dry-runs its payload (and an edited one; a binary one is not editable; the HTTP requests its plugins asked for shown), erases an event and a device's events, restarts a FAILED destination (which says when it is tested again; its held events go out), writes a route's own JavaScript in a code editor (a Python one's editor too),
// resends the delivery that failed before, makes, changes and deletes a source, a destination
// and a route through the API's objects, shows a banner while the gateway is not ready,
// and writes a screenshot of every page, at 1280×800 and at phone width.

import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [base, token, controlUrl, artifacts, heldId, crmUrl] = process.argv.slice(2);
const executablePath = process.env.SWITCHYARD_CHROMIUM || '/usr/bin/chromium';
const profile = mkdtempSync(join(tmpdir(), 'switchyard-ui-'));
const step = (s) => console.log(`- ${s}`);

const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
// Nothing may be fetched from anywhere but the gateway.
const outside = [];
context.on('request', (r) => { if (!r.url().startsWith(base) && !r.url().startsWith('data:')) outside.push(r.url()); });

const page = context.pages()[0] ?? (await context.newPage());
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
try {
  page.setDefaultTimeout(15000);
  const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });

  step('a wrong token is refused, the right one signs in (by keyboard)');
  await page.goto(`${base}/ui/`);
  await page.getByLabel('API token').fill('not-the-token');
  await page.keyboard.press('Enter');
  await page.getByRole('alert').filter({ hasText: 'not accepted' }).waitFor();
  await shot('signin');
  await page.getByLabel('API token').fill(token);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Events' }).waitFor();

  step('a freshly ingested event appears in the live list');
  const posted = await fetch(`${base}/v1/ingest/onomondo`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ type: 'usage', iccid: '8945738730000000012', bytes: 1234 }),
  });
  const { id } = await posted.json();
  if (posted.status !== 202) throw new Error(`ingest answered ${posted.status}`);
  const row = page.locator(`#events tr[data-id="${id}"]`);
  await row.waitFor();
  await row.getByText('delivered', { exact: false }).or(row.locator('td.num', { hasText: '1' })).first().waitFor();
  await page.locator('svg.chart').waitFor();
  await shot('events');

  step('filters narrow the list, by type and by a field of the body');
  await page.getByLabel('Type').fill('no-such-type');
  await page.getByLabel('Type').press('Tab');
  await page.getByText('No events yet.').waitFor();
  await page.getByLabel('Type').fill('usage');
  await page.getByLabel('Type').press('Tab');
  await row.waitFor();
  await page.getByLabel('Body field').fill('iccid=8945738730000000099');
  await page.getByLabel('Body field').press('Tab');
  await page.getByText('No events yet.').waitFor();
  await page.getByLabel('Body field').fill('iccid=8945738730000000012');
  await page.getByLabel('Body field').press('Tab');
  await row.waitFor();
  await page.getByLabel('Body field').fill('');
  await page.getByLabel('Body field').press('Tab');

  step('a dead-lettered event is marked and found by the Routes filter');
  const broken = await fetch(`${base}/v1/ingest/onomondo`, { method: 'POST', body: 'not json' });
  const { id: deadId } = await broken.json();
  await page.getByLabel('Type').fill('');
  await page.getByLabel('Type').press('Tab');
  await page.locator(`#events tr[data-id="${deadId}"]`).getByText('dead-letter').waitFor();
  await page.getByLabel('Routes').selectOption('failed');
  await page.locator(`#events tr[data-id="${deadId}"]`).waitFor();
  await row.waitFor({ state: 'detached' });

  step('dead letters are replayed in bulk (the plugin still fails: dead-lettered again, as a dry run of a replay shows)');
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Replay dead letters' }).click();
  await page.getByText('1 event replayed.').waitFor();
  await page.locator(`#events tr[data-id="${deadId}"]`).getByRole('link').click();
  await page.getByRole('heading', { name: `Event ${deadId}` }).waitFor();
  await page.locator('.card .row').first().getByText('dead-letter').waitFor();
  await page.getByText('body is not valid JSON').first().waitFor();
  await page.getByRole('button', { name: 'Dry run a replay' }).click();
  await page.locator('#dry-result .route').getByText('failed', { exact: true }).waitFor();
  await page.locator('#dry-result').getByText('body is not valid JSON').first().waitFor();
  await page.locator('#dry-result').getByText('Nothing.').waitFor();
  await page.goBack();
  await page.getByRole('heading', { name: 'Events' }).waitFor();
  await page.getByLabel('Routes').selectOption('');
  await page.getByLabel('Type').fill('usage');
  await page.getByLabel('Type').press('Tab');
  await row.waitFor();

  step('the event page shows the plugin verdicts and the attempt');
  await row.getByRole('link').click();
  await page.getByRole('heading', { name: `Event ${id}` }).waitFor();
  await page.locator('#payload', { hasText: '8945738730000000012' }).waitFor();
  await page.getByText('Route onomondo').waitFor();
  const step0 = page.locator('tr.step').first();
  await step0.getByText('event-filter').waitFor();
  await step0.getByText('"verdict": "continue"').waitFor();
  await page.locator('tr.attempt').first().getByText('200').waitFor();
  await shot('event');

  step('replay makes a new run and a new attempt');
  await page.getByRole('button', { name: 'Replay', exact: true }).click();
  await page.locator('tr.attempt').nth(1).waitFor();
  await page.getByText('run 1').first().waitFor();

  step('a dry run of the event\'s payload shows the verdicts and what would be sent, and stores nothing');
  const count = async () => (await (await fetch(`${base}/v1/events?limit=500`, { headers: { authorization: `Bearer ${token}` } })).json()).items.length;
  const before = await count();
  await page.getByRole('button', { name: 'Edit payload' }).click();
  await page.getByRole('heading', { name: 'Dry run' }).waitFor();
  const payload = page.getByLabel('Payload');
  if (!(await payload.inputValue()).includes('8945738730000000012')) throw new Error('the dry run did not open with the event\'s payload');
  await page.getByRole('button', { name: 'Run' }).click();
  const planned = page.locator('#dry-result .planned[data-destination="fleet"]');
  await planned.getByText('would send').waitFor();
  await planned.locator('.url').getByText('/fleet').waitFor();
  await planned.locator('pre.body', { hasText: '8945738730000000012' }).waitFor();
  await page.locator('#dry-result tr.step').first().getByText('"verdict": "continue"').waitFor();
  await shot('dry-run');
  await payload.fill(JSON.stringify({ type: 'sms', iccid: '8945738730000000012' }));
  await page.getByRole('button', { name: 'Run' }).click();
  await page.locator('#dry-result .route').getByText('dropped').waitFor();
  await page.locator('#dry-result').getByText('Nothing.').waitFor();
  if ((await count()) !== before) throw new Error('a dry run stored an event');

  step('a dry run shows the HTTP requests its plugins asked for, and what came of each');
  await page.goto(`${base}/ui/#/dry-run/crm-lookup`);
  // (The page is drawn again once it has the sources: fill in the new one, not the old.)
  await page.waitForFunction(() => document.getElementById('dry-source')?.value === 'crm-lookup');
  await page.getByLabel('Payload').fill(JSON.stringify({ iccid: '8945738730000000012' }));
  await page.getByRole('button', { name: 'Run' }).click();
  const asked = page.locator('#dry-requests tr.request');
  await asked.getByText(`GET ${crmUrl}/sims/8945738730000000012`).waitFor();
  await asked.getByText('200', { exact: true }).waitFor();
  await page.locator('#dry-result .planned[data-destination="fleet"] pre.body', { hasText: 'acme' }).waitFor();

  step('search by id opens the event');
  await page.goto(`${base}/ui/#/events`);
  await page.getByLabel('Find an event by id').fill(id);
  await page.getByLabel('Find an event by id').press('Enter');
  await page.getByRole('heading', { name: `Event ${id}` }).waitFor();

  step('a payload that is not text is shown as base64, and cannot be edited as text');
  const binary = await fetch(`${base}/v1/ingest/onomondo`, { method: 'POST', headers: { 'content-type': 'application/octet-stream' }, body: new Uint8Array([0x00, 0xff, 0xfe, 0x80]) });
  const { id: binaryId } = await binary.json();
  await page.goto(`${base}/ui/#/events/${binaryId}`);
  await page.getByText('Not text: shown as base64.').waitFor();
  await page.locator('#payload', { hasText: '"base64": "AP/+gA=="' }).waitFor();
  if (!(await page.getByRole('button', { name: 'Edit payload' }).isDisabled())) throw new Error('a binary payload can be edited as text');

  step('an event for a FAILED destination says its delivery is held');
  await page.goto(`${base}/ui/#/events/${heldId}`);
  await page.locator('.delivery .next').getByText('Held until the destination is restarted.').waitFor();

  step('a FAILED destination is restarted and its held events are delivered');
  await page.getByRole('link', { name: 'Destinations' }).click();
  const flaky = page.locator('#destinations tr[data-name="flaky"]');
  await flaky.getByText('FAILED', { exact: true }).waitFor();
  await flaky.locator('.next-test', { hasText: 'tested again' }).waitFor();
  await flaky.locator('.state-since', { hasText: 'since' }).waitFor();
  const pending = Number(await flaky.locator('td.num').first().textContent());
  if (!(pending >= 1)) throw new Error(`expected held deliveries, saw ${pending}`);
  await page.locator('#destinations tr[data-name="fleet"] .last-delivered', { hasText: 'last delivered' }).waitFor();
  await shot('destinations');

  step('an ACTIVE destination is paused, and restarted');
  const fleet = page.locator('#destinations tr[data-name="fleet"]');
  page.once('dialog', (d) => d.accept());
  await fleet.getByRole('button', { name: 'Pause' }).click();
  await fleet.getByText('DISABLED', { exact: true }).waitFor();
  await fleet.getByText('paused through the API').waitFor();
  await fleet.getByRole('button', { name: 'Restart' }).click();
  await fleet.getByText('ACTIVE', { exact: true }).waitFor();
  await fetch(`${controlUrl}/ok`, { method: 'POST' });
  await flaky.getByRole('button', { name: 'Restart' }).click();
  await flaky.getByText('ACTIVE', { exact: true }).waitFor();
  await page.waitForFunction(() => document.querySelector('#destinations tr[data-name="flaky"] td.num')?.textContent === '0');

  step('the delivery that failed before the restart is listed, and resent');
  await flaky.locator('td.num').nth(1).getByText('1').waitFor();
  await flaky.getByRole('button', { name: '1', exact: true }).click();
  await page.getByRole('heading', { name: 'Failed deliveries to flaky' }).waitFor();
  if (await page.locator('#failed-deliveries tbody tr').count() !== 1) throw new Error('one failed delivery to flaky');
  await page.getByRole('button', { name: 'Close' }).click();
  page.once('dialog', (d) => d.accept());
  await flaky.getByRole('button', { name: 'Resend failed' }).click();
  await page.getByText('1 failed delivery to flaky sent again.').waitFor();
  await page.waitForFunction(() => document.querySelectorAll('#destinations tr[data-name="flaky"] td.num')[1]?.textContent === '0');

  step('the plugins page shows versions, routes and call latency, the lookup tables, and the values plugins keep');
  await page.getByRole('link', { name: 'Plugins' }).click();
  const plugin = page.locator('#plugins tr[data-name="event-filter"]');
  await plugin.getByText('ok').first().waitFor();
  await plugin.getByText('µs').waitFor();
  // The lookup tables plugins read, with their rows.
  await page.locator('#tables tr[data-name="sims"]').getByText('1', { exact: true }).waitFor();
  // The values a plugin keeps between events: change-filter's SIM, forgotten by hand (only
  // plugins that keep state are offered).
  await page.locator('#plugins tr[data-name="change-filter"]').getByText('keeps state').waitFor();
  await page.locator('#plugins tr[data-name="enrich"]').getByText('sends HTTP').waitFor();
  if (await page.locator('#plugins tr[data-name="change-filter"]').getByText('sends HTTP').count() !== 0) {
    throw new Error('change-filter sends no HTTP requests');
  }
  if (await page.locator('#state-plugin option[value="event-filter"]').count() !== 0) throw new Error('event-filter keeps no state');
  await page.locator('#state-plugin').selectOption('change-filter');
  const kept = page.locator('#state tr[data-key="/iccid=8945738730000000012"]');
  await kept.getByText('["238"]').waitFor();
  await shot('plugins');
  page.once('dialog', (d) => d.accept());
  await kept.getByRole('button', { name: 'Forget', exact: true }).click();
  await page.getByText('change-filter forgot /iccid=8945738730000000012.').waitFor();
  await page.locator('#state tr[data-key="/iccid=8945738730000000012"]').waitFor({ state: 'detached' });
  // The rest at once, by a prefix of their keys.
  await page.locator('#state tr[data-key="/iccid=8945738730000000099"]').waitFor();
  await page.locator('#state-prefix').fill('/iccid=8945');
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Forget all' }).click();
  await page.getByText('change-filter forgot 1 value.').waitFor();
  await page.getByText('change-filter keeps no values under this prefix.').waitFor();

  step('the routes page shows each chain end to end, and opens its events');
  await page.getByRole('link', { name: 'Routes' }).click();
  const filtered = page.locator('#routes tr[data-name="onomondo"]');
  await filtered.locator('.chain').getByText('event-filter').waitFor();
  await filtered.locator('.chain').getByText('(dead-letter)').waitFor();
  await filtered.locator('.retention').getByText('events kept 30days if delivered').waitFor();
  await filtered.locator('.destination').getByText('fleet').waitFor();
  const plain = page.locator('#routes tr[data-name="flaky-source"]');
  await plain.locator('.chain').getByText('none').waitFor();
  await plain.locator('.destination').getByText('flaky').waitFor();
  await filtered.getByText('not verified').waitFor();
  await filtered.locator('.last-accepted', { hasText: 'last event' }).waitFor();
  await page.locator('#routes tr[data-name="secured"] .last-accepted', { hasText: 'no event since start' }).waitFor();
  await page.locator('#routes tr[data-name="secured"]').getByText('secret header (x-api-key)').waitFor();
  // A sender with the wrong key: refused, nothing stored, and shown with its source.
  const wrongKey = await fetch(`${base}/v1/ingest/secured`, { method: 'POST', headers: { 'x-api-key': 'not-the-key' }, body: '{}' });
  if (wrongKey.status !== 401) throw new Error(`a wrong key was answered ${wrongKey.status}`);
  await page.locator('#routes tr[data-name="secured"] .refused')
    .getByText('1 refused').waitFor();
  await page.locator('#routes tr[data-name="secured"] .refused')
    .getByText('401 the `x-api-key` header does not hold an accepted secret').waitFor();
  // A route made through the API that its upgraded plugin refuses: why, under its name.
  await page.locator('#routes tr[data-name="legacy-api"] .route-error')
    .getByText('plugin `legacy` refuses this configuration: `allow` must list').waitFor();
  await shot('routes');

  step('a source, a destination and a route are made, changed and deleted from the dashboard; the file\'s are read-only');
  if (await page.locator('#sources tr[data-name="onomondo"] button').count() !== 0) throw new Error('a file source offers changes');
  await page.getByRole('button', { name: 'New source' }).click();
  await page.getByLabel('Source as JSON').fill(JSON.stringify({ name: 'ui-source' }));
  await page.locator('.sources-editor').getByRole('button', { name: 'Create' }).click();
  const uiSource = page.locator('#sources tr[data-name="ui-source"]');
  await uiSource.getByText('none', { exact: true }).waitFor();
  await page.getByRole('link', { name: 'Destinations' }).click();
  if (await page.locator('#destinations tr[data-name="fleet"]').getByRole('button', { name: 'Edit' }).count() !== 0) {
    throw new Error('a file destination offers changes');
  }
  await page.getByRole('button', { name: 'New destination' }).click();
  const destinationJson = page.getByLabel('Destination as JSON');
  await destinationJson.fill(JSON.stringify({ name: 'ui-made', url: 'not a url' }));
  await page.locator('.destinations-editor').getByRole('button', { name: 'Create' }).click();
  await page.locator('#toast', { hasText: 'url' }).waitFor();
  await destinationJson.fill(JSON.stringify({ name: 'ui-made', url: 'https://ui.example.com/in' }));
  await page.locator('.destinations-editor').getByRole('button', { name: 'Create' }).click();
  const made = page.locator('#destinations tr[data-name="ui-made"]');
  await made.getByText('https://ui.example.com/in').waitFor();
  await made.getByRole('button', { name: 'Edit' }).click();
  await shot('destination-editor');
  const shown = JSON.parse(await destinationJson.inputValue());
  for (const only of ['origin', 'state', 'pending', 'failed']) {
    if (only in shown) throw new Error(`the editor holds \`${only}\`, which the API only shows`);
  }
  shown.url = 'https://ui.example.com/v2';
  await destinationJson.fill(JSON.stringify(shown));
  await page.locator('.destinations-editor').getByRole('button', { name: 'Save' }).click();
  await made.getByText('https://ui.example.com/v2').waitFor();
  await page.getByRole('link', { name: 'Routes' }).click();
  await page.getByRole('button', { name: 'New route' }).click();
  await page.getByLabel('Route as JSON').fill(JSON.stringify({ name: 'ui-route', source: 'ui-source', destinations: ['ui-made'] }));
  await page.locator('.routes-editor').getByRole('button', { name: 'Create' }).click();
  const uiRoute = page.locator('#routes tr[data-name="ui-route"]');
  await uiRoute.locator('.destination').getByText('ui-made').waitFor();
  await uiSource.getByText('ui-route').waitFor();
  // A route's own JavaScript (js-transform) is written in an editor of its own, kept in the
  // route's JSON, runs, and is shown again for editing.
  await page.getByRole('button', { name: 'New route' }).click();
  await page.getByLabel('Route as JSON').fill(JSON.stringify({ name: 'ui-transform', source: 'ui-source', plugins: [{ name: 'js-transform' }], destinations: ['ui-made'] }));
  // Code that does not compile is refused when the route is made, saying where.
  await page.getByLabel('JavaScript of plugins[0]').fill('function transform(event) {\n  return event.;\n}');
  await page.locator('.routes-editor').getByRole('button', { name: 'Create' }).click();
  await page.locator('#toast', { hasText: 'does not compile: SyntaxError' }).filter({ hasText: '(line 2)' }).waitFor();
  await shot('route-code-refused');
  const code = 'function transform(event) {\n  event.body.via = `dashboard`;\n}';
  await page.getByLabel('JavaScript of plugins[0]').fill(code);
  if (!(await page.getByLabel('Route as JSON').inputValue()).includes('event.body.via')) throw new Error('the code is not in the route\'s JSON');
  await shot('route-code');
  await page.locator('.routes-editor').getByRole('button', { name: 'Create' }).click();
  const uiTransform = page.locator('#routes tr[data-name="ui-transform"]');
  await uiTransform.locator('.plugin').getByText('js-transform').waitFor();
  const tried = await (await fetch(`${base}/v1/sources/ui-source/dry-run`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: '{"iccid":"1"}' })).json();
  if (!tried.deliveries.some((d) => d.body.via === 'dashboard')) throw new Error(`the route's code did not run: ${JSON.stringify(tried)}`);
  await uiTransform.getByRole('button', { name: 'Edit' }).click();
  if ((await page.getByLabel('JavaScript of plugins[0]').inputValue()) !== code) throw new Error('the editor does not show the route\'s code');
  // A py-transform entry's code gets an editor of its own too, named for its language.
  await page.getByLabel('Route as JSON').fill(JSON.stringify({ plugins: [{ name: 'event-filter' }, { name: 'py-transform' }] }));
  await page.getByLabel('Python of plugins[1]').fill('def transform(event):\n    event["body"]["via"] = "dashboard"\n');
  if (!(await page.getByLabel('Route as JSON').inputValue()).includes('event[\\"body\\"][\\"via\\"]')) throw new Error('the Python code is not in the route\'s JSON');
  await page.locator('.routes-editor').getByRole('button', { name: 'Cancel' }).click();
  page.once('dialog', (d) => d.accept());
  await uiTransform.getByRole('button', { name: 'Delete' }).click();
  await uiTransform.waitFor({ state: 'detached' });
  // A source a route uses is not deleted: the page says which route.
  page.once('dialog', (d) => d.accept());
  await uiSource.getByRole('button', { name: 'Delete' }).click();
  await page.locator('#toast', { hasText: 'ui-route' }).waitFor();
  page.once('dialog', (d) => d.accept());
  await uiRoute.getByRole('button', { name: 'Delete' }).click();
  await uiRoute.waitFor({ state: 'detached' });
  page.once('dialog', (d) => d.accept());
  await uiSource.getByRole('button', { name: 'Delete' }).click();
  await uiSource.waitFor({ state: 'detached' });
  await page.getByRole('link', { name: 'Destinations' }).click();
  page.once('dialog', (d) => d.accept());
  await made.getByRole('button', { name: 'Delete' }).click();
  await made.waitFor({ state: 'detached' });
  await page.getByRole('link', { name: 'Routes' }).click();
  await plain.getByRole('link', { name: 'Dry run' }).click();
  await page.getByRole('heading', { name: 'Dry run' }).waitFor();
  if ((await page.getByLabel('Source').inputValue()) !== 'flaky-source') throw new Error('the dry run is not for the route\'s source');
  await page.getByRole('button', { name: 'Newest event' }).click();
  await page.waitForFunction(() => document.getElementById('dry-payload').value.includes('"alert"'));
  await page.getByRole('link', { name: 'Routes' }).click();
  await filtered.getByRole('link', { name: 'Events' }).click();
  await page.locator('select[name="source"]').waitFor();
  const chosen = await page.locator('select[name="source"]').inputValue();
  if (chosen !== 'onomondo') throw new Error(`the events page is filtered by "${chosen}"`);
  await page.locator(`#events tr[data-id="${id}"]`).waitFor();
  await page.locator('select[name="source"]').selectOption('');

  step('an event is erased from its page, and is gone');
  const doomed = await fetch(`${base}/v1/ingest/onomondo`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ type: 'usage', iccid: '8945738730000000099', bytes: 1 }),
  });
  const { id: doomedId } = await doomed.json();
  await page.goto(`${base}/ui/#/events/${doomedId}`);
  await page.locator('.delivery').getByText('delivered', { exact: true }).waitFor();
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Erase' }).click();
  await page.getByText('Event erased.').waitFor();
  await page.getByRole('heading', { name: 'Events' }).waitFor();
  const gone = await fetch(`${base}/v1/events/${doomedId}`, { headers: { authorization: `Bearer ${token}` } });
  if (gone.status !== 404) throw new Error(`the erased event is answered ${gone.status}`);

  step('a device\'s events are erased from the filtered list');
  for (const n of [1, 2]) {
    await fetch(`${base}/v1/ingest/onomondo`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ type: 'usage', iccid: '8945738730000000077', bytes: n }),
    });
  }
  await page.getByLabel('Body field').fill('iccid=8945738730000000077');
  await page.getByLabel('Body field').press('Tab');
  await page.waitForFunction(() => [...document.querySelectorAll('#events tbody tr')]
    .filter((r) => r.querySelector('td.num')?.textContent === '1').length === 2);
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Erase these events' }).click();
  await page.getByText('2 events erased.').waitFor();
  await page.getByText('No events yet.').waitFor();
  await page.getByLabel('Body field').fill('');
  await page.getByLabel('Body field').press('Tab');

  step('a gateway that is not ready says why on every page, until it is');
  if (!(await page.locator('#health').isHidden())) throw new Error('a ready gateway shows the not-ready banner');
  await page.route('**/readyz', (r) => r.fulfill({
    status: 503,
    contentType: 'application/json',
    body: JSON.stringify({ error: 'not ready: the store has stored none of the 3 events waiting for it for 12 s' }),
  }));
  await page.getByRole('link', { name: 'Plugins' }).click();
  await page.getByRole('alert').filter({ hasText: 'The gateway is not ready: the store has stored none of the 3 events waiting for it for 12 s.' }).waitFor();
  await shot('not-ready');
  await page.unroute('**/readyz');
  await page.getByRole('link', { name: 'Events' }).click();
  await page.locator('#health').waitFor({ state: 'hidden' });

  step('readable at phone width');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/ui/#/events`);
  await page.locator(`#events tr[data-id="${id}"]`).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 2) throw new Error(`the page is ${overflow}px wider than a phone`);
  await shot('events-phone');
  await page.goto(`${base}/ui/#/routes`);
  await page.locator('#routes tr[data-name="onomondo"]').waitFor();
  const routesOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (routesOverflow > 2) throw new Error(`the routes page is ${routesOverflow}px wider than a phone`);

  if (outside.length) throw new Error(`fetched from outside the gateway: ${outside.join(', ')}`);
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log('ok');
} catch (e) {
  // Leave what the page showed for whoever reads the failure.
  await page.screenshot({ path: join(artifacts, 'failure.png'), fullPage: true }).catch(() => {});
  console.log(`page errors: ${errors.join('; ')}`);
  console.log(`main: ${(await page.locator('main').innerText().catch(() => '')).slice(0, 2000)}`);
  throw e;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
