"""The API keys a server accepts: Kyutai's header / query spelling and OpenAI's Bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web

DEFAULT_KEYS = ("public_token",)  # what Kyutai's configs and clients use
KYUTAI_HEADER = "kyutai-api-key"
KYUTAI_QUERY = "auth_id"
BEARER_PREFIX = "bearer "


class ApiKeys:
    """The keys accepted; `only_default` is True when none was configured (--api-key)."""

    def __init__(self, keys: Sequence[str] = DEFAULT_KEYS) -> None:
        keys = tuple(keys) or DEFAULT_KEYS
        if any(not isinstance(key, str) or not key for key in keys):
            raise ValueError("an API key must be a non-empty string")
        self.keys = keys
        self.only_default = keys == DEFAULT_KEYS

    def accepts(self, key: str | None) -> bool:
        """Constant-time comparison against every key (no early exit on the first match)."""
        if not key:
            return False
        given = key.encode()
        matches = [hmac.compare_digest(given, known.encode()) for known in self.keys]
        return any(matches)

    def kyutai_ok(self, request: web.Request) -> bool:
        """The key in the `kyutai-api-key` header or the `auth_id` query parameter."""
        return self.accepts(request.headers.get(KYUTAI_HEADER)) or \
            self.accepts(request.query.get(KYUTAI_QUERY))

    def bearer_ok(self, request: web.Request) -> bool:
        """`Authorization: Bearer KEY`, as OpenAI clients send it."""
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith(BEARER_PREFIX):
            return False
        return self.accepts(header[len(BEARER_PREFIX):].strip())
