// Dashboard in a real browser: `tokenkeeper serve --dev`, headless Chromium
// clicks Connect on the dashboard, Approve on the dev provider's page, lands
// on the success page and back on the dashboard, which shows the connection
// `active`. Then, without reloading the page: a refresh adds a point to the
// timeline, a failed refresh adds a red square (and says so in words),
// proxied requests move the quota gauge; the lifetime bar marks now and the
// next refresh; every control has an accessible name, text has enough
// contrast, and a phone-width window scrolls only vertically. Screenshots
// (desktop and phone) go to $E2E_OUT and are checked for content, not
// pixels: what each shows is asserted on the page as it was taken.
//
// Env: E2E_BIN (tokenkeeper binary), E2E_OUT (artefact dir), E2E_CHROMIUM.
// Prints "dashboard: N passed, N failed" last; exits non-zero on failure.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, createWriteStream } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { freePort } from './lib.mjs';

const BIN = process.env.E2E_BIN;
const OUT = process.env.E2E_OUT;
const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';


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

let passes = 0;
function passed(what) {
  passes += 1;
  console.log(`dashboard: ok - ${what}`);
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
    passed('connect through the dashboard');

    // The lifetime bar: a fresh one-hour token, refreshed at 75% of its life.
    const bar = page.locator('.access-bar svg.bar');
    const nowPct = Number(await bar.getAttribute('data-now-pct'));
    const nextPct = Number(await bar.getAttribute('data-next-pct'));
    check(nowPct >= 0 && nowPct < 10, `now near the start of the bar (${nowPct}%)`);
    check(nextPct > 50 && nextPct < 95, `next refresh around 75% (${nextPct}%)`);
    const barLabel = await bar.getAttribute('aria-label');
    check(/next refresh in/.test(barLabel) && /expires in/.test(barLabel), `the bar is labelled in words: ${barLabel}`);
    passed('lifetime bar');

    // Live updates: a refresh made elsewhere shows up without a reload.
    await page.evaluate(() => { window.__sameDocument = true; });
    const points = () => page.locator('svg.timeline .point.ok').count();
    const before = await points();
    let r = await fetch(`${base}/v1/token/demo/refresh`, { method: 'POST' });
    check(r.ok, `forced refresh answered ${r.status}`);
    await page.waitForFunction((n) => document.querySelectorAll('svg.timeline .point.ok').length > n, before, { timeout: 30000 });
    check(await page.evaluate(() => window.__sameDocument === true), 'the page was not reloaded');
    check((await points()) === before + 1, 'one more point for one refresh');
    passed('timeline gains a point without a reload');

    // A failed refresh: a red square in the failure lane, and words.
    r = await fetch(`${base}/dev-provider/_sim/config`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ fault: { type: 'status', status: 500 } }),
    });
    check(r.ok, `the simulator takes a fault (${r.status})`);
    r = await fetch(`${base}/v1/token/demo/refresh`, { method: 'POST' });
    check(r.status === 503, `the refresh fails (${r.status})`);
    await fetch(`${base}/dev-provider/_sim/config`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ fault: null }),
    });
    const failure = page.locator('svg.timeline .point.failure').first();
    await failure.waitFor({ state: 'attached', timeout: 30000 });
    const stroke = await failure.evaluate((el) => getComputedStyle(el).stroke);
    check(stroke === 'rgb(207, 34, 46)', `the failure is drawn red (${stroke})`);
    const cap = await failure.evaluate((el) => getComputedStyle(el).strokeLinecap);
    check(cap === 'square', 'a failure has its own shape, not only its colour');
    const failedRow = page.locator('table.events tr[data-kind="refresh_failed"]').first();
    check((await failedRow.innerText()).includes('✗ refresh failed'), 'the failure is listed in words');
    const tlName = await page.locator('svg.timeline title').first().textContent();
    check(/1 failure/.test(tlName), `the timeline's name counts the failure: ${tlName}`);
    passed('failure marked');

    // The quota gauge follows proxied requests.
    for (let i = 0; i < 3; i++) {
      r = await fetch(`${base}/proxy/demo/contacts`);
      check(r.ok, `proxied request answered ${r.status}`);
    }
    const conns = await (await fetch(`${base}/v1/connections`)).json();
    const used = conns.connections[0].quota.daily_used;
    check(used >= 3, `the proxy counted the requests (${used})`);
    const expected = `${used.toLocaleString('en-US')} of 150,000 requests used today`;
    await page.waitForFunction((t) => (document.querySelector('.gauge')?.textContent || '').includes(t), expected, { timeout: 30000 });
    const meter = page.locator('.gauge meter').first();
    check(Number(await meter.getAttribute('value')) === used, 'the meter holds the count');
    const meterLabel = await meter.evaluate((el) => Array.from(el.labels || []).map((l) => l.textContent).join(' '));
    check(meterLabel.includes('demo'), `the meter is labelled (${meterLabel})`);
    passed('quota gauge');

    // Slower refreshes stand higher: two more, the provider taking longer.
    const sim = (body) => fetch(`${base}/dev-provider/_sim/config`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    for (const ms of [400, 150]) {
      check((await sim({ token_delay_ms: ms })).ok, 'the simulator takes a delay');
      r = await fetch(`${base}/v1/token/demo/refresh`, { method: 'POST' });
      check(r.ok, `forced refresh answered ${r.status}`);
    }
    await sim({ token_delay_ms: 0 });
    await page.waitForFunction((n) => document.querySelectorAll('svg.timeline .point.ok').length >= n, before + 3, { timeout: 30000 });
    const heights = await page.locator('svg.timeline .point.ok').evaluateAll((els) =>
      els.map((el) => ({ ms: Number(el.dataset.durationMs), y: el.getBoundingClientRect().top })));
    const slowest = heights.reduce((a, b) => (b.ms > a.ms ? b : a));
    const fastest = heights.reduce((a, b) => (b.ms < a.ms ? b : a));
    check(slowest.ms >= 400 && slowest.y < fastest.y, `the slowest refresh stands highest (${JSON.stringify(heights)})`);
    passed('refresh durations as heights');

    await page.screenshot({ path: path.join(OUT, 'dashboard.png'), fullPage: true });
    check((await page.locator('svg.timeline').first().boundingBox()).width > 300, 'the timeline is drawn wide on a desktop');

    // Accessibility basics, as the browser computes them.
    const problems = await page.evaluate(() => {
      const out = [];
      const name = (el) => {
        const by = el.getAttribute('aria-labelledby');
        if (by) return by.split(/\s+/).map((id) => document.getElementById(id)?.textContent || '').join(' ').trim();
        return (el.getAttribute('aria-label') || el.textContent || '').trim();
      };
      for (const el of document.querySelectorAll('button, a[href], [role=button]')) {
        if (!name(el)) out.push(`unnamed control: ${el.outerHTML.slice(0, 80)}`);
      }
      for (const el of document.querySelectorAll('input, select, textarea, meter')) {
        if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label')) out.push(`unlabelled field: ${el.outerHTML.slice(0, 80)}`);
      }
      for (const el of document.querySelectorAll('svg[role=img]')) {
        if (!name(el)) out.push(`unnamed image: ${el.outerHTML.slice(0, 80)}`);
      }
      if (!document.documentElement.lang) out.push('no lang on <html>');
      // Text contrast (WCAG AA: 4.5:1) against the nearest painted background.
      const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
      const lum = ([r, g, b]) => {
        const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
      };
      const bg = (el) => {
        for (let e = el; e; e = e.parentElement) {
          const c = rgb(getComputedStyle(e).backgroundColor);
          if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
        }
        return [255, 255, 255];
      };
      for (const el of document.querySelectorAll('main *')) {
        if (el.closest('svg')) continue;
        const own = Array.from(el.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
        if (!own) continue;
        const a = lum(rgb(getComputedStyle(el).color).slice(0, 3));
        const b = lum(bg(el));
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        if (ratio < 4.5) out.push(`contrast ${ratio.toFixed(2)}:1 for "${el.textContent.trim().slice(0, 40)}"`);
      }
      return out;
    });
    check(problems.length === 0, `accessibility: ${problems.join('; ')}`);
    passed('accessibility basics');

    // Phone-size window: nothing wider than the screen, everything still there.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}/`);
    let overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 1, `no horizontal scrolling on a phone (overflow ${overflow}px)`);
    check(await page.locator('svg.timeline').first().isVisible(), 'the timeline is shown on a phone');
    check(await page.locator('.gauge meter').first().isVisible(), 'the gauge is shown on a phone');
    await page.screenshot({ path: path.join(OUT, 'dashboard-phone.png'), fullPage: true });
    await page.setViewportSize({ width: 320, height: 640 });
    overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 1, `no horizontal scrolling at 320px (overflow ${overflow}px)`);
    passed('phone width');

    // The token really is there.
    const tok = await (await fetch(`${base}/v1/token/demo`)).json();
    check(typeof tok.access_token === 'string' && tok.access_token.length > 10, 'token served');
    console.log(`dashboard: screenshots in ${OUT}`);
    console.log(`dashboard: ${passes} passed, 0 failed`);
  } catch (e) {
    console.error(`dashboard: ${e.stack || e}`);
    console.log(`dashboard: ${passes} passed, 1 failed`);
    process.exitCode = 1;
  } finally {
    if (browser) await browser.close();
    daemon.kill('SIGTERM');
    rmSync(profile, { recursive: true, force: true });
  }
}

await main();
