"""The pools' management tokens: derived from one key, never read back (issue 20).

The operator holds one key (``--token-key-file``, env ``PADDLER_TOKEN_KEY_FILE``; the chart
mounts a Secret it generates once). A pool's token is HMAC-SHA256(key,
``<namespace>/<pool>/<uid>``): the operator computes it whenever it calls the balancer, so it
needs no permission to read Secrets. It only *creates* the Secret that carries the token to
the pool's pods (RBAC verb ``create``, which tells nothing about any other Secret); a 409
AlreadyExists means it is there. The Secret's name comes from the same key and the pool's
uid: a pool deleted and created again, or a changed key, gets a Secret of another name (its
pods roll over to it), never a predecessor's token under a name the operator cannot check.

A pool that names its own Secret (``managementAuth.secretName``) is the one case read:
that name only (docs/kubernetes.md says how to grant it).

Steady passes write nothing: the Secrets created (or found) are remembered per process and
created again only after :data:`ENSURE_AGAIN_S` (a Secret deleted by hand comes back; the
create of one that is there is answered 409) or when the pool's balancer answers 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from paddler_operator import plan
from paddler_operator.balancer_client import BalancerClient
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.kube import KubeApi, KubeError
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import Owner
from paddler_operator.resource_reads import owner_of

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 32
"""A shorter key is refused at start-up: every pool's token is only as strong as the key."""
ENSURE_AGAIN_S = 600.0
"""Seconds a created (or found) Secret is trusted to still be there before it is created again."""
SECRET_NAME_DIGEST_CHARS = 10


class TokenKeyError(Exception):
    """The key file is missing, unreadable or too short."""


# --- the key -----------------------------------------------------------------------------


def local_key_path(env: Mapping[str, str] | None = None) -> Path:
    """Where an operator run outside a cluster keeps its key when none is named:
    ``$XDG_STATE_HOME/paddler/operator-token-key`` (``~/.local/state`` without it). Every local
    run (tests start several) shares it, so the tokens survive a restart of the operator."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state) / "paddler" / "operator-token-key"


def create_local_key(path: Path) -> bool:
    """Make a random key at ``path`` (mode 0600) unless one is there; True if this call made it.
    Written aside and linked into place, so a concurrent reader sees a whole key or none, and of
    two processes making it at once, one key wins."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(48) + "\n")
    try:
        os.link(aside, path)
    except FileExistsError:
        return False
    finally:
        aside.unlink()
    return True


def load_key(path: str | Path) -> bytes:
    """The key in ``path`` (surrounding whitespace dropped: a mounted Secret may end in a newline)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as err:
        raise TokenKeyError(f"token key file {path}: {err.strerror or err}") from err
    if len(key) < MIN_KEY_BYTES:
        raise TokenKeyError(f"token key file {path}: {len(key)} bytes, at least {MIN_KEY_BYTES} needed")
    return key


def key_of(path: str | None) -> bytes:
    """The key of the settings' ``token_key_file``; None (a Reconciler built in a test): a key made
    up for this process only, so its pools' tokens change when it restarts."""
    if path is None:
        log.info("no token key file: a key for this process only")
        return secrets.token_bytes(MIN_KEY_BYTES)
    return load_key(path)


# --- derivation ----------------------------------------------------------------------------


def derive_token(key: bytes, namespace: str, pool: str, uid: str) -> str:
    """The pool's management token: HMAC-SHA256 of ``<namespace>/<pool>/<uid>``, URL-safe base64."""
    digest = hmac.new(key, f"{namespace}/{pool}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def secret_name(key: bytes, namespace: str, pool: str, uid: str) -> str:
    """The name of the pool's generated token Secret: ``<pool>-management-<digest>``, the digest of
    the key and the pool's uid (another message than the token's: a name is no secret)."""
    message = f"secret-name:{namespace}/{pool}/{uid}".encode()
    digest = hmac.new(key, message, hashlib.sha256).hexdigest()
    return f"{pool}-management-{digest[:SECRET_NAME_DIGEST_CHARS]}"


class TokenSource(Enum):
    OFF = "off"
    """``managementAuth.enabled: false``: the management port is open, nothing is sent."""
    GENERATED = "generated"
    """The operator's: derived from the key, its Secret created by the operator."""
    NAMED = "named"
    """The pool's own Secret (``managementAuth.secretName``): read by that name."""


@dataclass(frozen=True)
class PoolToken:
    """Where a pool's management token comes from and, for a generated one, the token."""

    source: TokenSource
    namespace: str
    secret: str | None
    """The Secret's name; None when the token is off."""
    key: str
    """The key inside the Secret."""
    value: str | None = field(default=None, repr=False)
    """The derived token (GENERATED only)."""

    @property
    def secret_ref(self) -> ObjRef | None:
        return ObjRef("v1", "Secret", self.namespace, self.secret) if self.secret is not None else None


def pool_token(key: bytes, pool: Owner, spec: LlmPoolSpec) -> PoolToken:
    auth = spec.balancer.management_auth
    if not auth.enabled:
        return PoolToken(TokenSource.OFF, pool.namespace, None, auth.secret_key)
    if auth.secret_name is not None:
        return PoolToken(TokenSource.NAMED, pool.namespace, auth.secret_name, auth.secret_key)
    return PoolToken(
        TokenSource.GENERATED,
        pool.namespace,
        secret_name(key, pool.namespace, pool.name, pool.uid),
        auth.secret_key,
        derive_token(key, pool.namespace, pool.name, pool.uid),
    )


# --- the operator's side ----------------------------------------------------------------------


class ManagementTokens:
    """Each pool's token: its Secret created once, the token handed to the balancer client."""

    def __init__(self, kube: KubeApi, balancers: BalancerClient, key: bytes, clock: Callable[[], float]) -> None:
        self.kube = kube
        self.balancers = balancers
        self._key = key
        self._clock = clock
        self._ensured: dict[ObjRef, float] = {}
        """Generated Secrets this process created or found, and when."""
        self._secret_at: dict[str, ObjRef] = {}
        """Balancer URL -> the generated Secret whose token was sent there (forgotten on a 401)."""

    def of(self, pool: Owner, spec: LlmPoolSpec) -> tuple[LlmPoolSpec, PoolToken]:
        """The pool's token, and its spec as its pods see it (the generated Secret named in it)."""
        token = pool_token(self._key, pool, spec)
        generated = token.secret if token.source == TokenSource.GENERATED else None
        return plan.with_token_secret(spec, generated), token

    async def ensure(self, pool_obj: Obj, token: PoolToken) -> str | None:
        """Create the pool's generated Secret unless this process did (or found it) lately;
        returns an error message."""
        ref = token.secret_ref
        if token.source != TokenSource.GENERATED or ref is None or token.value is None:
            return None
        made = self._ensured.get(ref)
        if made is not None and self._clock() - made < ENSURE_AGAIN_S:
            return None
        want = plan.management_secret(owner_of(pool_obj), ref.name, token.key, token.value)
        try:
            await self.kube.create(want)
        except KubeError as err:
            if err.status != 409:
                return f"Secret {ref.name}: {err.message}"
        else:
            log.info("created object=%s owner=%s", ref, pool_obj["metadata"]["name"])
            await self.kube.event(pool_obj, "Normal", "Created", f"Created Secret {ref.name}")
        self._ensured[ref] = self._clock()
        return None

    async def use(self, url: str, token: PoolToken) -> str | None:
        """Send the pool's token to its balancers from now on; returns an error message."""
        ref = token.secret_ref
        if token.source == TokenSource.OFF or ref is None:
            self.balancers.use_token(url, None)
            return None
        if token.source == TokenSource.GENERATED:
            self._secret_at[url] = ref
            self.balancers.use_token(url, token.value)
            return None
        try:
            secret = await self.kube.get(ref)
        except KubeError as err:
            hint = " (grant the operator get on this Secret: docs/kubernetes.md)" if err.status == 403 else ""
            return f"Secret {ref.name}: {err.message}{hint}"
        if secret is None:
            return f"Secret {ref.name} with the management token does not exist"
        try:
            value = base64.b64decode((secret.get("data") or {})[token.key]).decode()
        except (KeyError, ValueError):
            return f"Secret {ref.name} has no key {token.key!r} with the management token"
        self.balancers.use_token(url, value)
        return None

    def rejected(self, url: str) -> None:
        """The balancer at ``url`` answered 401: its Secret is created again on the next pass
        (it may have been deleted and written by someone else meanwhile)."""
        ref = self._secret_at.get(url)
        if ref is not None and self._ensured.pop(ref, None) is not None:
            log.info("management token refused url=%s: Secret %s is created again", url, ref.name)
