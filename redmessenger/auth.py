"""Who may claim a user id: the hello's key checked against
``rm:users:<uid>:key`` (modes required and optional), or a JWT whose ``sub``
is the id (mode jwt), or nobody checks (mode off, for development)."""

from __future__ import annotations

import hmac

from twisted.internet import defer
from twisted.logger import Logger

from .frames import Close, Hello, ProtocolError
from .settings import AuthMode


class Authenticator:
    def __init__(self, mode: AuthMode, tokens, jwt_secret: str | None = None) -> None:
        """``tokens.token(uid)`` fires with the stored key (or ``None``)."""
        if mode is AuthMode.JWT and not jwt_secret:
            raise ValueError("--auth jwt needs --jwt-secret")
        if mode is AuthMode.JWT and len(jwt_secret.encode()) < 32:
            Logger().warn("--jwt-secret is shorter than 32 bytes: easy to guess (RFC 7518 3.2)")
        self.mode = mode
        self._tokens = tokens
        self._jwt_secret = jwt_secret

    def check(self, hello: Hello) -> defer.Deferred:
        """Fires when the hello may have its id; fails with a 4001 refusal,
        or with ``RedisUnavailable`` when the key cannot be checked now."""
        if self.mode is AuthMode.OFF:
            return defer.succeed(None)
        if self.mode is AuthMode.JWT:
            return defer.maybeDeferred(self._check_jwt, hello)
        return self._tokens.token(hello.id).addCallback(self._check_stored, hello)

    def _check_stored(self, stored: bytes | None, hello: Hello) -> None:
        presented = None if hello.key is None else hello.key.encode("utf-8", "surrogatepass")
        if stored is None:
            if self.mode is AuthMode.OPTIONAL:
                return
            raise unauthorized("unknown user: no key is stored for this id")
        if presented is None:
            raise unauthorized("this user needs a key")
        if not hmac.compare_digest(stored, presented):
            raise unauthorized("wrong key")

    def _check_jwt(self, hello: Hello) -> None:
        import jwt

        if hello.key is None:
            raise unauthorized("this server needs a JWT as the key")
        try:
            claims = jwt.decode(hello.key, self._jwt_secret,
                                algorithms=["HS256", "HS384", "HS512"],
                                options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise unauthorized("the JWT has expired") from None
        except jwt.InvalidTokenError as e:
            raise unauthorized(f"invalid JWT: {e}") from None
        if claims["sub"] != hello.id:
            raise unauthorized("the JWT's sub is not this id")


def unauthorized(reason: str) -> ProtocolError:
    return ProtocolError(Close.UNAUTHORIZED, "unauthorized", reason)
