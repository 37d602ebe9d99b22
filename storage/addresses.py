"""Canonical forms of mail addresses and domains.

Every address the relay takes in (MAIL FROM, RCPT TO, later the exclusion list and
the consent ledger) goes through :func:`canonical_address` once; that one string is
then used for every lookup and for the upstream RCPT. The domain is lower-cased and
converted to its ASCII (IDNA A-label) form; the local part is kept as given, since
RFC 5321 §2.4 leaves its case to the receiving system.
"""

from __future__ import annotations

import re

# RFC 5321 §4.5.3.1: local part 64 octets, domain 255, path 256 including "<>".
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_ADDRESS = 254

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5322 §3.2.3 dot-atom; RFC 6531 §3.3 adds every non-ASCII character to atext.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
# RFC 5321 §4.1.2 Quoted-string: printable characters, with \ and " escaped.
_QUOTED = re.compile(
    r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"$'
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AddressError(ValueError):
    """The address cannot be used; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonical_domain(domain: str) -> str:
    """Return ``domain`` lower-cased in IDNA A-label form, or raise AddressError."""
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        raise AddressError("address literals are not accepted")
    if _CONTROL.search(domain):
        raise AddressError("control character in domain")
    name = domain[:-1] if domain.endswith(".") and len(domain) > 1 else domain
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise AddressError("invalid internationalised domain") from exc
    if len(ascii_name) > MAX_DOMAIN:
        raise AddressError("domain too long")
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise AddressError("domain is not fully qualified")
    for label in labels:
        if not _LABEL.match(label):
            raise AddressError("invalid domain label")
    return ascii_name


def canonical_address(address: str) -> str:
    """Return the canonical ``local@domain`` form, or raise :class:`AddressError`.

    Refuses what a relay should never pass on: control characters (NUL included),
    over-long parts, address literals, source routes and unqualified names.
    """
    if _CONTROL.search(address):
        raise AddressError("control character in address")
    if address.startswith("@"):
        raise AddressError("source routes are not accepted")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AddressError("address is not valid UTF-8") from exc
    local, sep, domain = address.rpartition("@")
    if not sep or not local:
        raise AddressError("address needs a local part and a domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    if local.startswith('"'):
        if not _QUOTED.match(local):
            raise AddressError("invalid quoted local part")
    elif not _DOT_ATOM.match(local):
        raise AddressError("invalid local part")
    canonical = f"{local}@{canonical_domain(domain)}"
    if len(canonical.encode("utf-8")) > MAX_ADDRESS:
        raise AddressError("address longer than 254 octets")
    return canonical


def domain_of(address: str) -> str:
    """The domain part of a canonical address (for logs and metrics at info)."""
    return address.rpartition("@")[2]
