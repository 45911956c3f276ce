// What the official TypeScript clients see of a bridge's tools: the listing and the outcome of some calls.
// Usage: node ts_tools.mjs URL TOKEN CLIENT CALLS_JSON   (CLIENT: sdk (@modelcontextprotocol/sdk 1.x, handshake
// era) | client (@modelcontextprotocol/client 2.x, auto: 2026-07-28)). Prints the same JSON as py_tools.py.
import { Client as SdkClient } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport as SdkTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { Client as NewClient, StreamableHTTPClientTransport as NewTransport } from '@modelcontextprotocol/client';

const [url, token, which, callsJson] = process.argv.slice(-4);
const requestInit = { headers: { Authorization: `Bearer ${token}` } };
const info = { name: 'mcpfly-ts-tools', version: '0' };
const [client, transport] =
  which === 'sdk'
    ? [new SdkClient(info), new SdkTransport(new URL(url), { requestInit })]
    : // 2.x defaults to the handshake; `auto` probes server/discover and adopts 2026-07-28.
      [new NewClient(info, { versionNegotiation: { mode: 'auto' } }), new NewTransport(new URL(url), { requestInit })];
await client.connect(transport);
const out = { protocol_version: client.getNegotiatedProtocolVersion?.() ?? transport.protocolVersion ?? null };
const listed = await client.listTools();
out.tools = listed.tools
  .map((t) => ({ name: t.name, description: t.description ?? null }))
  .sort((a, b) => (a.name < b.name ? -1 : 1));
out.calls = [];
for (const [name, args] of JSON.parse(callsJson)) {
  try {
    const result = await client.callTool({ name, arguments: args });
    out.calls.push({ text: result.content.map((c) => c.text ?? '').join(' '), is_error: !!result.isError });
  } catch (e) {
    out.calls.push({ error: String(e.message ?? e) });
  }
}
await client.close();
console.log(JSON.stringify(out));
