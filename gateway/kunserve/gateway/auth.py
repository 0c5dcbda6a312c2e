"""API keys: from a file (one key per line, `#` comments) and/or KUNSERVE_API_KEYS (comma-separated).

Keys are compared in constant time and never logged: only their count is.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

ENV_VAR = "KUNSERVE_API_KEYS"


class ApiKeyError(Exception):
    """The keys file cannot be read."""


def load_api_keys(path: Path | None, environ: dict[str, str] | None = None) -> frozenset[str]:
    keys: set[str] = set()
    env = os.environ if environ is None else environ
    keys.update(k.strip() for k in env.get(ENV_VAR, "").split(",") if k.strip())
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ApiKeyError(f"cannot read the API keys file {path}: {exc.strerror}") from exc
        keys.update(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    return frozenset(keys)


class KeyChecker:
    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> bool:
        """True if auth is off or the `Authorization: Bearer <key>` header carries a known key."""
        if not self._keys:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        return ok
