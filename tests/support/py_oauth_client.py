"""Drive an OAuth-protected bridge with the official MCP Python SDK's OAuth client, headlessly.

Usage: py_oauth_client.py URL MARKER
The SDK discovers the protected resource metadata and the authorization server, registers a client (DCR),
runs authorization code + PKCE (the "browser" here follows the authorization server's redirects through the
test's login/consent app and stops at the redirect URI), then lists tools and calls `echo` with MARKER and `add`
(which needs an extra scope: the SDK steps up on 403 insufficient_scope, and Hydra refuses a scope the client
was not registered for). Prints one JSON object.
"""
import asyncio
import json
import sys
from urllib.parse import parse_qs, urljoin, urlparse

import httpx2
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the browser stops at it


class MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, client_info):
        self.client = client_info


async def main(url: str, marker: str) -> None:
    out: dict = {"scopes_requested": []}
    browser = httpx2.AsyncClient(timeout=30)  # keeps the authorization server's cookies, like a browser
    landed: asyncio.Queue[AuthorizationCodeResult] = asyncio.Queue()

    async def redirect_handler(authorization_url: str) -> None:
        query = parse_qs(urlparse(authorization_url).query)
        out["scopes_requested"].append(query.get("scope", [""])[0])
        out["resource_requested"] = query.get("resource")
        next_url = authorization_url
        for _ in range(20):
            response = await browser.get(next_url, follow_redirects=False)
            location = response.headers.get("location")
            if location is None:
                raise RuntimeError(f"authorization stopped at {next_url}: HTTP {response.status_code} {response.text}")
            next_url = urljoin(next_url, location)
            if next_url.startswith(REDIRECT_URI):
                query = parse_qs(urlparse(next_url).query)
                if "error" in query:
                    raise RuntimeError(f"authorization refused: {query}")
                await landed.put(
                    AuthorizationCodeResult(code=query["code"][0], state=query.get("state", [None])[0])
                )
                return
        raise RuntimeError("too many redirects")

    async def callback_handler() -> AuthorizationCodeResult:
        return await landed.get()

    storage = MemoryStorage()
    provider = OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="mcpfly oauth test",
            redirect_uris=[REDIRECT_URI],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    http = httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(30, read=60))
    try:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            out["protocol_version"] = client.protocol_version
            tools = await client.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            result = await client.call_tool("echo", {"text": marker})
            out["echo"] = result.content[0].text
            out["registered"] = storage.client is not None and bool(storage.client.client_id)
            out["granted_scope"] = storage.tokens.scope if storage.tokens else None
            # For the Rust side: the token must never have reached the child or the logs.
            out["access_token"] = storage.tokens.access_token if storage.tokens else None
            # `add` needs a scope the client was not registered for: the SDK steps up (a second authorization
            # asking for both scopes), which Hydra refuses for a client registered with the first scope only.
            result = await client.call_tool("add", {"a": 20, "b": 22})
            out["add"] = result.content[0].text
    except BaseException as error:  # noqa: BLE001 - reported to the Rust side, which decides
        out["error"] = repr(error)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
