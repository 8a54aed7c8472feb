"""The stoQ v2-compatible framework inside stoqd; ``import stoq`` re-exports it."""

from .core import Stoq
from .data import (
    ArchiverResponse,
    DecoratorResponse,
    DispatcherResponse,
    ExtractedPayload,
    Payload,
    PayloadMeta,
    PayloadResults,
    RequestMeta,
    StoqResponse,
    WorkerResponse,
)
from .exceptions import StoqException, StoqPluginException, StoqPluginNotFound

__all__ = [
    "ArchiverResponse",
    "DecoratorResponse",
    "DispatcherResponse",
    "ExtractedPayload",
    "Payload",
    "PayloadMeta",
    "PayloadResults",
    "RequestMeta",
    "Stoq",
    "StoqException",
    "StoqPluginException",
    "StoqPluginNotFound",
    "StoqResponse",
    "WorkerResponse",
]
