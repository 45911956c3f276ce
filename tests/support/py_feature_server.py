"""One MCP server (official Python SDK) using every client-facing feature, written the 2026-07-28 way.

Usage: py_feature_server.py stdio            (behind the bridge)
       py_feature_server.py http PORT        (the SDK's own Streamable HTTP server: the reference behaviour)
"""
import sys
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, Elicit, ListRoots, MCPServer, Resolve, Sample
from mcp_types import CreateMessageResult, ListRootsResult, SamplingMessage, TextContent
from pydantic import BaseModel, Field

mcp = MCPServer("py-feature-server")


class Name(BaseModel):
    name: str


def ask_llm(question: str) -> Sample:
    return Sample(
        [SamplingMessage(role="user", content=TextContent(type="text", text=question))],
        max_tokens=20,
    )


def ask_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


def ask_roots() -> ListRoots:
    return ListRoots()


@mcp.tool()
async def sample(question: str, answer: Annotated[CreateMessageResult, Resolve(ask_llm)]) -> str:
    return f"llm said: {answer.content.text}"


@mcp.tool()
async def greet(who: Annotated[Name, Resolve(ask_name)]) -> str:
    return f"hello {who.name}"


@mcp.tool()
async def roots(found: Annotated[ListRootsResult, Resolve(ask_roots)]) -> str:
    return ",".join(str(r.uri) for r in found.roots)


@mcp.tool()
async def slow(steps: int, ctx: Context) -> str:
    for step in range(steps):
        await ctx.report_progress(step + 1, steps)
        await anyio.sleep(0.02)
    return f"done after {steps} steps"


@mcp.tool()
async def chatty(ctx: Context) -> str:
    await ctx.debug("debug line")
    await ctx.warning("warning line")
    return "logged"


@mcp.tool()
async def add_tool(ctx: Context) -> str:
    @mcp.tool(name="added")
    def added() -> str:
        return "added"

    # Listen subscribers of this process (the SDK's own HTTP server at 2026-07-28)...
    await ctx.notify_tools_changed()
    # ...and the session's client (a handshake-era session: the bridge, or a legacy client).
    if ctx.protocol_version != "2026-07-28":
        await ctx.session.send_tool_list_changed()
    return "tool added"


@mcp.tool()
async def routed(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
    return f"routed to {region}"


@mcp.tool()
async def hang(ctx: Context) -> str:
    await anyio.sleep(60)
    return "never"


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        mcp.run()
    else:
        mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
