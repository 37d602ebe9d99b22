"""Storage: one interface (``base``), the SQLite backend, address normalisation."""

from storage.addresses import (
    AddressError,
    canonical_address,
    canonical_domain,
    domain_of,
)
from storage.base import (
    AttemptRecord,
    BounceType,
    Event,
    EventKind,
    EventStore,
    NewMessage,
    QueuedMessage,
    QueueStats,
    QueueStore,
    RecipientResult,
    RecipientState,
    Store,
)
from storage.errors import StorageError, StorageFullError, StorageUnavailableError
from storage.sqlite import SqliteStore

__all__ = [
    "AddressError",
    "AttemptRecord",
    "BounceType",
    "Event",
    "EventKind",
    "EventStore",
    "NewMessage",
    "QueueStats",
    "QueueStore",
    "QueuedMessage",
    "RecipientResult",
    "RecipientState",
    "SqliteStore",
    "StorageError",
    "StorageFullError",
    "StorageUnavailableError",
    "Store",
    "canonical_address",
    "canonical_domain",
    "domain_of",
]
