"""Who may claim a user id: the hello's key checked against
``rm:users:<uid>:key`` (modes required and optional), or a JWT whose ``sub``
is the id (mode jwt), or nobody checks (mode off, for development)."""

from __future__ import annotations

import hmac

from twisted.internet import defer
from twisted.logger import Logger

from .frames import Close, Hello, ProtocolError
from .settings import AuthMode, Settings

log = Logger()

#: What a key is compared with when no key is stored, so that an unknown id
#: takes as long to refuse as a known one with a wrong key.
_NO_KEY = b"\0" * 32


class Authenticator:
    def __init__(self, settings: Settings, tokens) -> None:
        """``tokens.token(uid)`` fires with the stored key (or ``None``)."""
        mode, secret = settings.auth, settings.jwt_secret
        if mode is AuthMode.JWT and not secret:
            raise ValueError("--auth jwt needs --jwt-secret")
        if mode is AuthMode.JWT and len(secret.encode()) < 32:
            log.warn("--jwt-secret is shorter than 32 bytes: easy to guess (RFC 7518 3.2)")
        self.mode = mode
        self._tokens = tokens
        self._jwt_secret = secret
        self._jwt_audience = settings.jwt_audience
        self._jwt_issuer = settings.jwt_issuer
        self._jwt_max_age = settings.jwt_max_age

    def check(self, hello: Hello) -> defer.Deferred:
        """Fires when the hello may have its id; fails with a 4001 refusal,
        or with ``RedisUnavailable`` when the key cannot be checked now."""
        if self.mode is AuthMode.OFF:
            return defer.succeed(None)
        if self.mode is AuthMode.JWT:
            return defer.maybeDeferred(self._check_jwt, hello)
        return self._tokens.token(hello.id).addCallback(self._check_stored, hello)

    def _check_stored(self, stored: bytes | None, hello: Hello) -> None:
        """The answer depends only on what the client sent, never on whether
        the id exists (with ``--auth optional``, that an id without a key is
        let in says so anyway); the log tells the operator which it was."""
        presented = None if hello.key is None else hello.key.encode("utf-8", "surrogatepass")
        if stored is None and self.mode is AuthMode.OPTIONAL:
            return
        # Its time depends on the length of its second argument only: ours to send.
        matches = hmac.compare_digest(_NO_KEY if stored is None else stored,
                                      b"" if presented is None else presented)
        if stored is not None and presented is not None and matches:
            return
        detail = ("no key is stored for this id" if stored is None
                  else "the key does not match" if presented is not None
                  else "the hello has no key")
        raise unauthorized("wrong key" if presented is not None else "this user needs a key",
                           detail)

    def _check_jwt(self, hello: Hello) -> None:
        import jwt

        if hello.key is None:
            raise unauthorized("this server needs a JWT as the key")
        required = ["sub", "exp"]
        if self._jwt_max_age:
            required.append("iat")
        try:
            claims = jwt.decode(hello.key, self._jwt_secret,
                                algorithms=["HS256", "HS384", "HS512"],
                                audience=self._jwt_audience, issuer=self._jwt_issuer,
                                # Without --jwt-audience, a token's aud is not ours to judge.
                                options={"require": required,
                                         "verify_aud": self._jwt_audience is not None})
        except jwt.ExpiredSignatureError:
            raise unauthorized("the JWT has expired") from None
        except jwt.InvalidTokenError as e:
            raise unauthorized(f"invalid JWT: {e}") from None
        if claims["sub"] != hello.id:
            raise unauthorized("the JWT's sub is not this id")
        if self._jwt_max_age and int(claims["exp"]) - int(claims["iat"]) > self._jwt_max_age:
            raise unauthorized(f"the JWT is valid for longer than {self._jwt_max_age:g} s "
                               "(exp - iat)")


def unauthorized(reason: str, detail: str | None = None) -> ProtocolError:
    return ProtocolError(Close.UNAUTHORIZED, "unauthorized", reason, detail)
