"""What every HTTP request passes before a route sees it: the Host header, authentication, cross-site checks
and the body's size, depth and text, enforced on the bytes as they arrive (pure ASGI middlewares).

Threat model (see the README's "Exposing the server"): a server on loopback must not be reachable from web pages
the user visits (DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 sends Host:
evil.example; cross-site "simple" requests: a form or a text/plain fetch reaches any origin without a CORS
preflight), and no request, however shaped, may exhaust memory or reach a route unchecked.
- HostCheck refuses a Host header outside the allowlist (421), before anything else runs.
- Guard then, for each request: HTTP Basic auth when configured (CORS preflights are answered outside it, by
  Starlette's CORSMiddleware); for state-changing methods, a browser's cross-site request is refused (403) unless
  its Origin is allowed, and a body must be application/json (415); the body is read here, counting bytes, so a
  chunked or streamed body over the limit is refused with 413 exactly like one whose Content-Length says so; JSON
  nested deeper than max_json_depth (Python's parser would recurse until it crashes) and text holding lone UTF-16
  surrogates ("\\ud800": valid JSON, but not Unicode, and poison for SQLite and every encoder later) are a 422.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY = 32 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 64  # A1111's deepest bodies (alwayson_scripts -> controlnet -> args -> unit) are ~6
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
JSON_TYPES = ("application/json",)

_JSON_TOKENS = re.compile(rb'["\\\[\]{}]')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def loopback_host(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def default_allowed_hosts(bind: str, extra: Iterable[str] = ()) -> list[str] | None:
    """The Host names a server bound to `bind` answers: loopback names on loopback, the bound address
    elsewhere, plus `extra` (--allowed-host). None (any Host) for a wildcard bind with no --allowed-host."""
    extra = [name.lower() for name in extra]
    if loopback_host(bind):
        return list(dict.fromkeys([*LOOPBACK_HOSTS, bind.lower(), *extra]))  # 127.0.0.2 answers its own name
    if bind in ("0.0.0.0", "::", ""):
        return extra or None
    return [bind.lower(), *extra]


def _host_name(header: str) -> str:
    """'Example.com:7860' -> 'example.com'; '[::1]:7860' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit`, scanning only brackets, quotes and
    backslashes (base64 images hold none of them, so megabytes scan in milliseconds)."""
    depth, in_string, skip_to = 0, False, -1
    for match in _JSON_TOKENS.finditer(body):
        position = match.start()
        if position < skip_to:
            continue
        token = body[position]
        if in_string:
            if token == 0x5C:  # a backslash escapes the next character
                skip_to = position + 2
            elif token == 0x22:
                in_string = False
        elif token == 0x22:
            in_string = True
        elif token in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif token in (0x5D, 0x7D):
            depth -= 1
    return False


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def json_text_problem(body: bytes) -> str | None:
    """Why a JSON body's text is unacceptable (invalid UTF-8, lone surrogates), or None."""
    if b"\x00" in body:  # JSON text never holds a raw NUL; UTF-16/32 JSON does, and would slip past the checks
        return "the request body holds NUL bytes; allowed: JSON text in UTF-8"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the request body is not valid UTF-8 (byte {error.start})"
    if _SURROGATE_ESCAPE.search(body):  # rare: parse to tell a lone surrogate from a proper pair
        try:
            if _has_lone_surrogate(json.loads(body)):
                return "the request body holds a lone UTF-16 surrogate escape (such as \\ud800): text must be " \
                       "valid Unicode"
        except ValueError:
            return None  # not JSON at all: the route's own parser says so
    return None


def _basic_auth_ok(header: str | None, credentials: tuple[str, str]) -> bool:
    """Whether an Authorization header carries these HTTP Basic credentials (constant-time comparison)."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, credentials[0]) & secrets.compare_digest(password, credentials[1])


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}


async def _answer(send: Send, scope: Scope, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error: {"detail": ...} on Dapple's routes, A1111's error shape on /sdapi."""
    if scope.get("path", "").startswith("/sdapi/"):
        body = {"error": "HTTPException", "detail": detail, "body": "", "errors": detail}
    else:
        body = {"detail": detail}
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class HostCheck:
    """Refuse requests whose Host header is not an allowed name (421 Misdirected Request)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {name.lower() for name in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = _host_name(_headers(scope).get("host", ""))
            if host not in self.allowed:
                allowed = ", ".join(sorted(self.allowed))
                await _answer(send, scope, 421, f"Host {host!r} is not served here; allowed: {allowed} (add names "
                                                "with --allowed-host)")
                return
        await self.app(scope, receive, send)


class Guard:
    """Authentication, cross-site checks and body limits (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_body: int = DEFAULT_MAX_BODY,
                 max_json_depth: int = DEFAULT_MAX_JSON_DEPTH, auth: tuple[str, str] | None = None,
                 allowed_origins: Iterable[str] = ()) -> None:
        self.app, self.max_body, self.max_json_depth, self.auth = app, max_body, max_json_depth, auth
        self.allowed_origins = {origin.rstrip("/").lower() for origin in allowed_origins}

    def _cross_site_refusal(self, scope: Scope, headers: dict[str, str]) -> str | None:
        origin = headers.get("origin", "").rstrip("/").lower()
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '').lower()}"
        if origin and origin != "null" and (origin == own or origin in self.allowed_origins):
            return None
        fetch_site = headers.get("sec-fetch-site", "")
        if origin or fetch_site not in ("", "same-origin", "none"):
            shown = origin or f"a {fetch_site} page"
            return (f"cross-site request from {shown} refused; allowed origins: "
                    f"{', '.join(sorted(self.allowed_origins)) or 'none (add them with --cors-origin)'}")
        return None  # no Origin, no Sec-Fetch-Site: not a browser's cross-site request (curl, API clients)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.auth is not None and not _basic_auth_ok(headers.get("authorization"), self.auth):
            await _answer(send, scope, 401, "authentication required", {"WWW-Authenticate": 'Basic realm="dapple"'})
            return
        if scope["method"] not in STATE_CHANGING:
            await self.app(scope, receive, send)
            return
        refusal = self._cross_site_refusal(scope, headers)
        if refusal:
            await _answer(send, scope, 403, refusal)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _answer(send, scope, 413, f"request body of {length} bytes is too large; allowed: at most "
                                            f"{self.max_body}")
            return
        chunks, size, more = [], 0, True
        while more:  # read it all here, counting: chunked bodies carry no Content-Length to trust
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:  # the rest is never read: close the connection rather than reuse it
                await _answer(send, scope, 413, f"request body over {self.max_body} bytes; allowed: at most "
                                                f"{self.max_body}", {"Connection": "close"})
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and content_type not in JSON_TYPES:
            await _answer(send, scope, 415, f"content type {content_type or 'none'!r} is not accepted; allowed: "
                                            "application/json")
            return
        if body:
            problem = json_text_problem(body)  # first: the depth scanner reads UTF-8 bytes
            if problem is None and json_too_deep(body, self.max_json_depth):
                problem = (f"the request body nests deeper than {self.max_json_depth} levels; allowed: at most "
                           f"{self.max_json_depth}")
            if problem:
                await _answer(send, scope, 422, problem)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
