"""One error hierarchy for edgeaccess.

Each error carries a short, user-facing message (what and why, never a
secret) and is mapped at the edges: to an HTTP status and JSON body by the
Klein apps, to an AMP error code by the tunnel, and to a one-line message
with a non-zero exit status by the command-line clients.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class: ``str(error)`` is safe to show to a user."""

    #: HTTP status used when this error crosses the HTTP API.
    http_status = 500
    #: Stable machine-readable code (JSON ``error.code``, AMP error code).
    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()

    def __str__(self) -> str:
        return self.message


class BadRequest(EdgeError):
    """the request is malformed"""

    http_status = 400
    code = "bad_request"


class BadResource(BadRequest):
    """a resource definition is invalid"""

    code = "bad_resource"


class MethodNotAllowed(BadRequest):
    """this method is not allowed here"""

    http_status = 405
    code = "method_not_allowed"


class PayloadTooLarge(BadRequest):
    """the request body is too large"""

    http_status = 413
    code = "payload_too_large"


class URITooLong(BadRequest):
    """the request line is too long"""

    http_status = 414
    code = "uri_too_long"


class HeadersTooLarge(BadRequest):
    """the request headers are too large"""

    http_status = 431
    code = "headers_too_large"


class AuthenticationFailed(EdgeError):
    """authentication failed"""

    http_status = 401
    code = "authentication_failed"


class AccountLocked(AuthenticationFailed):
    """the account is locked after too many failed logins"""

    http_status = 403
    code = "account_locked"


class IdentityProviderUnreachable(EdgeError):
    """identity provider unreachable"""

    http_status = 503
    code = "identity_provider_unreachable"


class AccessDenied(EdgeError):
    """access denied"""

    http_status = 403
    code = "access_denied"


class NotFound(EdgeError):
    """not found"""

    http_status = 404
    code = "not_found"


class AlreadyExists(EdgeError):
    """already exists"""

    http_status = 409
    code = "already_exists"


class TokenInvalid(AuthenticationFailed):
    """the join token is invalid or unknown"""

    code = "token_invalid"


class TokenExpired(TokenInvalid):
    """the join token has expired"""

    code = "token_expired"


class NodeOffline(EdgeError):
    """the node is offline"""

    http_status = 503
    code = "node_offline"


class ClusterOffline(EdgeError):
    """the cluster is offline"""

    http_status = 503
    code = "cluster_offline"


class CertificateInvalid(AuthenticationFailed):
    """the certificate is not valid"""

    code = "certificate_invalid"


ALL_ERRORS: dict[str, type[EdgeError]] = {}


def _register(cls: type[EdgeError]) -> None:
    ALL_ERRORS[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(EdgeError)


def error_from_code(code: str, message: str) -> EdgeError:
    """Rebuild an error received from a peer (HTTP JSON body, AMP)."""
    return ALL_ERRORS.get(code, EdgeError)(message)
