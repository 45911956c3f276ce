"""Drive the bridge with the official MCP Python SDK as a real client.

Usage: py_client.py URL TOKEN MODE   (MODE: auto | legacy | 2026-07-28)
Prints one JSON object with what happened; the Rust test asserts on it.
"""
import asyncio
import json
import sys

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, token: str, mode: str) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=60))
    progress: list[float] = []
    logs: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def on_log(params) -> None:  # handshake era only: 2026-07-28 needs an opt-in
        logs.append(str(params.data))

    out: dict = {}
    async with Client(streamable_http_client(url, http_client=http), mode=mode, logging_callback=on_log) as client:
        out["protocol_version"] = client.protocol_version
        info = client.server_info
        out["server_name"] = info.name if info else None
        tools = await client.list_tools()
        out["tools"] = sorted(t.name for t in tools.tools)
        result = await client.call_tool("echo", {"text": "from python"})
        out["echo"] = result.content[0].text
        result = await client.call_tool("add", {"a": 20, "b": 22})
        out["add"] = result.content[0].text
        result = await client.call_tool("slow", {"steps": 3, "delay_ms": 30}, progress_callback=on_progress)
        out["slow"] = result.content[0].text
        out["progress"] = progress
        result = await client.call_tool("announce", {})
        out["announce"] = result.content[0].text
        if client.protocol_version == "2026-07-28":
            # No log opt-in, so none may arrive: a short window for one that should not (a late one can only
            # make this miss the bug, never fail without it).
            await asyncio.sleep(0.3)
        else:
            # The announcement travels on the GET stream and may trail the result: wait for it, bounded, so a
            # lost one fails the test.
            for _ in range(200):
                if logs:
                    break
                await asyncio.sleep(0.05)
        out["logs"] = list(logs)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
