"""API-key authentication of the public Studio API.

A key resolves to a tenant. Keys arrive in gRPC metadata, either as studio.proto specifies,
`authorization: Bearer <key>`, or as `x-api-key: <key>`. Only SHA-256 digests of the keys are
kept in memory; lookups compare digests with `hmac.compare_digest` against every entry (no
early exit). Keys never appear in errors, logs or reprs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any

from services.common.errors import Unauthenticated

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
_TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# gRPC metadata values are printable ASCII; a key is one token without spaces.
_KEY = re.compile(r"^[\x21-\x7e]{1,512}$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def validate_tenant(tenant: str) -> str:
    """`tenant` if it matches [a-z0-9][a-z0-9._-]{0,63}, else ValueError."""
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise ValueError(f"tenant must match [a-z0-9][a-z0-9._-]{{0,63}}, got {tenant!r}")
    return tenant


def key_digest(api_key: str) -> bytes:
    """SHA-256 of the key's UTF-8 bytes (what the config may store instead of the key)."""
    return hashlib.sha256(api_key.encode("utf-8")).digest()


class ApiKeyAuth:
    """Resolves API keys to tenants. Built once from config: a mapping api key -> tenant."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        entries = []
        for i, (api_key, tenant) in enumerate(keys.items()):
            if not isinstance(api_key, str) or not _KEY.match(api_key):
                # the key itself is not shown, only its position in the config
                raise ValueError(
                    f"API key #{i} (tenant {tenant!r}) must be 1-512 printable ASCII characters without spaces"
                )
            entries.append((key_digest(api_key), validate_tenant(tenant)))
        self._entries = tuple(entries)

    @classmethod
    def from_digests(cls, digests: Mapping[str, str]) -> ApiKeyAuth:
        """From a mapping lowercase hex SHA-256 of a key -> tenant (config without plaintext keys)."""
        auth = cls({})
        entries = []
        for digest, tenant in digests.items():
            if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
                raise ValueError(f"API key digest for tenant {tenant!r} must be 64 lowercase hex characters")
            entries.append((bytes.fromhex(digest), validate_tenant(tenant)))
        auth._entries = tuple(entries)
        return auth

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ApiKeyAuth({len(self._entries)} keys)"

    def tenant_for_key(self, api_key: str) -> str:
        """The tenant of `api_key`; Unauthenticated if it is unknown."""
        presented = key_digest(api_key)
        tenant = None
        for digest, owner in self._entries:  # every entry is compared: timing does not depend on a match
            if hmac.compare_digest(digest, presented):
                tenant = owner
        if tenant is None:
            raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")
        return tenant

    def tenant_from_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The tenant of the API key in gRPC invocation metadata ((key, value) pairs).

        Reads `authorization: Bearer <key>` and `x-api-key: <key>` (header names
        case-insensitive). Unauthenticated when neither is present, when the value is malformed,
        when the two disagree, or when the key is unknown.
        """
        keys = set()
        for name, value in metadata or ():
            lname = name.lower()
            if lname not in (API_KEY_HEADER, AUTHORIZATION_HEADER):
                continue
            if not isinstance(value, str):
                raise Unauthenticated(f"malformed {lname} metadata: expected text", reason="API_KEY_INVALID")
            if lname == AUTHORIZATION_HEADER:
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated(
                        "malformed authorization metadata: expected 'Bearer <key>'", reason="API_KEY_INVALID"
                    )
                keys.add(token.strip())
            else:
                keys.add(value.strip())
        if not keys or keys == {""}:
            raise Unauthenticated(
                "missing API key: send 'authorization: Bearer <key>' or 'x-api-key' metadata", reason="API_KEY_INVALID"
            )
        if len(keys) > 1:
            raise Unauthenticated(
                "conflicting API keys in authorization and x-api-key metadata", reason="API_KEY_INVALID"
            )
        return self.tenant_for_key(keys.pop())
