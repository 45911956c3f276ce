// Many concurrent handshake-era sessions of the official TypeScript SDK 1.x client against one URL, in two rounds
// (the same protocol as py_sessions.py): round 1, print {"round": 1, ...}, wait for a line on stdin, round 2 in
// which a session the server says is gone (404) is re-initialized and its call retried. The last line is JSON.
// Usage: node ts_sessions.mjs URL SESSIONS CALLS  (run from the directory holding node_modules)
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, count, calls] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];

class Session {
  constructor(n) {
    this.n = n;
    this.reinitialized = 0;
  }
  async open() {
    this.client = new Client({ name: "mcpfly-affinity-test", version: "1.0.0" });
    this.transport = new StreamableHTTPClientTransport(new URL(url));
    await this.client.connect(this.transport);
  }
  async close() {
    try {
      await this.client.close();
    } catch {}
  }
  async echo(text, reinit) {
    let result;
    try {
      result = await this.client.callTool({ name: "echo", arguments: { text } });
    } catch (error) {
      // The SDK throws a StreamableHTTPError carrying the status when the session is gone.
      if (!reinit || error?.code !== 404) return `error: ${error}`;
      this.reinitialized += 1;
      await this.close();
      await this.open();
      result = await this.client.callTool({ name: "echo", arguments: { text } });
    }
    return result.content[0].text;
  }
}

async function round(sessions, tag, reinit) {
  const failures = await Promise.all(
    sessions.map(async (s) => {
      const out = [];
      for (let i = 0; i < calls; i++) {
        const text = `${tag}-${s.n}-${i}`;
        let got;
        try {
          got = await s.echo(text, reinit);
        } catch (error) {
          got = `error: ${error}`;
        }
        if (got !== text) out.push(`session ${s.n} call ${i}: ${got}`);
      }
      return out;
    }),
  );
  return failures.flat();
}

const sessions = Array.from({ length: count }, (_, n) => new Session(n));
await Promise.all(sessions.map((s) => s.open()));
const versions = [...new Set(sessions.map((s) => s.transport.protocolVersion))].sort();
const first = await round(sessions, "r1", false);
console.log(JSON.stringify({ round: 1, failures: first, versions }));
const lines = createInterface({ input: process.stdin });
await new Promise((resolve) => lines.once("line", resolve));
lines.close();
const second = await round(sessions, "r2", true);
const reinitialized = sessions.reduce((sum, s) => sum + s.reinitialized, 0);
await Promise.all(sessions.map((s) => s.close()));
console.log(JSON.stringify({ round: 2, versions, first, failures: second, reinitialized }));
process.exit(0);
