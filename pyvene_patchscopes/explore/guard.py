"""What a request must show before the explorer's app sees it: a trusted Host, its own origin, JSON, a small body.

The explorer is a local page with no login, so anyone who can make a browser send it a request must be
refused unless the request comes from the page itself:

- **Host** (DNS rebinding): a page served as ``http://evil.example:PORT`` whose name resolves to 127.0.0.1
  is same-origin with itself, not with us; its requests carry ``Host: evil.example:PORT``. Only the names
  the server was started for (localhost names by default, ``--allow-host`` for more) are answered. This is
  starlette's ``TrustedHostMiddleware`` rule, written here so that the refusal has the library's error shape
  and IPv6 literals (``[::1]:8765``) parse on every Starlette version that ``setup.cfg`` allows.
- **Origin** (CSRF): a browser names the page that made a request in ``Origin``; it must be this server's
  own ``scheme://host:port``, and ``Sec-Fetch-Site: cross-site`` is refused too.
- **Content type**: a POST must say ``application/json``. A page elsewhere can send a "simple" request
  (``text/plain``, a form, ``sendBeacon``, a ``no-cors`` fetch with a Blob body) without asking the server
  first; JSON is not simple, so a cross-origin JSON POST needs a CORS preflight that we never grant. FastAPI
  refuses bodies without this header only from 0.132 on, so the check lives here, for every version.
- **Size**: a body over `MAX_BODY_BYTES` is refused (413) before the app reads any of it.

Every refusal is ``{"error": {"field": ..., "message": ...}}``, as the app's own errors are.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

MAX_BODY_BYTES = 256 * 1024  # a prompt and a target prompt of MAX_PROMPT_CHARS characters each, \u-escaped, fit
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
JSON_TYPE = "application/json"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_body(field: str, message: str) -> dict[str, Any]:
    """The one shape of every 4xx the explorer sends."""
    return {"error": {"field": field, "message": message}}


def split_host(value: str) -> tuple[str, str] | None:
    """``"name:port"``, ``"[v6]:port"`` or a bare name -> (host, port as text, '' when absent); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1 :] and not value[end + 1 :].startswith(":")):
            return None
        host, port = value[1:end], value[end + 2 :]
    else:
        host, _, port = value.partition(":")
        if ":" in port:
            return None
    if not host or (port and not port.isdigit()):
        return None
    return host, port


def normal_host(name: str) -> str:
    """A host name as the Host header carries it, without brackets or case (``[::1]`` -> ``::1``)."""
    return name.strip().lower().removeprefix("[").removesuffix("]")


class Guard:
    """ASGI middleware: refuse foreign hosts, foreign origins, non-JSON posts and oversized bodies."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = LOCAL_HOSTS, max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.allowed = {normal_host(h) for h in allowed_hosts}
        self.any_host = "*" in self.allowed  # tests and reverse proxies that check Host themselves
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.refusal(scope["method"].upper(), headers)
        if refusal is None and scope["method"].upper() in UNSAFE_METHODS:
            body, refusal = await self._read(receive)
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        """(status, error body) for a request that must not reach the app, None for one that may."""
        host = split_host(headers.get("host", ""))
        if host is None or (host[0] not in self.allowed and not self.any_host):
            shown = headers.get("host", "")[:80]
            return 400, error_body(
                "host",
                f"Host {shown!r} is not one this explorer serves (allowed: "
                f"{', '.join(sorted(self.allowed))}; patchscopes explore --allow-host "
                "NAME adds one)",
            )
        origin = headers.get("origin")
        if origin is not None and not self._own_origin(origin, headers["host"]):
            return 403, error_body(
                "origin", f"requests from the page {origin[:80]!r} are refused (allowed: the explorer's own page)"
            )
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return 403, error_body("origin", "cross-site requests are refused (allowed: the explorer's own page)")
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != JSON_TYPE:
                return 415, error_body(
                    "content-type", f"Content-Type {kind or 'missing'!r} is refused (allowed: {JSON_TYPE})"
                )
        length = headers.get("content-length", "0").strip()
        if not length.isdigit():
            return 400, error_body("content-length", "Content-Length is not a number of bytes")
        if int(length) > self.max_body:
            return 413, error_body("request", f"the body has {int(length)} bytes (allowed: at most {self.max_body})")
        return None

    @staticmethod
    def _own_origin(origin: str, host: str) -> bool:
        try:
            parts = urlsplit(origin.strip())
        except ValueError:
            return False
        return (
            parts.scheme in ("http", "https")
            and parts.netloc.lower() == host.strip().lower()
            and not parts.path
            and not parts.query
        )

    async def _read(self, receive: Receive) -> tuple[bytes, tuple[int, dict] | None]:
        """The whole body, refused as soon as it passes the cap (a chunked body has no Content-Length)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, error_body("request", "the client went away before sending its body"))
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", (
                    413,
                    error_body(
                        "request", f"the body has more than {self.max_body} bytes (allowed: at most {self.max_body})"
                    ),
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, original: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then passes on what the client sends next."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


__all__ = ["Guard", "error_body", "split_host", "normal_host", "MAX_BODY_BYTES", "LOCAL_HOSTS"]
