// The device authorization grant (RFC 8628) against a real authorization
// server: panva's oidc-provider with its deviceFlow feature, endpoints
// discovered from its issuer (nothing configured by hand but the issuer).
// `tokenkeeper connect oidcdev --device` prints the verification address
// and the code; headless Chromium enters the code on oidc-provider's real
// user-code page, confirms, logs in and consents; the daemon's polling
// lands the grant, which then refreshes. A second run aborts on the
// confirmation page: the command ends with exit 1 and "denied", nothing
// stored.
//
// Env: E2E_BIN (tokenkeeper binary), E2E_OUT (artefact dir), E2E_CHROMIUM.
// Prints "device: N passed, N failed" last; exits non-zero on failure.

import { spawn } from 'node:child_process';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  BIN, CHROMIUM, OUT, check, daemonConfig, freePort, requireEnv, sleep, startDaemon, startProvider, stop, suite,
} from './lib.mjs';

const SECRET = 'device+secret/with=base64+chars';
const CLIENT = 'tk-e2e-device';

requireEnv('device');

// `connect --device` in the air: resolves the printed addresses and code
// once they are out, and the exit once it ends.
function connectDevice(config) {
  const p = spawn(BIN, ['connect', 'oidcdev', '--device', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stdout.on('data', (d) => { out += d; });
  p.stderr.on('data', (d) => { err += d; });
  const exit = new Promise((r) => p.on('exit', (code) => r({ code, out, err })));
  const printed = (async () => {
    for (let i = 0; i < 600; i++) {
      // Indented lines: the address, the code, the complete address.
      const shown = out.split('\n').filter((l) => l.startsWith('    ')).map((l) => l.trim());
      if (shown.length >= 3) return { uri: shown[0], code: shown[1], complete: shown[2] };
      if (p.exitCode !== null) break;
      await sleep(50);
    }
    throw new Error(`connect --device printed no code: ${out} ${err}`);
  })();
  return { printed, exit, proc: p };
}

// oidc-provider's own pages: the user-code input, the confirmation, then
// its dev login and consent interactions.
async function approveOnProvider(context, { uri, code }, { abort = false, shot }) {
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await page.goto(uri);
  await page.fill('input[name=user_code]', code);
  await page.click('button[type=submit][form="op.deviceInputForm"]');
  await page.waitForSelector('form#op\\.deviceConfirmForm', { state: 'attached' });
  check((await page.innerText('body')).includes(code), 'the confirmation page shows the code');
  if (abort) {
    await page.click('button[name=abort]');
  } else {
    await page.click('button[autofocus]');
    await page.fill('input[name=login]', 'e2e-device-user');
    await page.fill('input[name=password]', 'any password');
    await page.click('button[type=submit]');
    await page.waitForSelector('input[name=prompt][value=consent]', { state: 'attached' });
    await page.click('button[type=submit]');
  }
  await page.waitForLoadState('load');
  const text = await page.innerText('body');
  if (shot) await page.screenshot({ path: path.join(OUT, shot), fullPage: true });
  await page.close();
  return text;
}

async function main() {
  const clients = [{
    client_id: CLIENT,
    client_secret: SECRET,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
    response_types: [],
    redirect_uris: [],
  }];
  const provider = await startProvider({
    log: 'device-oidc-provider.log',
    clients,
    env: { OP_ACCESS_TTL: '60', OP_DEVICE_FLOW: '1' },
  });
  const { dir, config, base: tkBase } = daemonConfig({
    prefix: 'tk-e2e-device-',
    secret: SECRET,
    port: await freePort(),
    text: `# Nothing by hand but the issuer: the device endpoint is discovered.
[providers.oidcdev]
preset = "generic"
client_id = "${CLIENT}"
client_secret_file = "secret"
code_auth = "basic"
refresh_auth = "basic"
issuer = "${provider.base}"
scopes = ["openid", "offline_access"]
`,
  });
  const opBase = provider.base;
  let daemon;
  let browser;
  const { run, failed, finish } = suite('device');
  try {
    await provider.ready();
    daemon = await startDaemon({ config, base: tkBase, logPath: path.join(OUT, 'device-tokenkeeper.log') });
    const context = await (browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    })).newContext();
    // Only loopback: the provider's pages link to web fonts.
    await context.route('**/*', (route) => (new URL(route.request().url()).hostname === '127.0.0.1' ? route.continue() : route.abort()));

    await run('device code approved on oidc-provider\'s pages: grant stored and refreshable', async () => {
      const c = connectDevice(config);
      const shown = await c.printed;
      check(shown.uri === `${opBase}/device`, `verification_uri printed: ${shown.uri}`);
      check(shown.complete.includes('user_code='), `complete URI printed: ${shown.complete}`);
      const page = await approveOnProvider(context, shown, { shot: 'device-approved.png' });
      check(/success/i.test(page), `the provider's last page: ${page.slice(0, 200)}`);
      const done = await c.exit;
      check(done.code === 0, `connect --device exited ${done.code}: ${done.err}`);
      check(done.out.includes('authorized oidcdev/default'), `stdout: ${done.out}`);
      const t = await fetch(`${tkBase}/v1/token/oidcdev`);
      check(t.status === 200, `GET /v1/token/oidcdev answered ${t.status}`);
      const first = (await t.json()).access_token;
      const r = await fetch(`${tkBase}/v1/token/oidcdev/refresh`, { method: 'POST' });
      const body = await r.text();
      check(r.status === 200, `a forced refresh answered ${r.status}: ${body}`);
      check(JSON.parse(body).access_token !== first, 'the refresh issued a new access token');
      return `code ${shown.code} entered at ${shown.uri}; polled at the default 5 s interval; refreshed once`;
    });

    await run('device code aborted on the confirmation page: exit 1, denied, nothing new stored', async () => {
      const c = connectDevice(config);
      const shown = await c.printed;
      await approveOnProvider(context, shown, { abort: true, shot: 'device-aborted.png' });
      const done = await c.exit;
      check(done.code === 1, `connect --device exited ${done.code}`);
      check(/denied/.test(done.err) && /nothing was stored/.test(done.err), `stderr: ${done.err}`);
      const conns = (await (await fetch(`${tkBase}/v1/connections`)).json()).connections;
      check(conns.length === 1 && conns[0].state === 'active', `connections after the abort: ${JSON.stringify(conns)}`);
      return done.err.trim().split('\n').at(-1);
    });
  } catch (e) {
    failed(e);
  } finally {
    await stop({ browser, daemon, provider, dir });
  }
  finish();
}

main();
