// Every client-facing feature of tests/support/py_feature_server.py, driven by the official TypeScript client
// `@modelcontextprotocol/client` 2.x pinned to 2026-07-28.
//
// Usage: node ts_feature_client.mjs CLIENTS_DIR URL TOKEN   (CLIENTS_DIR: bridge_env::ts_clients(); TOKEN "-": none)
// Prints one JSON object shaped like py_feature_client.py's, so the Rust test can compare the two servers.
import { createRequire } from 'node:module';

const [clientsDir, url, token] = process.argv.slice(2);
const require = createRequire(`${clientsDir}/`);
const { Client, LOG_LEVEL_META_KEY, StreamableHTTPClientTransport } = require('@modelcontextprotocol/client');

const headers = token === '-' ? {} : { Authorization: `Bearer ${token}` };
const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client(
    { name: 'ts-feature-client', version: '1' },
    {
        capabilities: { sampling: {}, elicitation: {}, roots: {} },
        versionNegotiation: { mode: { pin: '2026-07-28' } },
    },
);
client.setRequestHandler('sampling/createMessage', async () => ({
    role: 'assistant',
    model: 'test-model',
    content: { type: 'text', text: 'forty-two' },
}));
client.setRequestHandler('elicitation/create', async () => ({ action: 'accept', content: { name: 'Ada' } }));
client.setRequestHandler('roots/list', async () => ({ roots: [{ uri: 'file:///work/project' }] }));
const logs = [];
client.setNotificationHandler('notifications/message', n => logs.push(`${n.params.level}:${n.params.data}`));
let changed;
const listChanged = new Promise(resolve => (changed = resolve));
client.setNotificationHandler('notifications/tools/list_changed', () => changed('ToolsListChanged'));

const text = result => result.content[0].text;
const out = {};
await client.connect(transport);
out.protocol_version = client.getNegotiatedProtocolVersion?.() ?? null;
await client.listTools();
out.sample = text(await client.callTool({ name: 'sample', arguments: { question: 'meaning?' } }));
out.greet = text(await client.callTool({ name: 'greet', arguments: {} }));
out.roots = text(await client.callTool({ name: 'roots', arguments: {} }));
const progress = [];
out.slow = text(
    await client.callTool({ name: 'slow', arguments: { steps: 3 } }, { onprogress: p => progress.push(p.progress) }),
);
out.progress = progress;
// 2026-07-28 has no logging/setLevel: a request opts in to logs through its own `_meta`.
out.chatty = text(await client.callTool({ name: 'chatty', arguments: {}, _meta: { [LOG_LEVEL_META_KEY]: 'info' } }));
await new Promise(r => setTimeout(r, 200));
out.logs = logs;
out.routed = text(await client.callTool({ name: 'routed', arguments: { region: 'ams' } }));
try {
    await client.callTool({ name: 'hang', arguments: {} }, { signal: AbortSignal.timeout(500) });
    out.cancelled = false;
} catch {
    out.cancelled = true;
}
out.after_cancel = text(await client.callTool({ name: 'slow', arguments: { steps: 1 } }));
const subscription = await client.listen({ toolsListChanged: true });
out.add_tool = text(await client.callTool({ name: 'add_tool', arguments: {} }));
out.list_changed = await Promise.race([listChanged, new Promise(r => setTimeout(() => r('timeout'), 10000))]);
await subscription.close?.();
out.tools_after = (await client.listTools({}, { cacheMode: 'refresh' })).tools.some(t => t.name === 'added');
console.log(JSON.stringify(out));
await client.close();
process.exit(0);
