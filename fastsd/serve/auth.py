"""Access control for both APIs: API keys (OpenAI clients send `Authorization: Bearer KEY`)
and users (AUTOMATIC1111's --api-auth user:pass; its clients send HTTP Basic). Either
credential opens every route; /healthz is always open (load balancers poll it), /metrics
too with --metrics-public. Credentials are compared in constant time, every configured one
each time, so neither a key's bytes nor which entry matched shows in the timing; they are
never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastSDError

OPEN_PATHS = ("/healthz",)
ENV_KEY, ENV_AUTH = "FASTSD_API_KEY", "FASTSD_API_AUTH"


@dataclass(frozen=True)
class Auth:
    keys: tuple[str, ...] = ()
    users: tuple[tuple[str, str], ...] = ()
    metrics_public: bool = False

    def __repr__(self) -> str:  # never print the secrets (options are logged and shown in errors)
        return f"Auth({len(self.keys)} key(s), {len(self.users)} user(s), metrics_public={self.metrics_public})"

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.users)

    def protects(self, path: str) -> bool:
        return self.enabled and path not in OPEN_PATHS and not (self.metrics_public and path == "/metrics")

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an Authorization header's value carries a configured key or user."""
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(b" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == b"bearer":
            return _any_equal(value, [k.encode() for k in self.keys])
        if scheme == b"basic":
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            if not sep:
                return False
            found = False
            for u, p in self.users:  # every pair compared, both halves: no early exit
                found |= hmac.compare_digest(user, u.encode()) & hmac.compare_digest(password, p.encode())
            return found
        return False


def _any_equal(value: bytes, candidates: list[bytes]) -> bool:
    found = False
    for c in candidates:
        found |= hmac.compare_digest(value, c)
    return found


def refusal(path: str) -> tuple[int, dict, list[tuple[bytes, bytes]]]:
    """The 401 for a request without valid credentials, in the error shape of the API it asked."""
    if path.startswith("/sdapi/"):
        return 401, {"error": "HTTPException", "detail": "Incorrect username or password", "body": "",
                     "errors": ""}, [(b"www-authenticate", b'Basic realm="fastsd"')]
    return 401, {"error": {"message": "Incorrect API key provided: send 'Authorization: Bearer <key>' (or HTTP "
                                      "Basic with a user of --api-auth)",
                           "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}, [
        (b"www-authenticate", b'Bearer realm="fastsd"')]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def read_auth(keys: list[str], key_files: list[str], users: list[str], user_files: list[str],
              metrics_public: bool = False, environ: dict | None = None) -> Auth:
    """--api-key / --api-key-file / $FASTSD_API_KEY and --api-auth / --api-auth-file /
    $FASTSD_API_AUTH (each: items separated by commas or lines; users as user:pass)."""
    env = os.environ if environ is None else environ
    all_keys = [k for text in keys for k in _split(text)]
    all_users = [u for text in users for u in _split(text)]
    for files, into in ((key_files, all_keys), (user_files, all_users)):
        for f in files:
            try:
                into += _split(Path(f).read_text())
            except OSError as e:
                raise FastSDError(f"cannot read {f}: {e.strerror}") from None
    all_keys += _split(env.get(ENV_KEY, ""))
    all_users += _split(env.get(ENV_AUTH, ""))
    pairs = []
    for item in all_users:
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise FastSDError("--api-auth takes user:password pairs (separated by commas); one has no ':' or an "
                              "empty part")
        pairs.append((user, password))
    for k in all_keys:
        if len(k) < 8 or any(c.isspace() for c in k):
            raise FastSDError("an API key must be at least 8 characters, without spaces")
    return Auth(tuple(dict.fromkeys(all_keys)), tuple(dict.fromkeys(pairs)), metrics_public)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_warning(host: str, auth: Auth) -> str | None:
    """The warning for a server that anyone who reaches it may use (None: loopback or locked)."""
    if auth.enabled or is_loopback(host):
        return None
    return (f"fastsd: warning: serving on {host} without --api-key or --api-auth: anyone who can reach this "
            "address can use it")
