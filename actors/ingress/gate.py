"""The ingress's gate: who may call the HTTP API (API keys) and how much of it runs at once (admission).

`Gate` is an ASGI middleware in front of the whole FastAPI app. When API keys are configured, every path except the
open ones (`/health`, the OpenAPI schema and its browser, and `/metrics*` if made public) needs
`Authorization: Bearer <key>`; anything else gets 401 before routing, so an unauthenticated caller learns nothing,
not even which paths exist. Generation requests (POST /v1/completions, /v1/chat/completions) then pass `Admission`:
at most `max_in_flight` at once overall and `max_concurrent_per_key` per key, counted until the last byte of the
answer is sent (streams included); one more gets 429 with Retry-After at once instead of waiting in a queue.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key with no early exit, so the time
taken says nothing about which key (or how much of one) matched. A key is never logged, stored in plain text here, or
repeated in an answer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from moemesh.actors.ingress.protocol import OpenAIError, too_many_requests, unauthorized

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class ApiKeys:
    """The accepted bearer keys, held only as SHA-256 digests. No keys: every caller is let in (`enabled` False)."""

    def __init__(self, keys: Sequence[str] = ()):
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> int:
        """The index of the key that `authorization` (an `Authorization` header value) carries; raises 401."""
        if authorization is None:
            raise unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                               code="missing_api_key")
        scheme, _, token = authorization.strip().partition(" ")
        presented = _digest(token.strip() if scheme.lower() == "bearer" else "")
        found = -1
        for i, digest in enumerate(self._digests):  # all of them, every time: no early exit
            if hmac.compare_digest(presented, digest) and found < 0:
                found = i
        if found < 0:
            raise unauthorized("Incorrect API key provided.")
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Admission:
    """Counts generation requests in flight, overall and per key; `enter` refuses (429) above the limits."""

    def __init__(self, max_in_flight: int, max_per_key: int, retry_after_s: int):
        self.max_in_flight, self.max_per_key, self.retry_after_s = max_in_flight, max_per_key, retry_after_s
        self.in_flight = 0
        self.per_key: Counter[int] = Counter()

    def enter(self, key: int | None) -> None:
        """Admit one request of `key` (None: no API keys configured) or raise a 429 `OpenAIError`."""
        if self.in_flight >= self.max_in_flight:
            raise too_many_requests(f"the server is at its limit of {self.max_in_flight} requests in flight; "
                                    "retry later", self.retry_after_s, code="server_busy")
        if key is not None and self.per_key[key] >= self.max_per_key:
            raise too_many_requests(f"this API key already has {self.max_per_key} requests in flight, the limit; "
                                    "retry when one finishes", self.retry_after_s)
        self.in_flight += 1
        if key is not None:
            self.per_key[key] += 1

    def leave(self, key: int | None) -> None:
        self.in_flight -= 1
        if key is not None:
            self.per_key[key] -= 1
            if not self.per_key[key]:
                del self.per_key[key]


class Gate:
    """ASGI middleware: authenticate (unless the path is open), then admit generation requests (see the module
    docstring). `reject` turns an `OpenAIError` into the response to send (the ingress's, so it is counted)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, admission: Admission, open_paths: Iterable[str],
                 reject: Callable[[OpenAIError], Response]):
        self.app, self.keys, self.admission, self.reject = app, keys, admission, reject
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _route_path(scope)
        try:
            key = self._authenticate(scope, path)
            admitted = scope["method"] == "POST" and path in GENERATION_PATHS
            if admitted:
                self.admission.enter(key)
        except OpenAIError as e:
            return await self.reject(e)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            if admitted:
                self.admission.leave(key)

    def _authenticate(self, scope: Scope, path: str) -> int | None:
        if not self.keys.enabled or path in self.open_paths:
            return None
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) > 1:
            raise unauthorized("Send exactly one Authorization header.")
        return self.keys.identify(values[0].decode("latin-1") if values else None)


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the mount's root_path, as Starlette's `get_route_path` computes it."""
    path, root = scope["path"], scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path
