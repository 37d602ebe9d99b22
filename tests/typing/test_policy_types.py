"""mypy proves every built-in check is a ``Policy``; pytest that each is registered."""

from __future__ import annotations

from policies.base import Policy
from policies.consent import Consent
from policies.content_categories import ContentCategories
from policies.exclusion import Exclusion
from policies.header_sanity import HeaderSanity
from policies.optout_link import OptOutLink
from policies.registry import REGISTRY
from policies.sender_domains import SenderDomains

CHECKS: dict[str, type[Policy]] = {
    "consent": Consent,
    "content_categories": ContentCategories,
    "exclusion": Exclusion,
    "header_sanity": HeaderSanity,
    "optout_link": OptOutLink,
    "sender_domains": SenderDomains,
}


def test_every_check_is_registered_under_its_name() -> None:
    assert set(REGISTRY) == set(CHECKS)
    for name, cls in CHECKS.items():
        assert cls.name == name
