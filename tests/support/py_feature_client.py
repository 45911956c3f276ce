"""Every client-facing feature of tests/support/py_feature_server.py, driven by the official Python SDK.

Usage: py_feature_client.py URL TOKEN MODE   (MODE: auto | legacy | 2026-07-28; TOKEN "-" for none)
Prints one JSON object with what happened; the Rust test compares the bridge's run with the SDK server's.
"""
import asyncio
import json
import sys

import httpx2
import mcp_types as types
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, token: str, mode: str) -> None:
    headers = {} if token == "-" else {"Authorization": f"Bearer {token}"}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))
    progress: list[float] = []
    logs: list[str] = []

    async def on_sampling(context, params):
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="forty-two"), model="test-model"
        )

    async def on_elicit(context, params):
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def on_roots(context):
        return types.ListRootsResult(roots=[types.Root(uri="file:///work/project")])

    async def on_progress(value, total, message):
        progress.append(value)

    async def on_log(params):
        logs.append(f"{params.level}:{params.data}")

    changed = asyncio.Event()

    async def on_message(message):  # the handshake era's list_changed
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    out: dict = {}
    async with Client(
        streamable_http_client(url, http_client=http),
        mode=mode,
        sampling_callback=on_sampling,
        elicitation_callback=on_elicit,
        list_roots_callback=on_roots,
        logging_callback=on_log,
        log_level="info",
        message_handler=on_message,
    ) as client:
        out["protocol_version"] = client.protocol_version
        await client.list_tools()
        out["sample"] = (await client.call_tool("sample", {"question": "meaning?"})).content[0].text
        out["greet"] = (await client.call_tool("greet", {})).content[0].text
        out["roots"] = (await client.call_tool("roots", {})).content[0].text
        out["slow"] = (await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress)).content[0].text
        out["progress"] = progress
        out["chatty"] = (await client.call_tool("chatty", {})).content[0].text
        # The logs may trail the result (on the GET stream in the handshake era): wait for the last one, the
        # warning, which every era and level filter lets through; bounded, so a lost log fails the comparison.
        for _ in range(200):
            if any(line.endswith(":warning line") for line in logs):
                break
            await asyncio.sleep(0.05)
        out["logs"] = list(logs)
        out["routed"] = (await client.call_tool("routed", {"region": "ams"})).content[0].text
        if client.protocol_version == "2026-07-28":
            async with client.listen(tools_list_changed=True) as sub:
                out["listen_honored"] = bool(sub.honored.tools_list_changed)
                out["add_tool"] = (await client.call_tool("add_tool", {})).content[0].text
                event = await asyncio.wait_for(sub.__anext__(), 10)
                out["list_changed"] = type(event).__name__
        else:
            out["add_tool"] = (await client.call_tool("add_tool", {})).content[0].text
            await asyncio.wait_for(changed.wait(), 10)
            out["list_changed"] = "ToolsListChanged"
        out["tools_after"] = "added" in [t.name for t in (await client.list_tools(cache_mode="refresh")).tools]
        # Cancellation last: a cancelled call keeps the bridge from attributing the server's questions briefly.
        try:
            await asyncio.wait_for(client.call_tool("hang", {}), 0.5)
            out["cancelled"] = False
        except (asyncio.TimeoutError, TimeoutError):
            out["cancelled"] = True
        # Still usable after a cancelled call.
        out["after_cancel"] = (await client.call_tool("slow", {"steps": 1})).content[0].text
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
