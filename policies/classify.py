"""Marketing or transactional: the decision every other check depends on.

In order: the mailer's explicit ``X-Relay-Category`` header, else the account's
default category, else list signals (``List-Unsubscribe``, ``List-Id``,
``Precedence: bulk``). Mail with none of these is transactional. The result goes
into the policy context; it is not a verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from policies.base import MessageKind

CATEGORY_HEADER = "X-Relay-Category"

HeaderLookup = Callable[[str], str | None]
"""Returns the (unfolded) value of the first header with that name, or ``None``."""


class CategoryError(ValueError):
    """The explicit category header holds something other than the two categories."""


@dataclass(frozen=True, slots=True)
class Classification:
    """The kind of a message and why."""

    kind: MessageKind
    reason: str
    """``header``, ``account_default``, ``list_unsubscribe``, ``list_id``,
    ``precedence_bulk`` or ``no_signal``: a bounded token for logs."""


def classify(
    header: HeaderLookup, account_default: MessageKind | None
) -> Classification:
    """Decide the kind of a message; raise :class:`CategoryError` on a bad header."""
    explicit = header(CATEGORY_HEADER)
    if explicit is not None:
        value = explicit.strip().lower()
        try:
            return Classification(MessageKind(value), "header")
        except ValueError:
            raise CategoryError(
                f"{CATEGORY_HEADER} must be 'marketing' or 'transactional', "
                f"not {explicit.strip()[:40]!r}"
            ) from None
    if account_default is not None:
        return Classification(account_default, "account_default")
    if header("List-Unsubscribe") is not None:
        return Classification(MessageKind.MARKETING, "list_unsubscribe")
    if header("List-Id") is not None:
        return Classification(MessageKind.MARKETING, "list_id")
    precedence = header("Precedence")
    if precedence is not None and precedence.strip().lower() in {"bulk", "list"}:
        return Classification(MessageKind.MARKETING, "precedence_bulk")
    return Classification(MessageKind.TRANSACTIONAL, "no_signal")
