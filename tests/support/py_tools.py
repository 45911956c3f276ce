"""What the official MCP Python SDK sees of a bridge's tools: the listing and the outcome of some calls.

Usage: py_tools.py URL TOKEN MODE CALLS_JSON   (MODE: legacy | 2026-07-28; CALLS_JSON: [[name, arguments], ...])
Prints {"protocol_version", "tools": [{name, description}], "calls": [{"text", "is_error"} | {"error"}]}.
"""
import asyncio
import json
import sys

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, token: str, mode: str, calls: list) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=60))
    out: dict = {}
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        out["protocol_version"] = client.protocol_version
        listed = await client.list_tools()
        out["tools"] = sorted(
            ({"name": t.name, "description": t.description} for t in listed.tools), key=lambda t: t["name"]
        )
        results = []
        for name, arguments in calls:
            try:
                result = await client.call_tool(name, arguments)
                results.append({
                    "text": " ".join(getattr(c, "text", "") for c in result.content),
                    "is_error": bool(result.is_error),
                })
            except Exception as e:  # the SDK raises JSON-RPC errors; their text is what a caller sees
                results.append({"error": str(e)})
        out["calls"] = results
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
