// Every client-facing feature of tests/support/py_feature_server.py, driven by an official TypeScript client.
//
// Usage: node ts_feature_client.mjs CLIENTS_DIR URL TOKEN MODE
//   CLIENTS_DIR: bridge_env::ts_clients(); TOKEN "-": none; MODE one of
//   2026-07-28  `@modelcontextprotocol/client` 2.x pinned to 2026-07-28
//   legacy      `@modelcontextprotocol/client` 2.x in its handshake mode (its only pin is a modern revision)
//   sdk1        `@modelcontextprotocol/sdk` 1.x (handshake only)
// Prints one JSON object shaped like py_feature_client.py's, so the Rust test can compare the two servers.
import { createRequire } from 'node:module';

const [clientsDir, url, token, mode] = process.argv.slice(2);
const require = createRequire(`${clientsDir}/`);
const modern = mode === '2026-07-28';

const headers = token === '-' ? {} : { Authorization: `Bearer ${token}` };
const capabilities = { sampling: {}, elicitation: {}, roots: {} };
const handlers = {
    sampling: async () => ({ role: 'assistant', model: 'test-model', content: { type: 'text', text: 'forty-two' } }),
    elicit: async () => ({ action: 'accept', content: { name: 'Ada' } }),
    roots: async () => ({ roots: [{ uri: 'file:///work/project' }] }),
};
const logs = [];
const onLog = n => logs.push(`${n.params.level}:${n.params.data}`);
let changed;
const listChanged = new Promise(resolve => (changed = resolve));
const onChanged = () => changed('ToolsListChanged');

let client, transport, LOG_LEVEL_META_KEY;
if (mode === 'sdk1') {
    // 1.x registers handlers by schema, not by method name.
    const { Client } = require('@modelcontextprotocol/sdk/client/index.js');
    const { StreamableHTTPClientTransport } = require('@modelcontextprotocol/sdk/client/streamableHttp.js');
    const types = require('@modelcontextprotocol/sdk/types.js');
    transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
    client = new Client({ name: 'ts-feature-client', version: '1' }, { capabilities });
    client.setRequestHandler(types.CreateMessageRequestSchema, handlers.sampling);
    client.setRequestHandler(types.ElicitRequestSchema, handlers.elicit);
    client.setRequestHandler(types.ListRootsRequestSchema, handlers.roots);
    client.setNotificationHandler(types.LoggingMessageNotificationSchema, onLog);
    client.setNotificationHandler(types.ToolListChangedNotificationSchema, onChanged);
} else {
    const v2 = require('@modelcontextprotocol/client');
    LOG_LEVEL_META_KEY = v2.LOG_LEVEL_META_KEY;
    transport = new v2.StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
    client = new v2.Client(
        { name: 'ts-feature-client', version: '1' },
        { capabilities, versionNegotiation: { mode: modern ? { pin: '2026-07-28' } : 'legacy' } },
    );
    client.setRequestHandler('sampling/createMessage', handlers.sampling);
    client.setRequestHandler('elicitation/create', handlers.elicit);
    client.setRequestHandler('roots/list', handlers.roots);
    client.setNotificationHandler('notifications/message', onLog);
    client.setNotificationHandler('notifications/tools/list_changed', onChanged);
}

const text = result => result.content[0].text;
// 1.x takes a result schema before the options; 2.x takes the options second.
const call = (params, options) =>
    mode === 'sdk1' ? client.callTool(params, undefined, options) : client.callTool(params, options);
const out = {};
await client.connect(transport);
out.protocol_version = client.getNegotiatedProtocolVersion?.() ?? transport.protocolVersion ?? null;
await client.listTools();
out.sample = text(await client.callTool({ name: 'sample', arguments: { question: 'meaning?' } }));
out.greet = text(await client.callTool({ name: 'greet', arguments: {} }));
out.roots = text(await client.callTool({ name: 'roots', arguments: {} }));
const progress = [];
out.slow = text(
    await call({ name: 'slow', arguments: { steps: 3 } }, { onprogress: p => progress.push(p.progress) }),
);
out.progress = progress;
if (modern) {
    // 2026-07-28 has no logging/setLevel: a request opts in to logs through its own `_meta`.
    out.chatty = text(await client.callTool({ name: 'chatty', arguments: {}, _meta: { [LOG_LEVEL_META_KEY]: 'info' } }));
} else {
    // Only where the server declares logging (the feature server does not, and sends every level).
    if (client.getServerCapabilities()?.logging) await client.setLoggingLevel('info');
    out.chatty = text(await client.callTool({ name: 'chatty', arguments: {} }));
}
// The logs may trail the result (on the GET stream in the handshake era): wait for the last one, the warning,
// which every era and level filter lets through; bounded, so a lost log fails the comparison.
for (let i = 0; i < 200 && !logs.some(l => l.endsWith(':warning line')); i++) {
    await new Promise(r => setTimeout(r, 50));
}
out.logs = [...logs];
out.routed = text(await client.callTool({ name: 'routed', arguments: { region: 'ams' } }));
try {
    await call({ name: 'hang', arguments: {} }, { signal: AbortSignal.timeout(500) });
    out.cancelled = false;
} catch {
    out.cancelled = true;
}
out.after_cancel = text(await client.callTool({ name: 'slow', arguments: { steps: 1 } }));
// Handshake era: list_changed arrives on the session's GET stream; 2026-07-28: on a subscriptions/listen stream.
const subscription = modern ? await client.listen({ toolsListChanged: true }) : null;
out.add_tool = text(await client.callTool({ name: 'add_tool', arguments: {} }));
out.list_changed = await Promise.race([listChanged, new Promise(r => setTimeout(() => r('timeout'), 10000))]);
await subscription?.close?.();
out.tools_after = (await client.listTools({}, { cacheMode: 'refresh' })).tools.some(t => t.name === 'added');
console.log(JSON.stringify(out));
await client.close();
process.exit(0);
