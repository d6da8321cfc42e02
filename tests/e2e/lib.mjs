// What the oidc-provider suites (device.mjs, client_credentials.mjs) share:
// the environment tests/e2e/run.sh sets, free ports, checks, starting
// oidc-provider (op.mjs) and the tokenkeeper daemon with their logs in
// E2E_OUT, a throw-away config directory, and the runner that prints each
// check and the "NAME: N passed, N failed" line run.sh reads.

import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, rmSync, writeFileSync, createWriteStream } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The tokenkeeper binary (E2E_BIN). */
export const BIN = process.env.E2E_BIN;
/** Where logs and screenshots go (E2E_OUT). */
export const OUT = process.env.E2E_OUT;
/** The Chromium to drive (E2E_CHROMIUM). */
export const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Exits with a sentence unless run through run.sh (E2E_BIN, E2E_OUT set). */
export function requireEnv(suite) {
  if (!BIN || !OUT) {
    console.error(`${suite}: run this through tests/e2e/run.sh (E2E_BIN and E2E_OUT are not set)`);
    process.exit(2);
  }
}

/** A loopback port free now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

/** Waits (up to 15 s) until `url` answers 2xx. */
export async function waitFor(url, what) {
  for (let i = 0; i < 300; i++) {
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch { /* not yet */ }
    await sleep(50);
  }
  throw new Error(`${what} did not start`);
}

/**
 * Starts oidc-provider (op.mjs) on a free port with `clients` and the
 * OP_* variables of `env`, its output to OUT/`log`; `onLine` gets each
 * line it prints on stdout (its event lines are JSON). Resolves to
 * `{ proc, base }` once its discovery document answers; `stop()` in
 * `finally` ends it.
 */
export async function startProvider({ log, clients, env = {}, onLine }) {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const out = createWriteStream(path.join(OUT, log));
  const proc = spawn(process.execPath, [path.join(HERE, 'op.mjs')], {
    cwd: HERE,
    env: { ...process.env, OP_PORT: String(port), OP_CLIENTS: JSON.stringify(clients), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let pending = '';
  proc.stdout.on('data', (d) => {
    out.write(d);
    if (!onLine) return;
    pending += d;
    const lines = pending.split('\n');
    pending = lines.pop();
    for (const l of lines) onLine(l);
  });
  proc.stderr.pipe(out);
  return { proc, base, ready: () => waitFor(`${base}/.well-known/openid-configuration`, 'oidc-provider') };
}

/**
 * A throw-away directory holding the client secret (`secret`, mode 0600)
 * and `tokenkeeper.toml` with `text` (`storage.path` and `server.listen`
 * are added: the daemon listens on `port`).
 */
export function daemonConfig({ prefix, secret, port, text }) {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  const config = path.join(dir, 'tokenkeeper.toml');
  writeFileSync(path.join(dir, 'secret'), `${secret}\n`, { mode: 0o600 });
  writeFileSync(config, `[server]
listen = "127.0.0.1:${port}"

[storage]
path = "${path.join(dir, 'tk.db')}"

${text}`);
  return { dir, config, base: `http://127.0.0.1:${port}` };
}

/** `tokenkeeper serve --config config`, its output to `logPath`; resolves once /readyz answers. */
export async function startDaemon({ config, base, logPath }) {
  const log = createWriteStream(logPath);
  const proc = spawn(BIN, ['serve', '--config', config], {
    env: { ...process.env, RUST_LOG: 'info,tokenkeeper=debug', NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  proc.stdout.pipe(log);
  proc.stderr.pipe(log);
  await waitFor(`${base}/readyz`, 'tokenkeeper');
  return proc;
}

/**
 * The checks of one suite: `run(name, fn)` runs one (fn resolves to a
 * line of detail), `failed(e)` records a setup failure, `finish()` prints
 * "NAME: N passed, N failed" and exits (non-zero on any failure or none
 * run).
 */
export function suite(name) {
  const results = [];
  return {
    async run(check, fn) {
      const t = Date.now();
      try {
        const detail = await fn();
        results.push(true);
        console.log(`ok   ${check} (${((Date.now() - t) / 1000).toFixed(1)}s)\n     ${detail}`);
      } catch (e) {
        results.push(false);
        console.log(`FAIL ${check}\n     ${e.stack || e}`);
      }
    },
    failed(e) {
      results.push(false);
      console.log(`FAIL setup: ${e.stack || e}`);
    },
    finish() {
      const passed = results.filter(Boolean).length;
      const failed = results.length - passed;
      console.log(`${name}: ${passed} passed, ${failed} failed`);
      process.exit(failed === 0 && passed > 0 ? 0 : 1);
    },
  };
}

/** Ends what a suite started (any may be missing), then removes `dir`. */
export async function stop({ browser, daemon, provider, dir }) {
  if (browser) await browser.close().catch(() => {});
  if (daemon) daemon.kill('SIGTERM');
  if (provider) provider.proc.kill('SIGTERM');
  await sleep(300);
  if (dir) rmSync(dir, { recursive: true, force: true });
}
