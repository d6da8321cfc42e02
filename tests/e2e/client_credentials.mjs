// The client-credentials grant (RFC 6749 4.4) against a real authorization
// server: panva's oidc-provider with its clientCredentials feature and
// 10-second client-credentials tokens, endpoints discovered from its
// issuer. tokenkeeper obtains the token at start with nobody asking, then
// CALLERS tasks read /v1/token for LOAD_MS (2.5 token lifetimes). Checked:
// every answer is 200 and its token is still valid when it arrives (by the
// `exp` oidc-provider's introspection gives), every distinct token is
// active at the provider when first seen, and the provider saw about one
// token request per renewal period, not one per caller or per read.
//
// Env: E2E_BIN (tokenkeeper binary), E2E_OUT (artefact dir).
// Prints "client-credentials: N passed, N failed" last; exits non-zero on
// failure.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
  OUT, check, daemonConfig, freePort, requireEnv, sleep, startDaemon, startProvider, stop, suite,
} from './lib.mjs';

const SECRET = 'cc+secret/with=base64+chars';
const CLIENT = 'tk-e2e-cc';
const INTROSPECTOR = { id: 'e2e-cc-introspector', secret: 'introspector-secret' };
// The provider's client-credentials token lifetime, in seconds.
const TTL = 10;
// tokenkeeper renews at this fraction of a lifetime: 3 s before the end,
// a margin a busy CI machine keeps without trouble.
const AT_FRACTION = 0.7;
const CALLERS = 16;
const LOAD_MS = 25_000;

requireEnv('client-credentials');

async function main() {
  const clients = [
    {
      client_id: CLIENT,
      client_secret: SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
    // The suite's resource-server credential, for introspection.
    {
      client_id: INTROSPECTOR.id,
      client_secret: INTROSPECTOR.secret,
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    },
  ];

  // oidc-provider's event lines (see op.mjs), kept for counting.
  const events = [];
  const provider = await startProvider({
    log: 'cc-oidc-provider.log',
    clients,
    env: { OP_ACCESS_TTL: String(TTL), OP_CLIENT_CREDENTIALS: '1' },
    onLine: (l) => {
      try { events.push(JSON.parse(l)); } catch { /* not an event line */ }
    },
  });
  const opBase = provider.base;
  const tokenRequests = (from, to = Infinity) => events.filter((e) => e.event === 'grant.success'
    && e.grant_type === 'client_credentials' && e.client === CLIENT && e.t >= from && e.t <= to).length;
  const grantErrors = () => events.filter((e) => e.event === 'grant.error' || e.event === 'server_error');

  const introspect = async (token) => {
    const r = await fetch(`${opBase}/token/introspection`, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${INTROSPECTOR.id}:${INTROSPECTOR.secret}`).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: new URLSearchParams({ token }),
    });
    const text = await r.text();
    check(r.status === 200, `introspection answered HTTP ${r.status}: ${text}`);
    return JSON.parse(text);
  };

  const { dir, config, base: tkBase } = daemonConfig({
    prefix: 'tk-e2e-cc-',
    secret: SECRET,
    port: await freePort(),
    text: `[refresh]
at_fraction = ${AT_FRACTION}
check_interval = "1s"
jitter = "0s"
min_validity = "1s"
retry_initial = "1s"
retry_max = "4s"

# Nothing by hand but the issuer: the token endpoint is discovered.
[providers.cc]
grant = "client_credentials"
client_id = "${CLIENT}"
client_secret_file = "secret"
refresh_auth = "basic"
issuer = "${opBase}"
scopes = ["api:read"]
`,
  });
  const tkLogPath = path.join(OUT, 'cc-tokenkeeper.log');
  let daemon;
  const { run, failed, finish } = suite('client-credentials');
  try {
    await provider.ready();
    const started = Date.now();
    daemon = await startDaemon({ config, base: tkBase, logPath: tkLogPath });

    await run('client credentials from a discovered issuer: obtained at start, renewed under load, each answer accepted by the provider', async () => {
      // Obtained with nobody asking.
      for (let i = 0; i < 200 && tokenRequests(started) === 0; i++) await sleep(50);
      check(tokenRequests(started) === 1, `oidc-provider saw ${tokenRequests(started)} token requests before any caller asked`);
      const log = readFileSync(tkLogPath, 'utf8');
      check(/endpoints discovered/.test(log), `the token endpoint was not discovered from the issuer (see ${tkLogPath})`);

      const answers = []; // {token, at, expiresIn}
      const failures = [];
      const loadStart = Date.now();
      const loadEnd = loadStart + LOAD_MS;
      const first = new Map(); // token -> introspection promise, started when first seen
      await Promise.all(Array.from({ length: CALLERS }, async () => {
        while (Date.now() < loadEnd) {
          try {
            const r = await fetch(`${tkBase}/v1/token/cc`);
            const at = Date.now();
            const text = await r.text();
            if (r.status !== 200) {
              failures.push(`HTTP ${r.status}: ${text}`);
            } else {
              const j = JSON.parse(text);
              answers.push({ token: j.access_token, at, expiresIn: j.expires_in });
              if (!first.has(j.access_token)) {
                first.set(j.access_token, introspect(j.access_token).then((v) => ({ ...v, seen: at }), (e) => ({ error: e.message })));
              }
            }
          } catch (e) {
            failures.push(String(e));
          }
          await sleep(40);
        }
      }));
      check(failures.length === 0, `${failures.length} failed reads, first: ${failures[0]}`);
      check(answers.length > CALLERS * 10, `only ${answers.length} reads happened`);

      const intro = new Map();
      for (const [token, p] of first) intro.set(token, await p);
      for (const [token, i] of intro) {
        const short = `${token.slice(0, 8)}…`;
        check(!i.error, `token ${short}: introspection failed: ${i.error}`);
        check(i.active === true && i.client_id === CLIENT, `token ${short} was not active at the provider when first seen: ${JSON.stringify(i)}`);
        check(i.scope === 'api:read', `token ${short} has scope ${i.scope}`);
      }
      // Valid when it arrived: the provider's own end (exp, whole seconds,
      // clock tolerance 0) is after the moment each answer was received.
      let late = 0;
      let tightest = Infinity;
      for (const a of answers) {
        const left = intro.get(a.token).exp * 1000 - a.at;
        tightest = Math.min(tightest, left);
        if (left <= 0 || !(a.expiresIn > 0)) late += 1;
      }
      check(late === 0, `${late} of ${answers.length} answers carried a token already expired at the provider`);

      // About one token request per renewal period (LOAD_MS / (TTL *
      // AT_FRACTION) ≈ 3.6), not one per caller or per read.
      const requests = tokenRequests(loadStart, Date.now());
      const periods = LOAD_MS / (TTL * AT_FRACTION * 1000);
      check(requests >= 2, `only ${requests} token requests in ${LOAD_MS / 1000} s of ${TTL} s tokens: not renewed`);
      check(requests <= Math.ceil(periods) + 2, `${requests} token requests for ${CALLERS} callers in ${LOAD_MS / 1000} s (expected about ${periods.toFixed(1)})`);
      check(intro.size <= requests + 1, `${intro.size} distinct tokens served from ${requests} token requests`);
      check(grantErrors().length === 0, `oidc-provider logged errors: ${JSON.stringify(grantErrors()[0])}`);

      // The newest token is still accepted now.
      const now = await (await fetch(`${tkBase}/v1/token/cc`)).json();
      const last = await introspect(now.access_token);
      check(last.active === true, `the token served after the load is not active: ${JSON.stringify(last)}`);
      return `${answers.length} reads by ${CALLERS} callers over ${LOAD_MS / 1000} s; ${intro.size} distinct tokens, all active at the provider; `
        + `${requests} token requests (about ${periods.toFixed(1)} renewal periods); tightest margin ${(tightest / 1000).toFixed(1)} s`;
    });
  } catch (e) {
    failed(e);
  } finally {
    await stop({ daemon, provider, dir });
  }
  finish();
}

main();
