"""Addresses on the upstream's command lines: sent as they are, never smuggled."""

from __future__ import annotations

import pytest

from relay.upstream import _path


@pytest.mark.parametrize(
    ("address", "encoding", "path"),
    [
        ("jane@example.org", "ascii", b"<jane@example.org>"),
        ("", "ascii", b"<>"),
        ('"jane doe"@example.org', "ascii", b'<"jane doe"@example.org>'),
        ('"a<b>c"@example.org', "ascii", b'<"a<b>c"@example.org>'),
        ("jäne@example.org", "utf-8", "<jäne@example.org>".encode()),
    ],
)
def test_canonical_addresses_go_out_as_they_are(
    address: str, encoding: str, path: bytes
) -> None:
    assert _path(address, encoding) == path


@pytest.mark.parametrize(
    "address",
    [
        "jane@example.org> NOTIFY=NEVER",
        "jane@example.org>\r\nRCPT TO:<victim@example.net",
        "jane@exa mple.org",
        "<jane@example.org",
        '"jane"doe@example.org>',
        '"ja\r\nne"@example.org',
        "jane@example.org\x00",
    ],
)
def test_what_could_end_the_path_early_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="cannot be sent on a command line"):
        _path(address, "ascii")


def test_a_non_ascii_address_needs_smtputf8() -> None:
    with pytest.raises(UnicodeEncodeError):
        _path("jäne@example.org", "ascii")
