"""Classification: explicit header, then account default, then list signals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import MessageKind
from policies.classify import CategoryError, classify


def lookup(**headers: str):  # type: ignore[no-untyped-def]
    table = {name.replace("_", "-").lower(): value for name, value in headers.items()}
    return lambda name: table.get(name.lower())


@pytest.mark.parametrize(
    ("headers", "default", "kind", "reason"),
    [
        (
            {"X_Relay_Category": "Transactional"},
            MessageKind.MARKETING,
            MessageKind.TRANSACTIONAL,
            "header",
        ),
        ({"X_Relay_Category": " marketing "}, None, MessageKind.MARKETING, "header"),
        (
            {"List_Unsubscribe": "<https://x>"},
            MessageKind.TRANSACTIONAL,
            MessageKind.TRANSACTIONAL,
            "account_default",
        ),
        (
            {"List_Unsubscribe": "<https://x>"},
            None,
            MessageKind.MARKETING,
            "list_unsubscribe",
        ),
        ({"List_Id": "<news.acme.example>"}, None, MessageKind.MARKETING, "list_id"),
        ({"Precedence": "Bulk"}, None, MessageKind.MARKETING, "precedence_bulk"),
        ({"Precedence": "junk"}, None, MessageKind.TRANSACTIONAL, "no_signal"),
        ({}, None, MessageKind.TRANSACTIONAL, "no_signal"),
    ],
)
def test_classification_order(headers, default, kind, reason) -> None:  # type: ignore[no-untyped-def]
    result = classify(lookup(**headers), default)
    assert (result.kind, result.reason) == (kind, reason)


def test_an_unknown_category_is_an_error_naming_the_value() -> None:
    with pytest.raises(CategoryError, match="'newsletter'"):
        classify(lookup(X_Relay_Category="newsletter"), None)


@given(st.text(max_size=60))
def test_any_category_value_classifies_or_raises_category_error(value: str) -> None:
    try:
        result = classify(lookup(X_Relay_Category=value), None)
    except CategoryError:
        assert value.strip().lower() not in {"marketing", "transactional"}
    else:
        assert result.reason == "header"
