"""The storage layer's exceptions; backends translate driver errors into these.

StorageError
 ├── StorageUnavailableError   the store cannot be used now (answer 451 4.3.0)
 └── StorageFullError          the disk or database is full (answer 452 4.3.1)
"""


class StorageError(Exception):
    """Base of every error the storage layer raises."""


class StorageUnavailableError(StorageError):
    """The store failed or timed out; the operation did not take effect."""


class StorageFullError(StorageError):
    """There is no room left to store what was asked; nothing was written."""
