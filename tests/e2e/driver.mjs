// End-to-end suite: tokenkeeper against a real third-party authorization
// server (panva's oidc-provider), authorized through its real login and
// consent pages in headless Chromium. Started by run.sh; see README there.
//
// Environment (set by run.sh):
//   E2E_BIN   path of the tokenkeeper binary
//   E2E_OUT   directory for logs and screenshots (under target/, kept by CI)
//   E2E_CHROMIUM  Chromium executable (default /usr/bin/chromium)
//
// Tests run concurrently, each with its own tokenkeeper process, port and
// SQLite file, against one oidc-provider process:
//   confidential: client_secret_basic client, the full lifecycle
//   public:       token_endpoint_auth_method "none" (PKCE only), the full lifecycle
//   deny:         the user cancels at the consent page
// The full lifecycle is: browser authorization -> token checked by
// introspection and userinfo -> >= MIN_CYCLES refresh cycles with 3-5 s access
// tokens while 50 tasks poll /v1/token (every distinct token introspected at
// once, the current one spot-checked) -> SIGTERM and restart mid-way on the
// same database -> forced refresh -> `tokenkeeper revoke` -> provider
// rejects the grant, /v1/token answers 404 unknown_connection.

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync, createWriteStream, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { freePort } from './lib.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.E2E_BIN;
const OUT = process.env.E2E_OUT;
const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';
if (!BIN || !OUT) {
  console.error('e2e: run this through tests/e2e/run.sh (E2E_BIN and E2E_OUT are not set)');
  process.exit(2);
}

const ACCESS_TTL = 4; // seconds; the brief asks for 3-5 s access tokens
const MIN_CYCLES = 10; // refresh cycles each lifecycle test must see
const RESTART_AFTER_CYCLES = 5; // SIGTERM + restart once this many have passed
const POLLERS = 50;
const SUITE_DEADLINE_MS = 170_000; // the whole suite must finish in < 3 min
const LOAD_DEADLINE_MS = 90_000; // one load phase; far more than needed
const CONF_SECRET = process.env.E2E_SECRET || 'e2e+secret/with=base64+chars'; // '+', '/', '=' as in real base64 secrets
const INTROSPECTOR = { id: 'e2e-introspector', secret: 'introspector-secret' };

const t0 = Date.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const since = (t) => `${((Date.now() - t) / 1000).toFixed(1)}s`;


class Failure extends Error {}
function check(cond, message) {
  if (!cond) throw new Failure(message);
}

// ---------------------------------------------------------------- provider

class OidcProvider {
  constructor(port, clients) {
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.events = [];
    this.log = createWriteStream(path.join(OUT, 'oidc-provider.log'));
    this.proc = spawn(process.execPath, [path.join(HERE, 'op.mjs')], {
      cwd: HERE,
      env: { ...process.env, OP_PORT: String(port), OP_CLIENTS: JSON.stringify(clients), OP_ACCESS_TTL: String(ACCESS_TTL) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.exited = new Promise((r) => this.proc.once('exit', (code, sig) => r({ code, sig })));
    let buf = '';
    this.proc.stdout.on('data', (d) => {
      this.log.write(d);
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        try { this.events.push(JSON.parse(line)); } catch { /* not an event */ }
      }
    });
    this.proc.stderr.on('data', (d) => this.log.write(d));
  }

  async ready() {
    const end = Date.now() + 15_000;
    while (Date.now() < end) {
      if (this.events.some((e) => e.event === 'ready')) return;
      if (this.proc.exitCode !== null) break;
      await sleep(50);
    }
    throw new Failure(`oidc-provider did not start (see ${path.join(OUT, 'oidc-provider.log')})`);
  }

  eventsFor(clientId, from = 0) {
    return this.events.filter((e) => e.t >= from && e.client === clientId);
  }

  refreshes(clientId, from = 0) {
    return this.eventsFor(clientId, from).filter((e) => e.event === 'grant.success' && e.grant_type === 'refresh_token').length;
  }

  async introspect(token) {
    const r = await fetch(`${this.base}/token/introspection`, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${INTROSPECTOR.id}:${INTROSPECTOR.secret}`).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: new URLSearchParams({ token, token_type_hint: 'access_token' }),
    });
    const text = await r.text();
    check(r.status === 200, `introspection answered HTTP ${r.status}: ${text}`);
    return JSON.parse(text);
  }

  // Revokes a token as the client that owns it (RFC 7009; oidc-provider
  // then revokes the whole grant), as a user removing the app would.
  async revokeAs(client, token) {
    const headers = { 'content-type': 'application/x-www-form-urlencoded' };
    const form = { token, token_type_hint: 'access_token' };
    if (client.secret) {
      const enc = (x) => encodeURIComponent(x); // RFC 6749 2.3.1
      headers.authorization = `Basic ${Buffer.from(`${enc(client.id)}:${enc(client.secret)}`).toString('base64')}`;
    } else {
      form.client_id = client.id;
    }
    const r = await fetch(`${this.base}/token/revocation`, { method: 'POST', headers, body: new URLSearchParams(form) });
    const text = await r.text();
    check(r.status === 200, `revocation at the provider answered HTTP ${r.status}: ${text}`);
  }

  async userinfo(token) {
    const r = await fetch(`${this.base}/me`, { headers: { authorization: `Bearer ${token}` } });
    return { status: r.status, body: await r.text() };
  }

  async stop() {
    if (this.proc.exitCode === null) this.proc.kill('SIGTERM');
    await Promise.race([this.exited, sleep(3000)]);
    if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
    this.log.end();
  }
}

// ------------------------------------------------------------- tokenkeeper

class Tokenkeeper {
  constructor(name, port, op, clients, { atFraction = 0.75 } = {}) {
    this.name = name;
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.dir = mkdtempSync(path.join(tmpdir(), `tk-e2e-${name}-`));
    this.config = path.join(this.dir, 'tokenkeeper.toml');
    this.logPath = path.join(OUT, `tokenkeeper-${name}.log`);
    this.log = createWriteStream(this.logPath);
    this.starts = 0;
    writeFileSync(path.join(this.dir, 'secret'), `${CONF_SECRET}\n`, { mode: 0o600 });
    const endpoints = [
      `authorization_url = "${op.base}/auth"`,
      `token_url = "${op.base}/token"`,
      `revocation_url = "${op.base}/token/revocation"`,
      'scopes = ["openid", "offline_access"]',
      'extra_authorize_params = { prompt = "consent" }',
    ].join('\n');
    writeFileSync(this.config, `# written by tests/e2e/driver.mjs
[server]
listen = "127.0.0.1:${port}"

[storage]
path = "${path.join(this.dir, 'tk.db')}"

[refresh]
at_fraction = ${atFraction}
check_interval = "1s"
jitter = "0s"
min_validity = "1s"
retry_initial = "1s"
retry_max = "4s"

[providers.oidc]
preset = "generic"
client_id = "${clients.confidential}"
client_secret_file = "secret"
code_auth = "basic"
refresh_auth = "basic"
${endpoints}

# No endpoint by hand: discovered from the issuer's metadata.
[providers.oidcpub]
preset = "generic"
client_id = "${clients.public}"
code_auth = "none"
refresh_auth = "none"
issuer = "${op.base}"
scopes = ["openid", "offline_access"]
extra_authorize_params = { prompt = "consent" }
`);
  }

  async start() {
    this.starts += 1;
    this.log.write(`\n===== start #${this.starts} at ${new Date().toISOString()}\n`);
    this.proc = spawn(BIN, ['serve', '--config', this.config], {
      env: { ...process.env, RUST_LOG: 'info,tokenkeeper=debug', NO_COLOR: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.exited = new Promise((r) => this.proc.once('exit', (code, sig) => r({ code, sig })));
    this.proc.stdout.pipe(this.log, { end: false });
    this.proc.stderr.pipe(this.log, { end: false });
    const end = Date.now() + 20_000;
    while (Date.now() < end) {
      if (this.proc.exitCode !== null) break;
      try {
        const r = await fetch(`${this.base}/readyz`);
        if (r.status === 200) return;
      } catch { /* not listening yet */ }
      await sleep(50);
    }
    throw new Failure(`tokenkeeper (${this.name}) did not become ready (see ${this.logPath})`);
  }

  // SIGTERM and wait for a clean exit.
  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return this.proc?.exitCode;
    this.proc.kill('SIGTERM');
    const r = await Promise.race([this.exited, sleep(15_000).then(() => null)]);
    if (r === null) {
      this.proc.kill('SIGKILL');
      throw new Failure(`tokenkeeper (${this.name}) did not exit within 15 s of SIGTERM`);
    }
    return r.code;
  }

  async get(p, method = 'GET') {
    const r = await fetch(`${this.base}${p}`, { method });
    const text = await r.text();
    let json;
    try { json = JSON.parse(text); } catch { json = undefined; }
    return { status: r.status, text, json, headers: r.headers };
  }

  async connections() {
    const r = await this.get('/v1/connections');
    check(r.status === 200, `/v1/connections answered HTTP ${r.status}`);
    return r.json.connections;
  }

  cli(args) {
    return new Promise((resolve) => {
      const p = spawn(BIN, [...args, '--config', this.config], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      p.stdout.on('data', (d) => { out += d; });
      p.stderr.on('data', (d) => { err += d; });
      p.on('exit', (code) => resolve({ code, out, err }));
    });
  }

  logTail(n = 25) {
    try {
      return readFileSync(this.logPath, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
    } catch { return '(no log)'; }
  }

  async close() {
    try { await this.stop(); } catch { /* reported elsewhere */ }
    this.log.end();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// ----------------------------------------------------------------- browser

async function newContext(browser) {
  const ctx = await browser.newContext();
  // Only loopback: the provider's pages link to web fonts.
  await ctx.route('**/*', (route) => {
    const host = new URL(route.request().url()).hostname;
    return host === '127.0.0.1' ? route.continue() : route.abort();
  });
  return ctx;
}

// Opens tokenkeeper's /connect (which sets the flow cookie), logs in on the
// provider's page and either consents or cancels. Returns the response of
// tokenkeeper's /callback and the page showing it.
async function authorize(browser, tk, provider, { consent = true, shot }) {
  const ctx = await newContext(browser);
  const page = await ctx.newPage();
  page.setDefaultTimeout(15_000);
  const callback = page.waitForResponse((r) => r.url().startsWith(`${tk.base}/callback`), { timeout: 20_000 });
  callback.catch(() => {});
  await page.goto(`${tk.base}/connect/${provider}`);
  check(new URL(page.url()).port !== String(tk.port), `/connect did not lead to the provider: still at ${page.url()}`);
  await page.fill('input[name=login]', `e2e-user-${provider}`);
  await page.fill('input[name=password]', 'any password');
  await page.click('button[type=submit]');
  await page.waitForSelector('input[name=prompt][value=consent]', { state: 'attached' });
  if (consent) {
    await page.click('button[type=submit]');
  } else {
    await page.click('a[href*="/abort"]'); // the "[ Cancel ]" link
  }
  const resp = await callback;
  await page.waitForLoadState('load');
  const result = {
    status: resp.status(),
    title: await page.title(),
    heading: (await page.textContent('h1').catch(() => '')) ?? '',
    text: await page.innerText('body'),
  };
  if (shot) await page.screenshot({ path: path.join(OUT, shot), fullPage: true });
  await ctx.close();
  return result;
}

// -------------------------------------------------------------- lifecycle

// 50 tasks poll /v1/token while refreshes happen; every distinct token is
// introspected the moment it is first seen, and the newest token is
// spot-checked a few times a second.
class Load {
  constructor(tk, op, provider, clientId) {
    Object.assign(this, { tk, op, provider, clientId });
    this.stopped = false;
    this.restarting = false;
    this.restartEnded = 0; // when the restarted daemon became ready
    this.reads = 0; // 200 answers
    this.unavailable = 0; // refused while restarting (expected)
    this.failures = [];
    this.tokens = new Map(); // token -> {first, last, expiresAt, introspection promise}
    this.latest = null;
    this.spotChecks = 0;
    this.states = new Map();
  }

  fail(msg) {
    if (this.failures.length < 20) this.failures.push(msg);
  }

  async poller() {
    while (!this.stopped) {
      let r;
      const asked = Date.now();
      try {
        r = await fetch(`${this.tk.base}/v1/token/${this.provider}`);
      } catch (e) {
        // Refused, or a kept-alive socket the old process closed: expected
        // while restarting and for a moment after.
        if (this.restarting || asked <= this.restartEnded + 1000) this.unavailable += 1;
        else this.fail(`GET /v1/token failed outside the restart: ${e.cause?.code || e.message}`);
        await sleep(20);
        continue;
      }
      const now = Date.now();
      const body = await r.text().catch(() => '');
      if (r.status !== 200) {
        if (this.restarting || asked <= this.restartEnded) this.unavailable += 1;
        else this.fail(`GET /v1/token answered HTTP ${r.status}: ${body.slice(0, 200)}`);
        await sleep(20);
        continue;
      }
      this.reads += 1;
      const j = JSON.parse(body);
      const expiresAt = Date.parse(j.expires_at);
      let t = this.tokens.get(j.access_token);
      if (!t) {
        const sent = Date.now();
        // lastAsked: the latest moment a request that got this token was
        // sent; tokenkeeper handed it out at or after that moment.
        t = { first: now, lastAsked: asked, expiresAt, sent, result: null };
        t.done = this.op.introspect(j.access_token).then(
          (res) => { t.result = res; },
          (e) => { t.result = { error: e.message }; },
        );
        this.tokens.set(j.access_token, t);
      }
      t.lastAsked = Math.max(t.lastAsked, asked);
      if (!this.latest || expiresAt >= this.latest.expiresAt) this.latest = { token: j.access_token, expiresAt, at: now };
      await sleep(Math.random() * 10);
    }
  }

  // Re-introspects the newest token: it must still be active unless its
  // expiry (by tokenkeeper's account) is close.
  async spotChecker() {
    while (!this.stopped) {
      await sleep(300);
      const l = this.latest;
      if (!l) continue;
      const sent = Date.now();
      let res;
      try { res = await this.op.introspect(l.token); } catch (e) { this.fail(`spot introspection failed: ${e.message}`); continue; }
      this.spotChecks += 1;
      if (!res.active && l.expiresAt - sent >= 1500) {
        this.fail(`spot check: the provider rejected the current token with ${l.expiresAt - sent} ms left by tokenkeeper's account`);
      }
    }
  }

  async stateWatcher() {
    while (!this.stopped) {
      await sleep(250);
      if (this.restarting) continue;
      try {
        const c = (await this.tk.connections()).find((x) => x.provider === this.provider);
        const s = c ? c.state : 'missing';
        this.states.set(s, (this.states.get(s) || 0) + 1);
        if (s === 'authorization_required' || s === 'missing') {
          this.fail(`connection state became ${s} (last_error: ${c?.last_error})`);
        }
      } catch (e) {
        if (!this.restarting) this.fail(`/v1/connections: ${e.message}`);
      }
    }
  }

  start() {
    this.tasks = [
      ...Array.from({ length: POLLERS }, () => this.poller()),
      this.spotChecker(),
      this.stateWatcher(),
    ];
  }

  async stop() {
    this.stopped = true;
    await Promise.all(this.tasks);
    await Promise.all([...this.tokens.values()].map((t) => t.done));
  }

  // Judges every distinct token's introspection.
  judge() {
    let edge = 0;
    for (const [tok, t] of this.tokens) {
      const short = `${tok.slice(0, 8)}…`;
      const r = t.result;
      if (!r || r.error) {
        this.fail(`token ${short}: introspection failed: ${r?.error}`);
      } else if (!r.active) {
        const left = t.expiresAt - t.sent;
        if (left >= 1500) this.fail(`token ${short} was rejected by the provider when first seen, with ${left} ms left by tokenkeeper's account`);
        else edge += 1;
      } else {
        if (r.client_id !== this.clientId) this.fail(`token ${short} belongs to client ${r.client_id}, expected ${this.clientId}`);
        if (String(r.token_type).toLowerCase() !== 'bearer') this.fail(`token ${short} has token_type ${r.token_type}`);
        // Handed out after the provider's own expiry? oidc-provider's exp
        // is floor(iat) + ttl while tokenkeeper counts expires_in from the
        // answer's arrival, so tokenkeeper's expiry is later by up to 1 s
        // plus the refresh call's latency; min_validity (1 s) absorbs the
        // 1 s, and 250 ms is far more than any refresh call here.
        const late = t.lastAsked - r.exp * 1000;
        if (late > 250) this.fail(`token ${short} was handed out at least ${late} ms after the provider's expiry`);
        else if (late > 0) edge += 1;
      }
    }
    return edge;
  }
}

async function lifecycle({ browser, op, tk, provider, clientId, label }) {
  const notes = [];
  await tk.start();

  // 1. Authorize in the browser through tokenkeeper's /connect.
  const page = await authorize(browser, tk, provider, { consent: true, shot: `${label}-connected.png` });
  check(page.status === 200, `callback answered HTTP ${page.status}: ${page.text.slice(0, 300)}`);
  check(page.title.includes('Connected') || page.heading.includes('Connected'), `success page title "${page.title}" / heading "${page.heading}" lacks "Connected"`);
  const codeGrants = op.eventsFor(clientId).filter((e) => e.event === 'grant.success' && e.grant_type === 'authorization_code');
  check(codeGrants.length === 1, `expected one authorization_code grant at the provider, saw ${codeGrants.length}`);

  // 2. The served token is the provider's.
  const first = await tk.get(`/v1/token/${provider}`);
  check(first.status === 200, `GET /v1/token/${provider} answered HTTP ${first.status}: ${first.text}`);
  check(first.json.token_type === 'Bearer', `token_type is ${first.json.token_type}`);
  check(first.json.expires_in <= ACCESS_TTL, `expires_in ${first.json.expires_in} exceeds the provider's ${ACCESS_TTL} s`);
  check(first.headers.get('cache-control') === 'no-store', 'token answer lacks Cache-Control: no-store');
  const intro = await op.introspect(first.json.access_token);
  check(intro.active === true && intro.client_id === clientId, `introspection of the first token: ${JSON.stringify(intro)}`);
  check(String(intro.scope).split(' ').includes('openid'), `token scope is "${intro.scope}"`);
  const ui = await op.userinfo(first.json.access_token);
  check(ui.status === 200 && JSON.parse(ui.body).sub === `e2e-user-${provider}`, `userinfo answered ${ui.status}: ${ui.body}`);

  // 3. Refresh cycles under concurrent reads, with a restart mid-way.
  const loadStart = Date.now();
  const load = new Load(tk, op, provider, clientId);
  load.start();
  const waitCycles = async (n) => {
    const end = Date.now() + LOAD_DEADLINE_MS;
    while (op.refreshes(clientId) < n || load.tokens.size < n + 1) {
      if (Date.now() > end) throw new Failure(`only ${op.refreshes(clientId)} refreshes / ${load.tokens.size} distinct tokens after ${since(loadStart)}; failures: ${load.failures.join('; ')}`);
      if (load.failures.length) break;
      await sleep(100);
    }
  };
  try {
    await waitCycles(RESTART_AFTER_CYCLES);
    // Land the SIGTERM anywhere in the refresh cycle, not always just after
    // a refresh.
    await sleep(Math.random() * ACCESS_TTL * 750);
    load.restarting = true;
    const code = await tk.stop();
    check(code === 0, `tokenkeeper exited with ${code} after SIGTERM`);
    await tk.start();
    const after = (await tk.connections()).find((c) => c.provider === provider);
    check(after && after.state !== 'authorization_required', `after the restart the connection is ${JSON.stringify(after)}`);
    load.restartEnded = Date.now();
    load.restarting = false;
    notes.push(`restarted after ${op.refreshes(clientId)} refreshes`);
    await waitCycles(MIN_CYCLES);
  } finally {
    await load.stop();
  }
  const edge = load.judge();
  check(load.failures.length === 0, `under load: ${load.failures.join('; ')}`);
  const cycles = op.refreshes(clientId);
  const grantErrors = op.eventsFor(clientId).filter((e) => e.event === 'grant.error');
  check(grantErrors.length === 0, `the provider refused token requests: ${JSON.stringify(grantErrors)}`);
  check(!op.eventsFor(clientId).some((e) => e.event === 'grant.revoked'), 'the provider revoked the grant (refresh token reuse?)');
  check(cycles >= MIN_CYCLES, `only ${cycles} refresh cycles`);
  notes.push(`${cycles} refreshes, ${load.tokens.size} distinct tokens introspected, ${load.reads} concurrent reads, ${load.spotChecks} spot checks, ${load.unavailable} refused during restart${edge ? `, ${edge} at-expiry edge cases tolerated` : ''}`);

  // 4. The grant is still alive: a forced refresh works.
  const forced = await tk.get(`/v1/token/${provider}/refresh`, 'POST');
  check(forced.status === 200, `forced refresh answered HTTP ${forced.status}: ${forced.text}`);
  check(!load.tokens.has(forced.json.access_token), 'the forced refresh returned an old token');
  const fi = await op.introspect(forced.json.access_token);
  check(fi.active === true, `the force-refreshed token is not active: ${JSON.stringify(fi)}`);
  const conn = (await tk.connections()).find((c) => c.provider === provider);
  check(conn?.state === 'active', `connection state after the load is ${conn?.state} (last_error: ${conn?.last_error})`);

  // 5. Revoke: upstream grant dead, local grant forgotten.
  const revokedFrom = Date.now();
  const rv = await tk.cli(['revoke', provider]);
  check(rv.code === 0, `tokenkeeper revoke exited ${rv.code}: ${rv.err.trim()}`);
  const rvErrors = op.eventsFor(clientId, revokedFrom).filter((e) => e.event === 'revocation.error');
  check(rvErrors.length === 0, `the provider refused the revocation: ${JSON.stringify(rvErrors)} (tokenkeeper said: ${rv.out.trim()})`);
  const ri = await op.introspect(forced.json.access_token);
  check(ri.active === false, `after revoke the last access token is still active at the provider: ${JSON.stringify(ri)}`);
  check(op.eventsFor(clientId, revokedFrom).some((e) => e.event === 'grant.revoked'), 'the provider did not revoke the grant');
  const gone = await tk.get(`/v1/token/${provider}`);
  check(gone.status === 404 && gone.json?.error === 'unknown_connection', `after revoke GET /v1/token answered ${gone.status} ${gone.text}`);
  check(!(await tk.connections()).some((c) => c.provider === provider), 'after revoke /v1/connections still lists the connection');
  const rf = await tk.get(`/v1/token/${provider}/refresh`, 'POST');
  check(rf.status === 404, `after revoke a forced refresh answered ${rf.status} ${rf.text}`);
  return notes.join('; ');
}

async function deny({ browser, tk, op }) {
  await tk.start();
  const from = Date.now();
  const page = await authorize(browser, tk, 'oidc', { consent: false, shot: 'deny-callback.png' });
  check(page.status === 400, `callback after cancel answered HTTP ${page.status}`);
  check(/denied/i.test(page.text) && /nothing was stored/i.test(page.text), `callback page does not explain: ${page.text.slice(0, 300)}`);
  check(page.text.includes('access_denied') || /aborted/i.test(page.text), `callback page does not relay the provider's reason: ${page.text.slice(0, 300)}`);
  check((await tk.connections()).length === 0, '/v1/connections lists a connection after a denied authorization');
  const r = await tk.get('/v1/token/oidc');
  check(r.status === 404 && r.json?.error === 'unknown_connection', `GET /v1/token/oidc after deny answered ${r.status} ${r.text}`);
  check(!op.events.some((e) => e.t >= from && e.event === 'grant.success' && e.grant_type === 'authorization_code' && e.client === 'tk-e2e-deny'), 'a code was redeemed');
  return `400 page: "${page.text.replace(/\s+/g, ' ').slice(0, 90)}…"`;
}

// The user revokes the app at the provider (not through tokenkeeper): the
// next refresh is refused, the connection asks for authorization (409 with
// connect_url), the provider is not hammered, and connecting again heals it.
async function upstreamRevoked({ browser, tk, op, clientId }) {
  await tk.start();
  const page = await authorize(browser, tk, 'oidc', { consent: true, shot: 'upstream-connected.png' });
  check(page.status === 200, `callback answered HTTP ${page.status}: ${page.text.slice(0, 300)}`);
  const t = await tk.get('/v1/token/oidc');
  check(t.status === 200, `GET /v1/token/oidc answered ${t.status} ${t.text}`);
  const from = Date.now();
  await op.revokeAs({ id: clientId, secret: CONF_SECRET }, t.json.access_token);
  check((await op.introspect(t.json.access_token)).active === false, 'the provider did not revoke the token');
  let last;
  const end = Date.now() + 3 * ACCESS_TTL * 1000;
  while (Date.now() < end) {
    last = await tk.get('/v1/token/oidc');
    if (last.status !== 200) break;
    await sleep(100);
  }
  check(last.status === 409 && last.json?.error === 'authorization_required', `after the provider revoked the grant GET /v1/token answered ${last.status} ${last.text}`);
  const connectUrl = last.json.connect_url;
  check(typeof connectUrl === 'string' && connectUrl.startsWith(`${tk.base}/connect/oidc`), `connect_url is ${connectUrl}`);
  const c = (await tk.connections()).find((x) => x.provider === 'oidc');
  check(c?.state === 'authorization_required', `connection state is ${c?.state}`);
  check(/invalid_grant/.test(c.last_error || ''), `last_error does not name the provider's answer: ${c.last_error}`);
  await sleep(2500); // no retry storm against a dead grant
  const refused = op.eventsFor(clientId, from).filter((e) => e.event === 'grant.error' && e.grant_type === 'refresh_token');
  check(refused.length >= 1 && refused.length <= 2, `the provider saw ${refused.length} refused refreshes after the revocation (expected 1, at most 2)`);
  // Connecting again heals the connection.
  const again = await authorize(browser, tk, 'oidc', { consent: true, shot: 'upstream-reconnected.png' });
  check(again.status === 200, `reconnect: callback answered HTTP ${again.status}: ${again.text.slice(0, 300)}`);
  const healed = await tk.get('/v1/token/oidc');
  check(healed.status === 200, `after reconnecting GET /v1/token answered ${healed.status} ${healed.text}`);
  check((await op.introspect(healed.json.access_token)).active === true, 'after reconnecting the token is not active');
  const c2 = (await tk.connections()).find((x) => x.provider === 'oidc');
  // With 3-5 s access tokens the scheduler may already be refreshing the
  // new grant by now: both states are a healed connection.
  check(c2?.state === 'active' || c2?.state === 'refreshing', `after reconnecting the connection is ${c2?.state}`);
  return `${refused.length} refused refresh, then 409 authorization_required with connect_url; reconnect healed it`;
}

// -------------------------------------------------------------------- main

async function main() {
  mkdirSync(OUT, { recursive: true });
  const [opPort, confPort, pubPort, denyPort, upPort] = await Promise.all([freePort(), freePort(), freePort(), freePort(), freePort()]);
  const clients = [
    // Web client: oidc-provider matches its redirect URIs exactly (the
    // loopback-any-port rule of RFC 8252 applies to native clients only).
    {
      client_id: 'tk-e2e-confidential',
      client_secret: CONF_SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [`http://127.0.0.1:${confPort}/callback`],
    },
    {
      client_id: 'tk-e2e-deny',
      client_secret: CONF_SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [`http://127.0.0.1:${denyPort}/callback`],
    },
    {
      client_id: 'tk-e2e-upstream',
      client_secret: CONF_SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [`http://127.0.0.1:${upPort}/callback`],
    },
    // Native public client: any loopback port matches (RFC 8252 7.3).
    {
      client_id: 'tk-e2e-public',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'],
    },
    // The suite's own resource-server credential, for introspection.
    {
      client_id: INTROSPECTOR.id,
      client_secret: INTROSPECTOR.secret,
      redirect_uris: [],
      response_types: [],
      grant_types: [],
    },
  ];
  const op = new OidcProvider(opPort, clients);
  let browser;
  const daemons = [];
  const results = [];
  try {
    await op.ready();
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const tk = (name, port, confidential, opts) => {
      const d = new Tokenkeeper(name, port, op, { confidential, public: 'tk-e2e-public' }, opts);
      daemons.push(d);
      return d;
    };
    const tests = [
      ['confidential client (client_secret_basic): authorize, refresh under load, restart, revoke',
        (() => { const d = tk('confidential', confPort, 'tk-e2e-confidential'); return () => lifecycle({ browser, op, tk: d, provider: 'oidc', clientId: 'tk-e2e-confidential', label: 'confidential' }); })(), daemons.at(-1)],
      ['public client (none + PKCE), endpoints discovered from the issuer: authorize, refresh under load, restart, revoke',
        (() => {
          const d = tk('public', pubPort, 'tk-e2e-confidential');
          return async () => {
            const detail = await lifecycle({ browser, op, tk: d, provider: 'oidcpub', clientId: 'tk-e2e-public', label: 'public' });
            const log = readFileSync(d.logPath, 'utf8');
            check(/provider=oidcpub.*endpoints discovered|endpoints discovered.*provider=oidcpub/.test(log), 'the oidcpub endpoints were not discovered from the issuer');
            return `${detail}; endpoints discovered from ${op.base}`;
          };
        })(), daemons.at(-1)],
      ['grant revoked at the provider: 409 authorization_required, reconnect heals',
        (() => { const d = tk('upstream', upPort, 'tk-e2e-upstream'); return () => upstreamRevoked({ browser, tk: d, op, clientId: 'tk-e2e-upstream' }); })(), daemons.at(-1)],
      ['user cancels at the consent page: 400 page that explains, nothing stored',
        (() => { const d = tk('deny', denyPort, 'tk-e2e-deny'); return () => deny({ browser, tk: d, op }); })(), daemons.at(-1)],
    ];
    const deadline = sleep(SUITE_DEADLINE_MS - (Date.now() - t0)).then(() => { throw new Failure('suite deadline passed'); });
    await Promise.all(tests.map(async ([name, fn, d]) => {
      const start = Date.now();
      try {
        const detail = await Promise.race([fn(), deadline]);
        results.push({ name, ok: true });
        console.log(`ok   ${name} (${since(start)})\n     ${detail}`);
      } catch (e) {
        results.push({ name, ok: false });
        console.log(`FAIL ${name} (${since(start)})\n     ${e instanceof Failure ? e.message : e.stack}`);
        console.log(`     --- last lines of ${d.logPath}:\n${d.logTail().replace(/^/gm, '     | ')}`);
      }
    }));
  } catch (e) {
    results.push({ name: 'setup', ok: false });
    console.log(`FAIL setup: ${e instanceof Failure ? e.message : e.stack}`);
  } finally {
    await Promise.all(daemons.map((d) => d.close()));
    if (browser) await browser.close().catch(() => {});
    await op.stop();
  }
  const passed = results.filter((r) => r.ok).length;
  const failed = results.length - passed;
  console.log(`(${since(t0)}; logs and screenshots in ${OUT})`);
  console.log(`e2e: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 && passed > 0 ? 0 : 1);
}

// Anything escaping the per-test handling still ends with the summary line.
for (const ev of ['uncaughtException', 'unhandledRejection']) {
  process.on(ev, (e) => {
    console.log(`FAIL internal error: ${e?.stack || e}`);
    console.log('e2e: 0 passed, 1 failed');
    process.exit(1);
  });
}
main();
