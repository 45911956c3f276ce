"""A slow-starting stdio MCP server for the bridge benchmark: the official Python SDK, whose interpreter start and
imports take a good part of a second, as most Python MCP servers do."""

from mcp.server.fastmcp import FastMCP

mcp = FastMCP("slow-start")


@mcp.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


mcp.run()
