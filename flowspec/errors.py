"""User-facing errors: each says what is wrong and what to do about it."""

from __future__ import annotations

from typing import Sequence


class FlowSpecError(Exception):
    """Base class of every error that is meant to be shown to a user as one message."""


class UsageError(FlowSpecError):
    """The command line asks for something impossible (a bad flag value or combination); exit 2."""


class ModelError(FlowSpecError):
    """The model could not be found, read or is not supported."""


class ContextOverflowError(FlowSpecError):
    """A request needs more KV-cache slots than the configured maximum context."""


class CausalityError(FlowSpecError):
    """A segment or tree update names nodes in an order the cache cannot honour."""


class TopologyError(FlowSpecError):
    """A topology file is unreadable or invalid; the message names the file, the field and what is allowed."""


class TopologyErrors(TopologyError):
    """Several problems of one topology file: ``messages`` holds them, ``str()`` gives one per line."""

    def __init__(self, problems: Sequence[TopologyError]) -> None:
        self.messages = [str(e) for e in problems]
        super().__init__("\n".join(self.messages))


class RingError(FlowSpecError):
    """The ring cannot serve the request (not formed, or a node died).

    ``partial`` holds what the request had produced before the failure ({"text",
    "token_ids"}), so that a caller can hand it on instead of dropping it."""

    def __init__(self, message: str, partial: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class RequestError(FlowSpecError):
    """The request itself is invalid; ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
