"""Viewer tokens: a browser's access to ONE session without the API key (Studio.CreateViewerToken).

A storefront backend (authenticated with its API key) mints a token for one session of its
tenant; the browser presents it on the Studio's HTTP port (services/studio/http.py). A token is
"fcv_" + 43 URL-safe characters (256 random bits). Redis holds only its SHA-256 digest, on the
session's Redis Cluster slot, so every Studio replica agrees on it and revocation is exact:

    fc:session:{abc}:viewer:<sha256 hex>   string  the grant (JSON: tenant, session, actions,
                                                   expiry), PX = the token's lifetime
    fc:session:{abc}:viewers               set     digests of the session's tokens (revocation),
                                                   expiring with the longest-lived one
    fc:viewer-launch:<sha256 hex>          string  a launch grant: the player page may open a
                                                   session of the dev tenant (`fashionchameleon up`)

`ViewerTokens.check(session_id, token, action)` looks the grant up under the session the
request names (a token minted for another session is simply not there), checks its tenant,
session and expiry, then reads the session record: a session that is gone, belongs to another
tenant or has ended refuses its tokens (and they are deleted). A valid token that does not
allow the action is PERMISSION_DENIED; every other failure is the same UNAUTHENTICATED /
VIEWER_TOKEN_INVALID, so a caller learns nothing about other sessions. Tokens never appear in
errors, logs or reprs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fashionchameleon.v1 import studio_pb2
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.validation import invalid
from shared.config import ViewerConfig
from shared.sessionbus import TERMINAL_STATES, KeySpace

WATCH, SWITCH_GARMENT, UPDATE_PROMPT = "watch", "switch_garment", "update_prompt"
ACTIONS = (WATCH, SWITCH_GARMENT, UPDATE_PROMPT)  # the order tokens list them in
_PROTO_ACTIONS = {
    studio_pb2.VIEWER_ACTION_WATCH: WATCH,
    studio_pb2.VIEWER_ACTION_SWITCH_GARMENT: SWITCH_GARMENT,
    studio_pb2.VIEWER_ACTION_UPDATE_PROMPT: UPDATE_PROMPT,
}
_ACTION_PROTOS = {name: value for value, name in _PROTO_ACTIONS.items()}

TOKEN_PREFIX = "fcv_"
LAUNCH_PREFIX = "fcl_"
_TOKEN = re.compile(r"^fcv_[A-Za-z0-9_-]{43}$")
_LAUNCH = re.compile(r"^fcl_[A-Za-z0-9_-]{43}$")

_MINT_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
# KEYS[1]: the token keys' prefix (same hash tag, so the same slot as KEYS[2]).
_REVOKE_LUA = """
local digests = redis.call('SMEMBERS', KEYS[2])
for _, digest in ipairs(digests) do redis.call('DEL', KEYS[1] .. digest) end
redis.call('DEL', KEYS[2])
return #digests
"""


def token_digest(token: str) -> str:
    """Lowercase hex SHA-256 of the token's bytes: the only form Redis sees."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def player_path(session_id: str, token: str) -> str:
    """Path and query of the player page for one session and viewer token."""
    return "/player?" + urlencode({"session": session_id, "token": token})


def invalid_token() -> Unauthenticated:
    return Unauthenticated(
        "the viewer token is not valid for this session (unknown, expired or revoked)",
        reason="VIEWER_TOKEN_INVALID",
    )


def resolve_ttl(ttl_seconds: float, config: ViewerConfig) -> float:
    """The token lifetime in seconds: 0 = the default; negative, not finite or above the max is
    INVALID_ARGUMENT / FIELD_INVALID (metadata "limit" for the max)."""
    if not math.isfinite(ttl_seconds) or ttl_seconds < 0:
        invalid("ttl_seconds", "must be a finite number of seconds >= 0")
    if ttl_seconds == 0:
        return config.default_ttl_s
    if ttl_seconds > config.max_ttl_s:
        invalid("ttl_seconds", f"at most {config.max_ttl_s:g} seconds", limit=config.max_ttl_s)
    return float(ttl_seconds)


def normalize_actions(actions: Iterable[str]) -> tuple[str, ...]:
    """`actions` plus WATCH, in ACTIONS order, without duplicates; ValueError on an unknown name."""
    wanted = set(actions) | {WATCH}
    unknown = wanted - set(ACTIONS)
    if unknown:
        raise ValueError(f"unknown viewer actions {sorted(unknown)}; expected some of {list(ACTIONS)}")
    return tuple(a for a in ACTIONS if a in wanted)


def actions_from_proto(values: Iterable[int]) -> tuple[str, ...]:
    """CreateViewerTokenRequest.actions as names (WATCH added); UNSPECIFIED or unknown values
    are INVALID_ARGUMENT / FIELD_INVALID."""
    names = []
    for i, value in enumerate(values):
        if value not in _PROTO_ACTIONS:
            invalid(f"actions[{i}]", "must be VIEWER_ACTION_WATCH, _SWITCH_GARMENT or _UPDATE_PROMPT")
        names.append(_PROTO_ACTIONS[value])
    return normalize_actions(names)


def actions_to_proto(actions: Iterable[str]) -> list[int]:
    return [_ACTION_PROTOS[a] for a in actions]


@dataclass(frozen=True)
class ViewerGrant:
    """What a valid token lets its holder do: `actions` on `session_id` of `tenant` until `expires_at`."""

    tenant: str
    session_id: str
    actions: tuple[str, ...]
    expires_at: float  # unix seconds

    def to_json(self) -> str:
        return json.dumps(
            {
                "tenant": self.tenant,
                "session_id": self.session_id,
                "actions": list(self.actions),
                "exp": self.expires_at,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ViewerGrant:
        data = json.loads(raw)
        return cls(data["tenant"], data["session_id"], tuple(data["actions"]), float(data["exp"]))


@dataclass(frozen=True)
class LaunchGrant:
    """A dev launch token: the player may open sessions of `tenant` with these inputs."""

    tenant: str
    reference_key: str  # an uploaded image of the tenant (uploads/<tenant>/...)
    garment_id: str  # a catalog id (the tenant's or the shared catalog)
    prompt: str
    expires_at: float


class ViewerTokens:
    """Mint, check and revoke viewer tokens in Redis. `registry` is the SessionRegistry that
    holds the session records (read on every check)."""

    def __init__(
        self, redis: Any, namespace: str, config: ViewerConfig, registry: Any, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._keys = KeySpace(namespace)
        self._namespace = self._keys.namespace
        self.config = config
        self._registry = registry
        self._clock = clock
        self._mint = redis.register_script(_MINT_LUA)
        self._revoke = redis.register_script(_REVOKE_LUA)

    def __repr__(self) -> str:
        return f"ViewerTokens(namespace={self._namespace!r})"

    # ---- keys ----------------------------------------------------------------------------
    def _prefix(self, session_id: str) -> str:
        return f"{self._keys.session(session_id).record}:viewer:"

    def _set(self, session_id: str) -> str:
        return f"{self._keys.session(session_id).record}:viewers"

    def _launch_key(self, digest: str) -> str:
        return f"{self._namespace}:viewer-launch:{digest}"

    # ---- session tokens ------------------------------------------------------------------
    async def mint(self, tenant: str, session_id: str, actions: Iterable[str], ttl_s: float) -> tuple[str, ViewerGrant]:
        """A new token for `session_id` (the caller checked that `tenant` owns it and it is
        open); `ttl_s` is already resolved (`resolve_ttl`)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        grant = ViewerGrant(tenant, session_id, normalize_actions(actions), self._clock() + ttl_s)
        digest = token_digest(token)
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        await self._mint(
            keys=[self._prefix(session_id) + digest, self._set(session_id)], args=[grant.to_json(), ttl_ms, digest]
        )
        return token, grant

    async def check(self, session_id: str, token: str, action: str = WATCH) -> ViewerGrant:
        """The grant of `token` on `session_id` if it allows `action`. Unauthenticated /
        VIEWER_TOKEN_INVALID unless the token was minted for this session, has not expired and
        the session still belongs to the token's tenant and has not ended; PermissionDenied /
        VIEWER_ACTION_DENIED when the token does not allow `action`."""
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise invalid_token()
        try:
            key = self._prefix(session_id) + token_digest(token)
        except ValueError:  # a malformed session id holds no token
            raise invalid_token() from None
        raw = await self._redis.get(key)
        if raw is None:
            raise invalid_token()
        grant = ViewerGrant.from_json(raw)
        if grant.session_id != session_id or grant.expires_at <= self._clock():
            raise invalid_token()
        record = await self._registry.get(session_id)
        if record is None or record.tenant != grant.tenant:
            raise invalid_token()
        if record.state in TERMINAL_STATES:
            await self.revoke_session(session_id)
            raise invalid_token()
        if action not in grant.actions:
            raise PermissionDenied(
                f"this viewer token does not allow {action}", reason="VIEWER_ACTION_DENIED", metadata={"action": action}
            )
        return grant

    async def revoke_session(self, session_id: str) -> int:
        """Delete every token of the session at once; returns how many there were."""
        return int(await self._revoke(keys=[self._prefix(session_id), self._set(session_id)], args=[]))

    # ---- launch tokens (dev) -------------------------------------------------------------
    async def mint_launch(
        self, tenant: str, *, reference_key: str, garment_id: str, prompt: str, ttl_s: float
    ) -> tuple[str, LaunchGrant]:
        """A launch token: POST /v1/player/sessions opens a session of `tenant` with these
        inputs and answers a viewer token for it (only where `ViewerConfig.dev_launch`)."""
        token = LAUNCH_PREFIX + secrets.token_urlsafe(32)
        grant = LaunchGrant(tenant, reference_key, garment_id, prompt, self._clock() + ttl_s)
        value = json.dumps(
            {
                "tenant": tenant,
                "reference_key": reference_key,
                "garment_id": garment_id,
                "prompt": prompt,
                "exp": grant.expires_at,
            }
        )
        await self._redis.set(self._launch_key(token_digest(token)), value, px=max(1, math.ceil(ttl_s * 1000)))
        return token, grant

    async def check_launch(self, token: str) -> LaunchGrant:
        """The launch grant of `token`; Unauthenticated / VIEWER_TOKEN_INVALID otherwise."""
        if not isinstance(token, str) or not _LAUNCH.match(token):
            raise invalid_token()
        raw = await self._redis.get(self._launch_key(token_digest(token)))
        if raw is None:
            raise invalid_token()
        data = json.loads(raw)
        grant = LaunchGrant(
            data["tenant"], data["reference_key"], data["garment_id"], data["prompt"], float(data["exp"])
        )
        if grant.expires_at <= self._clock():
            raise invalid_token()
        return grant

    async def revoke_launch(self, token: str) -> None:
        if isinstance(token, str) and _LAUNCH.match(token):
            await self._redis.delete(self._launch_key(token_digest(token)))
