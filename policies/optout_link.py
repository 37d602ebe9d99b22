"""Marketing mail must carry a visible opt-out link (and, if asked, List-Unsubscribe).

A link counts when it is visible (not hidden by CSS, not an empty anchor) and
points somewhere usable (``http:``, ``https:`` or ``mailto:``), and when its text,
the text around it in the same block, or its URL says "unsubscribe" in one of the
built-in languages or matches an operator pattern. Transactional mail is exempt.

``list_unsubscribe = "add"`` (the default) leaves a missing List-Unsubscribe header
to the relay, which adds its own when it accepts the message; ``"refuse"`` requires
the mailer's own header with an https or mailto URI (RFC 2369, RFC 8058). Reading
the body is :mod:`policies.body`'s job.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from policies.base import (
    PASS,
    MessageKind,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
    refuse,
)
from policies.body import Link, fold, load_body
from policies.settings import describe

# Matched against folded text (policies.body.fold: lower case, no accents), after a
# word boundary; stems, so that "Désinscription", "abmelden" and "Abmeldung" match.
BUILTIN_PATTERNS: tuple[str, ...] = (
    # English
    r"\bunsub(?:scri|\b)",
    r"\bun[\s-]subscri",
    r"\bopt[\W_]{0,2}out",
    r"\b(?:manage|update|change|edit|email|e-mail|subscription|communication)"
    r"\s+(?:your\s+|my\s+)?(?:email\s+|e-mail\s+|subscription\s+|communication\s+)?"
    r"preferences",
    r"\bpreference\s+cent(?:er|re)",
    # French
    r"desabonn",
    r"desinscri",
    # German (also inside compounds: "Newsletterabmeldung")
    r"abmeld",
    r"abbestell",
    r"\baustragen",
    # Spanish
    r"\bd(?:ar(?:se|te|me)?|ate|ese)\s+de\s+baja",
    r"\bdesuscrib",
    r"\b(?:cancelar|anular)\s+(?:la\s+|tu\s+|su\s+)?(?:suscripcion|subscripcion)",
    # Portuguese
    r"\bcancelar\s+(?:a\s+|sua\s+)?(?:inscricao|assinatura)",
    r"descadastr",
    # Italian
    r"disiscri[vz]",
    r"\b(?:annulla|cancella)(?:re)?\s+(?:l\W?\s*)?(?:la\s+tua\s+)?iscrizione",
    # Dutch, Danish, Norwegian, Swedish
    r"afmeld",
    r"uitschrijv",
    r"\bframeld",
    r"\bavmeld",
    r"\bavregistrer",
    r"\bavsluta\s+(?:din\s+)?prenumeration",
    r"\bavprenumerer",
    # Polish, Czech
    r"\bwypisz",
    r"\bodhlas",
)

_USABLE_SCHEMES = ("http:", "https:", "mailto:")
_URL_SEPARATORS = re.compile(r"[\W_]+")
_LIST_URI = re.compile(r"<([^>]*)>")


class ListUnsubscribe(StrEnum):
    """What to do with marketing mail that has no List-Unsubscribe header."""

    ADD = "add"
    """Accept it; the relay adds its own header (and List-Unsubscribe-Post)."""
    REFUSE = "refuse"
    """Refuse it, and refuse a header without an https or mailto URI."""


class OptOutLinkSettings(BaseModel):
    """``[policies.optout_link]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patterns: tuple[str, ...] = ()
    """Extra regular expressions (case- and accent-insensitive) that mark an
    opt-out link, added to :data:`BUILTIN_PATTERNS`."""
    list_unsubscribe: ListUnsubscribe = ListUnsubscribe.ADD


def compile_patterns(extra: Sequence[str] = ()) -> re.Pattern[str]:
    """One regex of the built-in patterns and ``extra``; raises ``ValueError``
    naming ``patterns[i]`` for a pattern that is invalid or matches nothing."""
    alternatives = list(BUILTIN_PATTERNS)
    for index, pattern in enumerate(extra):
        # Accents are stripped as in the text; case is left to IGNORECASE, since
        # case folding a regex would turn "\S" into "\s".
        plain = "".join(
            c
            for c in unicodedata.normalize("NFKD", pattern)
            if not unicodedata.combining(c)
        )
        try:
            compiled = re.compile(plain, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"patterns[{index}]: invalid regex: {exc}") from None
        if compiled.search("") is not None:
            raise ValueError(f"patterns[{index}]: matches the empty string")
        alternatives.append(plain)
    return re.compile("|".join(f"(?:{p})" for p in alternatives), re.IGNORECASE)


def is_usable(link: Link) -> bool:
    """A link a reader can see and follow: not hidden, with visible text (or an
    image's alt text), to an http, https or mailto URL."""
    url = link.url.strip()
    if not url.lower().startswith(_USABLE_SCHEMES):
        return False
    if url.lower().startswith("mailto:"):
        followable = "@" in url
    else:  # http(s): there must be a host to go to
        followable = bool(urlsplit(url).hostname)
    return not link.hidden and bool(link.text.strip()) and followable


def says_optout(link: Link, pattern: re.Pattern[str]) -> bool:
    """True if the link's text, its context or its URL matches ``pattern``."""
    if pattern.search(fold(link.text)) or pattern.search(fold(link.context)):
        return True
    # "https://x.example/email-preferences?u=1" -> " https x example email
    # preferences u 1 ": percent-decoded, and separators read as spaces.
    url = _URL_SEPARATORS.sub(" ", fold(unquote(link.url, errors="replace")))
    return pattern.search(f" {url} ") is not None


def find_optout_link(links: Iterable[Link], pattern: re.Pattern[str]) -> Link | None:
    """The first usable link that says opt-out, or ``None``."""
    for link in links:
        if is_usable(link) and says_optout(link, pattern):
            return link
    return None


def list_unsubscribe_uris(value: str) -> list[str]:
    """The URIs of a List-Unsubscribe value (RFC 2369 §2: ``<URI>``s, whitespace
    inside the brackets ignored)."""
    return ["".join(uri.split()) for uri in _LIST_URI.findall(value)]


class OptOutLink:
    """Marketing mail must offer a way out; transactional mail is exempt."""

    name = "optout_link"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        *,
        patterns: Sequence[str] = (),
        list_unsubscribe: ListUnsubscribe = ListUnsubscribe.ADD,
    ) -> None:
        self._pattern = compile_patterns(patterns)
        self.list_unsubscribe = list_unsubscribe
        self.adds_list_unsubscribe: bool = list_unsubscribe is ListUnsubscribe.ADD
        """True when the relay must add List-Unsubscribe to marketing mail that
        lacks one (this check does not refuse it)."""

    @classmethod
    def from_table(cls, table: Mapping[str, Any], env: PolicyEnv) -> OptOutLink:
        """Build from ``[policies.optout_link]``; ``ValueError("key: reason")``."""
        try:
            settings = OptOutLinkSettings.model_validate(dict(table))
        except ValidationError as exc:
            raise ValueError(describe(exc)) from None
        return cls(
            patterns=settings.patterns, list_unsubscribe=settings.list_unsubscribe
        )

    async def check(self, ctx: PolicyContext) -> Verdict:
        """Refuse marketing mail without a visible opt-out link."""
        message = ctx.message
        if ctx.kind is not MessageKind.MARKETING or message is None:
            return PASS
        if self.list_unsubscribe is ListUnsubscribe.REFUSE:
            verdict = self._check_header(message.header("List-Unsubscribe"))
            if verdict is not None:
                return verdict
        body = await load_body(message)
        # Where there is HTML, readers show it: the link must be there.
        links = [link for link in body.links if link.html or not body.html_parts]
        # Footers come last: look from the end.
        if find_optout_link(reversed(links), self._pattern) is not None:
            return PASS
        where = "HTML part(s)" if body.html_parts else "text part(s)"
        return refuse(
            "optout_link_missing",
            "marketing message has no visible opt-out link (looked for "
            f"unsubscribe/opt-out wording in {len(links)} link(s) of the {where})",
            links=float(len(links)),
        )

    @staticmethod
    def _check_header(value: str | None) -> Verdict | None:
        if value is None:
            return refuse(
                "list_unsubscribe_missing",
                "marketing message has no List-Unsubscribe header (RFC 2369); "
                "this relay requires one with an https or mailto URI",
            )
        uris = list_unsubscribe_uris(value)
        if not any(uri.lower().startswith(("https:", "mailto:")) for uri in uris):
            return refuse(
                "list_unsubscribe_invalid",
                "List-Unsubscribe header has no <https:...> or <mailto:...> URI "
                f"(RFC 2369, RFC 8058; found {len(uris)} URI(s))",
            )
        return None


from_table = OptOutLink.from_table
"""The registry's factory for ``optout_link``."""
