// A real third-party authorization server for the end-to-end suite:
// panva's oidc-provider, configured strictly (PKCE required, rotating
// single-use refresh tokens, short access tokens, no clock tolerance).
//
// Usage: OP_PORT=N OP_CLIENTS='[...client metadata...]' node op.mjs
// (OP_ACCESS_TTL: access-token lifetime in seconds; OP_DEVICE_FLOW=1 and
// OP_CLIENT_CREDENTIALS=1 enable those grants.)
// Prints one JSON object per line on stdout: {"event":"ready",...} once
// listening, then one line per token-endpoint / revocation / error event,
// which the driver (driver.mjs) uses to count refreshes and spot reuse.

import Provider from 'oidc-provider';

const port = Number(process.env.OP_PORT);
const clients = JSON.parse(process.env.OP_CLIENTS || '[]');
const accessTtl = Number(process.env.OP_ACCESS_TTL || '4');
const issuer = `http://127.0.0.1:${port}`;

function emit(obj) {
  process.stdout.write(`${JSON.stringify({ t: Date.now(), ...obj })}\n`);
}

const provider = new Provider(issuer, {
  clients,
  clientDefaults: {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    id_token_signed_response_alg: 'RS256',
  },
  // An API scope for client_credentials.mjs (a client-credentials token
  // keeps only scopes the server knows); the default set otherwise.
  scopes: ['openid', 'offline_access', ...(process.env.OP_CLIENT_CREDENTIALS === '1' ? ['api:read'] : [])],
  cookies: { keys: ['tokenkeeper-e2e-cookie-key-not-secret'] },
  // The default of 15 s keeps expired tokens valid; the suite must see the
  // provider reject a token the moment it expires.
  clockTolerance: 0,
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    // RFC 8628, for device.mjs (OP_DEVICE_FLOW=1); off otherwise so the
    // other suites' discovered metadata stays as it was.
    deviceFlow: { enabled: process.env.OP_DEVICE_FLOW === '1' },
    // RFC 6749 4.4, for client_credentials.mjs (OP_CLIENT_CREDENTIALS=1);
    // off otherwise, for the same reason.
    clientCredentials: { enabled: process.env.OP_CLIENT_CREDENTIALS === '1' },
  },
  // Every client allowed the refresh_token grant gets a refresh token
  // (the default also demands the offline_access scope, which survives
  // only with prompt=consent; tokenkeeper asks for both anyway).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Single-use refresh tokens: redeeming a rotated one is answered
  // invalid_grant and revokes the whole grant.
  rotateRefreshToken: true,
  ttl: {
    AccessToken: accessTtl,
    // Client-credentials tokens are a separate kind here, with their own
    // lifetime; the suite wants them as short as the access tokens.
    ClientCredentials: accessTtl,
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    RefreshToken: 3600,
  },
});
provider.proxy = false;

const client = (ctx) => ctx?.oidc?.client?.clientId;
provider.on('grant.success', (ctx) => {
  emit({ event: 'grant.success', grant_type: ctx.oidc.params.grant_type, client: client(ctx) });
});
for (const name of ['grant.error', 'authorization.error', 'revocation.error', 'introspection.error', 'userinfo.error']) {
  provider.on(name, (ctx, err) => {
    emit({
      event: name,
      client: client(ctx),
      grant_type: ctx?.oidc?.params?.grant_type,
      error: err.error,
      error_description: err.error_description,
    });
  });
}
provider.on('grant.revoked', (ctx, grantId) => emit({ event: 'grant.revoked', client: client(ctx), grantId, path: ctx?.path }));
provider.on('server_error', (ctx, err) => emit({ event: 'server_error', path: ctx?.path, error: String(err?.stack || err) }));

// Silence the "you should change this default" notices; they go to stderr.
const server = provider.listen(port, '127.0.0.1', () => {
  emit({ event: 'ready', issuer });
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
