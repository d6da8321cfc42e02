// Dashboard in a real browser: `tokenkeeper serve --dev`, headless Chromium
// clicks Connect on the dashboard, Approve on the dev provider's page, lands
// on the success page and back on the dashboard, which shows the connection
// `active`. Screenshots (desktop and phone-size) go to $E2E_OUT.
//
// Env: E2E_BIN (tokenkeeper binary), E2E_OUT (artefact dir), E2E_CHROMIUM.
// Prints "dashboard: N passed, N failed" last; exits non-zero on failure.

import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, rmSync, createWriteStream } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.E2E_BIN;
const OUT = process.env.E2E_OUT;
const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitHealthy(base) {
  for (let i = 0; i < 200; i++) {
    try {
      const r = await fetch(`${base}/healthz`);
      if (r.ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('daemon did not become healthy');
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function main() {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const log = createWriteStream(path.join(OUT, 'dashboard-daemon.log'));
  const daemon = spawn(BIN, ['serve', '--dev', '--listen', `127.0.0.1:${port}`, '--dev-token-lifetime', '1h'], {
    env: { ...process.env, NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  daemon.stdout.pipe(log);
  daemon.stderr.pipe(log);
  const profile = mkdtempSync(path.join(tmpdir(), 'tk-dash-'));
  let browser;
  try {
    await waitHealthy(base);
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      viewport: { width: 1280, height: 800 },
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    browser = context;
    await context.route('**/*', (route) => {
      const u = new URL(route.request().url());
      return u.hostname === '127.0.0.1' ? route.continue() : route.abort();
    });
    const page = await context.newPage();
    await page.goto(`${base}/`);
    check((await page.title()).includes('tokenkeeper'), 'dashboard title');
    check(await page.getByText('No connection yet').isVisible(), 'empty state shown');
    await page.screenshot({ path: path.join(OUT, 'dashboard-empty.png'), fullPage: true });

    // Connect → the dev provider's consent page → Approve → success page.
    await page.locator('form[action="/connect/demo"] button[type=submit]').click();
    await page.waitForURL(/\/dev-provider\/authorize/);
    await page.locator('#approve').click();
    await page.waitForURL(/\/callback/);
    check((await page.locator('h1').innerText()).includes('Connected'), 'success page heading');
    await page.screenshot({ path: path.join(OUT, 'dashboard-connected-page.png'), fullPage: true });

    await page.goto(`${base}/`);
    const badge = page.locator('tr:has-text("demo") .badge');
    check((await badge.innerText()).trim() === 'active', 'the connection is shown active');
    const color = await badge.evaluate((el) => getComputedStyle(el).backgroundColor);
    check(color !== 'rgba(0, 0, 0, 0)', 'the state badge is coloured');
    await page.screenshot({ path: path.join(OUT, 'dashboard.png'), fullPage: true });

    // Phone-size window: the table collapses into readable blocks.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}/`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 1, `no horizontal scrolling on a phone (overflow ${overflow}px)`);
    await page.screenshot({ path: path.join(OUT, 'dashboard-phone.png'), fullPage: true });

    // The token really is there.
    const tok = await (await fetch(`${base}/v1/token/demo`)).json();
    check(typeof tok.access_token === 'string' && tok.access_token.length > 10, 'token served');
    console.log(`dashboard: screenshots in ${OUT}`);
    console.log('dashboard: 1 passed, 0 failed');
  } catch (e) {
    console.error(`dashboard: ${e.stack || e}`);
    console.log('dashboard: 0 passed, 1 failed');
    process.exitCode = 1;
  } finally {
    if (browser) await browser.close();
    daemon.kill('SIGTERM');
    rmSync(profile, { recursive: true, force: true });
  }
}

await main();
