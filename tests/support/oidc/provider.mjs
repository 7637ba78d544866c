// A real OpenID provider for flagstream's identity tests: oidc-provider (the certified
// Node.js implementation) on a loopback port, with the test users and clients below.
//
//   node provider.mjs --state <dir> [--port <n>] [--clock-skew <seconds>]
//
// It prints one JSON line, {"issuer": "...", "port": n}, once it listens. Its signing keys
// live in <dir>/keys.json (made on first start), so a restart on the same port keeps them.
//
// Test-only endpoints beside the provider's own:
//   GET  /interaction/<uid>         what the provider asks (login or consent), as JSON
//   POST /interaction/<uid>         login=<account id>: signs the user in, or grants consent
//   POST /admin/rotate              makes a new signing key; the old one stays published
//                                   (as a provider rotating its keys does), the new one signs
//
// Tokens: authorization code with PKCE for the people (public client `reading-app`), and
// client credentials for the confidential clients whose tokens the hostile-token table
// needs: `expiring` (its tokens live 1 s) and `early` (its tokens carry an `nbf` an hour
// ahead). Access tokens are JWTs (RFC 9068 at+jwt) for the resource https://flagstream.test,
// or https://other.test (another service, whose tokens flagstream must refuse).

import { createServer } from 'node:http';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { join } from 'node:path';

import Provider from 'oidc-provider';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith('--')) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const stateDir = args.state;
if (!stateDir) {
  console.error('usage: node provider.mjs --state <dir> [--port <n>]');
  process.exit(2);
}
const skew = Number(args['clock-skew'] ?? 0);
if (skew) {
  const now = Date.now;
  Date.now = () => now() + skew * 1000;
}

const RESOURCE = 'https://flagstream.test';
// Another service of the same provider: its tokens must not be accepted by flagstream.
const OTHER_RESOURCE = 'https://other.test';

// The people of the tests and their claims (ids only: names come from the token alone).
const ACCOUNTS = {
  'parent-a': { flagstream_role: 'parent', children: ['child-a1', 'child-a2'], given_name: 'Ana' },
  'parent-b': { flagstream_role: 'parent', children: ['child-b1'], given_name: 'Bruno' },
  'teacher-t': { flagstream_role: 'teacher', classes: ['4B'], roster: ['child-a1', 'child-b1'], given_name: 'Tereza' },
  'head-s': { flagstream_role: 'school_admin', school: 'school-1', given_name: 'Sofia' },
  'researcher-r': { flagstream_role: 'researcher', given_name: 'Rui' },
  'nobody-n': { given_name: 'Nadia' },
};

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: randomUUID(), use: 'sig', alg: 'RS256' };
}

const keysFile = join(stateDir, 'keys.json');
function loadKeys() {
  if (existsSync(keysFile)) return JSON.parse(readFileSync(keysFile, 'utf8'));
  const keys = [newKey()];
  writeFileSync(keysFile, JSON.stringify(keys));
  return keys;
}

function configuration(keys) {
  return {
    jwks: { keys },
    clients: [
      {
        client_id: 'reading-app',
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        grant_types: ['authorization_code'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
      },
      {
        client_id: 'expiring',
        client_secret: 'expiring-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
      {
        client_id: 'early',
        client_secret: 'early-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
    ],
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, client) => {
          if (resource !== RESOURCE && resource !== OTHER_RESOURCE) {
            throw new Provider.errors.InvalidTarget();
          }
          return {
            scope: 'flagstream',
            audience: resource,
            accessTokenFormat: 'jwt',
            accessTokenTTL: client.clientId === 'expiring' ? 1 : 600,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    findAccount: (ctx, id) => (ACCOUNTS[id]
      ? { accountId: id, claims: () => ({ sub: id, ...ACCOUNTS[id] }) }
      : undefined),
    extraTokenClaims: (ctx, token) => {
      if (token.accountId && ACCOUNTS[token.accountId]) return ACCOUNTS[token.accountId];
      if (token.clientId === 'expiring' || token.clientId === 'early') {
        return { flagstream_role: 'researcher' };
      }
      return undefined;
    },
    formats: {
      customizers: {
        jwt: (ctx, token, jwt) => {
          if (token.clientId === 'early') jwt.payload.nbf = jwt.payload.iat + 3600;
        },
      },
    },
    ttl: { AccessToken: 600, AuthorizationCode: 60, Interaction: 600, Session: 600, Grant: 600 },
    // Loopback HTTP is fine for a test issuer.
    cookies: { keys: ['flagstream-test-cookie-key'] },
  };
}

const server = createServer();
server.listen(Number(args.port ?? 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  let keys = loadKeys();
  let provider = new Provider(issuer, configuration(keys));
  let handle = provider.callback();

  async function readForm(req) {
    let body = '';
    for await (const chunk of req) body += chunk;
    return new URLSearchParams(body);
  }

  async function interaction(req, res) {
    const details = await provider.interactionDetails(req, res);
    if (req.method === 'GET') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ uid: details.uid, prompt: details.prompt.name }));
      return;
    }
    const form = await readForm(req);
    if (details.prompt.name === 'login') {
      const account = form.get('login');
      if (!ACCOUNTS[account]) {
        res.statusCode = 400;
        res.end('unknown account');
        return;
      }
      await provider.interactionFinished(req, res, { login: { accountId: account } });
      return;
    }
    const grant = new provider.Grant({
      accountId: details.session.accountId,
      clientId: details.params.client_id,
    });
    grant.addOIDCScope('openid');
    grant.addResourceScope(details.params.resource ?? RESOURCE, 'flagstream');
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } });
  }

  server.on('request', async (req, res) => {
    try {
      if (req.url.startsWith('/interaction/')) {
        await interaction(req, res);
      } else if (req.url === '/admin/rotate' && req.method === 'POST') {
        keys = [newKey(), ...keys];
        writeFileSync(keysFile, JSON.stringify(keys));
        provider = new Provider(issuer, configuration(keys));
        handle = provider.callback();
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ kid: keys[0].kid }));
      } else {
        handle(req, res);
      }
    } catch (err) {
      res.statusCode = 500;
      res.end(String(err));
    }
  });
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});
