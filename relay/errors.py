"""The relay's exception tree (faults only; refusals are verdicts and replies).

    RelayError
     ├── TemporaryError              try again later (4xx, retry)
     │    ├── UpstreamUnavailableError   cannot connect or the connection broke
     │    ├── UpstreamTimeoutError       the smarthost did not answer in time
     │    └── ShuttingDownError          the relay is draining
     └── PermanentError              will not work however often it is tried
          └── UpstreamRejectedError      the smarthost refused the whole transaction

Storage keeps its own tree in :mod:`storage.errors`, configuration in
:mod:`config.loader`.
"""


class RelayError(Exception):
    """Base of the relay's own faults."""


class TemporaryError(RelayError):
    """A fault that may go away; the operation should be retried."""


class PermanentError(RelayError):
    """A fault that will not go away by retrying."""


class UpstreamUnavailableError(TemporaryError):
    """The smarthost could not be reached or dropped the connection."""


class UpstreamTimeoutError(TemporaryError):
    """The smarthost did not answer within the configured timeout."""


class ShuttingDownError(TemporaryError):
    """The relay is draining and takes no new work."""


class UpstreamRejectedError(PermanentError):
    """The smarthost refused the transaction as a whole (e.g. at MAIL FROM)."""
