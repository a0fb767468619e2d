// Loopback-only OAuth 2.0 / OIDC server (oidc-provider) for tokend's e2e tests.
//
// Usage: node server.mjs [--port N] [--client-id ID] [--client-secret S]
//                        [--access-ttl SECONDS] [--watch-stdin]
// Env fallbacks: OIDC_PORT, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_ACCESS_TTL.
// Port 0 picks a free port. Once listening, exactly one JSON line goes to stdout.
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

// oidc-provider prints its NOTICE lines with console.info (stdout); keep stdout
// reserved for the single JSON line the harness waits for.
console.info = console.error;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.OIDC_PORT ?? '0' },
    'client-id': { type: 'string', default: process.env.OIDC_CLIENT_ID },
    'client-secret': { type: 'string', default: process.env.OIDC_CLIENT_SECRET },
    'access-ttl': { type: 'string', default: process.env.OIDC_ACCESS_TTL ?? '60' },
    // Exit when stdin closes, so a crashed test run cannot leave us orphaned.
    'watch-stdin': { type: 'boolean', default: false },
  },
});

const clientId = args['client-id'];
const clientSecret = args['client-secret'];
const accessTtl = Number(args['access-ttl']);
const port = Number(args.port);
if (!clientId || !clientSecret) {
  console.error('server.mjs: --client-id and --client-secret are required');
  process.exit(2);
}
if (!Number.isInteger(accessTtl) || accessTtl < 1) {
  console.error('server.mjs: --access-ttl must be a positive integer (seconds)');
  process.exit(2);
}
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error('server.mjs: --port must be an integer in 0..65535');
  process.exit(2);
}

const HOST = '127.0.0.1';
const server = http.createServer();
// Listen first: with port 0 the issuer URL is only known once the OS picked one.
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, HOST, resolve);
});
const actualPort = server.address().port;
const issuer = `http://${HOST}:${actualPort}`;
// Never requested by anyone: the harness stops at the redirect and reads the code.
const redirectUri = `${issuer}/cb`;

const routes = {
  authorization: '/auth',
  token: '/token',
  introspection: '/token/introspection',
  revocation: '/token/revocation',
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    token_endpoint_auth_method: 'client_secret_post',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: [redirectUri],
  }],
  // offline_access is what makes issueRefreshToken (default policy) mint one.
  scopes: ['openid', 'offline_access'],
  // Every use of a refresh token consumes it and issues a new one; replaying a
  // consumed one fails with invalid_grant and revokes the whole grant.
  rotateRefreshToken: true,
  // Confidential clients may skip PKCE by default; require it like a strict AS.
  pkce: { required: () => true },
  ttl: {
    AccessToken: accessTtl,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
    Interaction: 3600,
  },
  features: {
    // Built-in login/consent HTML forms; any username + password is accepted.
    devInteractions: { enabled: true },
    // Lets tests check a refresh token without consuming it.
    introspection: {
      enabled: true,
      allowedPolicy: (ctx, client, token) => token.clientId === client.clientId,
    },
    // Lets tests simulate a user or admin revoking a grant.
    revocation: {
      enabled: true,
      allowedPolicy: (ctx, client, token) => token.clientId === client.clientId,
    },
  },
  // Spelled out (these are the defaults) so the JSON line below matches them.
  routes,
  // No browser JavaScript ever calls this server.
  clientBasedCORS: () => false,
  // Accept any account id the login form submits.
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
});

server.on('request', provider.callback());

process.stdout.write(`${JSON.stringify({
  issuer,
  port: actualPort,
  token_endpoint: `${issuer}${routes.token}`,
  authorization_endpoint: `${issuer}${routes.authorization}`,
  introspection_endpoint: `${issuer}${routes.introspection}`,
  revocation_endpoint: `${issuer}${routes.revocation}`,
  redirect_uri: redirectUri,
})}\n`);

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  // Keep-alive sockets would otherwise hold close() open.
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['watch-stdin']) {
  process.stdin.on('end', shutdown);
  process.stdin.resume();
}
