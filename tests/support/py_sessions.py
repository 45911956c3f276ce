"""Many concurrent handshake-era sessions of the official MCP Python SDK against one URL, in two rounds.

Usage: py_sessions.py URL SESSIONS CALLS
Round 1 opens SESSIONS sessions (mode="legacy") and makes CALLS echo calls in each. Then it prints
{"round": 1, ...} and waits for a line on stdin (the test changes the deployment meanwhile). Round 2 makes
CALLS more calls in each session; a session the server says is gone is re-initialized, as a client must, and its
call retried. The last line is one JSON object with every result; the Rust test asserts on it.
"""
import asyncio
import contextlib
import json
import sys

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


class Session:
    def __init__(self, url: str, n: int):
        self.url, self.n = url, n
        self.stack: contextlib.AsyncExitStack | None = None
        self.client = None
        self.reinitialized = 0

    async def open(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        http = await self.stack.enter_async_context(httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)))
        self.client = await self.stack.enter_async_context(
            Client(streamable_http_client(self.url, http_client=http), mode="legacy")
        )

    async def close(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(Exception):
                await self.stack.aclose()

    async def echo(self, text: str, reinit: bool) -> str:
        try:
            result = await self.client.call_tool("echo", {"text": text})
        except Exception as error:
            # A 404 surfaces as the server's JSON-RPC error ("Session not found") or, without one, as the SDK's
            # "Session terminated".
            gone = any(word in str(error).lower() for word in ("session not found", "terminated"))
            if not reinit or not gone:
                return f"error: {error}"
            self.reinitialized += 1
            await self.close()
            await self.open()
            result = await self.client.call_tool("echo", {"text": text})
        return result.content[0].text


async def round_(sessions: list[Session], calls: int, tag: str, reinit: bool) -> list[str]:
    async def one(s: Session) -> list[str]:
        failures = []
        for i in range(calls):
            text = f"{tag}-{s.n}-{i}"
            try:
                got = await s.echo(text, reinit)
            except Exception as error:
                got = f"error: {error}"
            if got != text:
                failures.append(f"session {s.n} call {i}: {got}")
        return failures

    return [f for fs in await asyncio.gather(*(one(s) for s in sessions)) for f in fs]


async def main(url: str, count: int, calls: int) -> None:
    sessions = [Session(url, n) for n in range(count)]
    await asyncio.gather(*(s.open() for s in sessions))
    versions = sorted({s.client.protocol_version for s in sessions})
    first = await round_(sessions, calls, "r1", reinit=False)
    print(json.dumps({"round": 1, "failures": first, "versions": versions}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    second = await round_(sessions, calls, "r2", reinit=True)
    out = {
        "round": 2,
        "versions": versions,
        "first": first,
        "failures": second,
        "reinitialized": sum(s.reinitialized for s in sessions),
    }
    for s in sessions:
        await s.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
