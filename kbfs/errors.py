"""The kbfs exception tree, in one place.

Every failure inside kbfs is raised as one of these; only the two edges translate
them: `fusefs` into an errno, `cli` into one clear line and an exit code. This
module imports nothing of kbfs and does no I/O.

    KbfsError                      base of everything kbfs raises on purpose
    ├── PointerError               a .prv / .prvdir is malformed or unreadable
    ├── VerificationError          bytes, leaves or a whole file fail their hash check
    ├── RangeError                 an HTTP Range cannot be satisfied (-> 416)
    ├── BadRequest                 a request names a malformed sha1, path or header (-> 400)
    ├── NotFound                   no source/share has the content or path (-> 404)
    ├── SourceError                a source failed (network, HTTP status, short body)
    │   ├── SourceUnavailable      no source could be reached within the time bound
    │   └── AccessDenied           a private share wants a token (none sent, or refused)
    ├── CacheError                 the block cache cannot store or read a block
    └── ConfigError                bad command-line value or config file
"""

from __future__ import annotations


class KbfsError(Exception):
    """Base class of every error kbfs raises on purpose."""


class PointerError(KbfsError):
    """A pointer file is malformed; the message names the file and the field."""


class VerificationError(KbfsError):
    """Data does not match the hash that vouches for it."""


class RangeError(KbfsError):
    """A byte range cannot be satisfied for a file of the given size."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class BadRequest(KbfsError):
    """A request is malformed (bad sha1, unsafe path, oversized header...)."""


class NotFound(KbfsError):
    """The requested content or path does not exist at this source."""


class SourceError(KbfsError):
    """A source failed to deliver; another source may still succeed."""


class SourceUnavailable(SourceError):
    """No source could deliver within the time bound."""


class AccessDenied(SourceError):
    """A private share refused the request: no token was sent for it, or the share did
    not accept the one sent (expired, revoked, or made for another share)."""


class CacheError(KbfsError):
    """The block cache could not store or load a block."""


class ConfigError(KbfsError):
    """A command-line value, environment variable or config file is invalid."""
