"""Call a router app in this process (no sockets): `caller(app)("GET", "/plan")`."""

from __future__ import annotations

import asyncio

import httpx


def caller(app, api_key: str | None = "k"):
    """A function (method, path, body=None, key=api_key) -> httpx.Response against `app`."""

    def call(method: str, path: str, body=None, key: str | None = api_key):
        async def go():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
                return await client.request(method, path, json=body, headers=headers)
        return asyncio.run(go())
    return call
