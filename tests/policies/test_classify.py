"""Classification: explicit header, then account default, then list signals."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import MessageKind
from policies.classify import CategoryError, classify
from relay.message import MessageView


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


def reference_header(content: bytes, name: str) -> str | None:
    """How ``MessageView.header`` read a field before: one regex search."""
    block = content[: MessageView(content).body_offset]
    pattern = rb"(?im)^" + re.escape(name.encode("ascii")) + rb"[ \t]*:"
    found = re.search(pattern, block)
    if found is None:
        return None
    end = found.end()
    value = bytearray()
    while True:
        line_end = block.find(b"\r\n", end)
        if line_end < 0:
            line_end = len(block)
        value += block[end:line_end]
        end = line_end + 2
        if block[end : end + 1] not in (b" ", b"\t"):
            break
    return bytes(value).decode("utf-8", "replace").strip()


_HEADER_PIECES = [
    b"List-Unsubscribe",
    b"list-unsubscribe",
    b"LIST-UNSUBSCRIBE",
    b"X-List-Unsubscribe",
    b"List-Unsubscribe-Post",
    b"Subject",
    b":",
    b" ",
    b"\t",
    b"\r\n",
    b"\n",
    b"\r",
    b"<https://a.example/u>",
    b"x",
    b"\xc4",
    b"\r\n\r\n",
]


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.sampled_from(_HEADER_PIECES), max_size=20).map(b"".join),
    st.sampled_from(["List-Unsubscribe", "Subject", "list-unsubscribe", "X"]),
)
def test_a_header_reads_as_the_regex_search_read_it(content: bytes, name: str) -> None:
    view = MessageView(content)
    assert view.header(name) == reference_header(content, name)
    assert view.header(name) == reference_header(content, name)  # lowered once
