"""Refuses mail that promotes a prohibited category, unless the account may send it.

The categories and their weighted terms live in a TOML data file (the shipped
``config/content_terms.toml`` by default; its header explains the format). Terms
are matched on whole words, ignoring case and accents, in the decoded Subject and
the visible body text (:mod:`policies.body`). A category's score is the sum, over
the distinct terms found, of weight x occurrences, at most 3 occurrences counted
per term in the body and 3 in the Subject, a Subject occurrence counting
``subject_weight`` times. Score at or above ``threshold`` in a category the account
is not allowed (``[accounts.NAME] allowed_content``) refuses the message; every
message kind is checked.

Spam-trigger Subject phrases (``[spam_subject]`` in the file) never refuse: they go
to :attr:`ContentCategories.on_warning`, which the relay sets to log and count them.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.errors import MessageError
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.base import (
    PASS,
    MessageLike,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
    refuse,
)
from policies.body import fold, load_body
from policies.settings import describe

MAX_COUNT = 3
"""Occurrences of one term counted, in the body and in the Subject each."""
MAX_NAMED_TERMS = 5
"""Terms named in a refusal."""
SPAM_SUBJECT = "spam_subject"
"""The data file's table of spam-trigger Subject phrases (not a category)."""

_WORD = re.compile(r"\w+")
_CATEGORY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

WarningHook = Callable[[str, list[str]], None]
"""Called with (account, phrases) when a Subject has spam-trigger phrases."""


# ASCII characters that are not word characters (regex \w), as spaces.
_ASCII_SEPARATORS = str.maketrans(
    {c: " " for c in map(chr, range(128)) if not (c.isalnum() or c == "_")}
)


def words(text: str) -> list[str]:
    """The folded words (regex word runs) of ``text`` (:func:`policies.body.fold`)."""
    return _WORD.findall(fold(text))


def ascii_words(text: str) -> list[str]:
    """:func:`words` for matching ASCII terms, three to five times faster: after
    folding, any character still outside ASCII separates words (accented Latin
    letters have lost their accents by then; other scripts cannot match)."""
    folded = fold(text)
    if not folded.isascii():
        folded = folded.encode("ascii", "replace").decode("ascii")
    return folded.translate(_ASCII_SEPARATORS).split()


@dataclass(frozen=True, slots=True)
class Category:
    """One prohibited category of the data file."""

    name: str
    description: str
    terms: Mapping[str, float]
    """Term as written in the file -> its weight."""


@dataclass(frozen=True, slots=True)
class ContentTerms:
    """The parsed data file: categories in file order, and spam Subject phrases."""

    categories: Mapping[str, Category]
    spam_subject: tuple[str, ...] = ()


class PhraseMatcher:
    """Finds whole-word phrases in a list of words, in time linear in the words.

    Built once per configuration. Matching intersects the text's words with the
    phrases' words (a set operation in C); only phrases whose words all occur in
    the text can match, and only where their first word is; of phrases that
    overlap, the longest leftmost one counts ("online casino", not also
    "casino"). When no phrase of two words or more can match, the phrases cannot
    overlap and their occurrences are counted as they are.
    """

    def __init__(self, phrases: Sequence[str]) -> None:
        by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        folded = [words(phrase) for phrase in phrases]
        self.split: Callable[[str], list[str]] = (
            ascii_words if all(w.isascii() for p in folded for w in p) else words
        )
        """How texts are cut into words for :meth:`count`."""
        for index, phrase_words in enumerate(folded):
            for variant in _variants(tuple(phrase_words)):
                by_first.setdefault(variant[0], []).append((variant, index))
        self._by_first: dict[
            str, list[tuple[tuple[str, ...], int, frozenset[str]]]
        ] = {}
        for first, candidates in by_first.items():
            candidates.sort(key=lambda item: -len(item[0]))
            self._by_first[first] = [
                (phrase, index, frozenset(phrase[1:])) for phrase, index in candidates
            ]
        self._words = frozenset(
            word
            for candidates in by_first.values()
            for p, _ in candidates
            for word in p
        )

    def count(self, text_words: list[str]) -> dict[int, int]:
        """Occurrences of each phrase (by index) in ``text_words`` (cut by
        :attr:`split`)."""
        present = self._words.intersection(text_words)
        if not present:
            return {}
        # The phrases that can match, by first word, longest first.
        viable: list[tuple[str, list[tuple[tuple[str, ...], int]]]] = []
        overlapping = False
        for first in present:
            candidates = self._by_first.get(first)
            if candidates is None:
                continue
            usable = [
                (phrase, index)
                for phrase, index, rest in candidates
                if rest <= present  # every other word is in the text
            ]
            if usable:
                viable.append((first, usable))
                overlapping = overlapping or len(usable[0][0]) > 1
        counts: dict[int, int] = {}
        if not overlapping:
            # One-word phrases only: each occurrence of the first word is the
            # first candidate's (a later one is the same word, not kept).
            for first, usable in viable:
                index = usable[0][1]
                counts[index] = counts.get(index, 0) + text_words.count(first)
            return counts
        found: list[tuple[int, int, int]] = []  # (start, -length, phrase index)
        for first, usable in viable:
            start = -1
            while True:
                try:
                    start = text_words.index(first, start + 1)
                except ValueError:
                    break
                for phrase, index in usable:
                    end = start + len(phrase)
                    if len(phrase) == 1 or tuple(text_words[start:end]) == phrase:
                        found.append((start, -len(phrase), index))
                        break
        reached = 0
        for start, negative_length, index in sorted(found):
            if start < reached:
                continue  # inside a longer phrase already counted
            reached = start - negative_length
            counts[index] = counts.get(index, 0) + 1
        return counts


def _variants(phrase: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The phrase, and with an "s" plural on its last word."""
    if not phrase:
        return []
    last = phrase[-1]
    if len(last) < 3 or last.endswith("s") or not last.isalpha():
        return [phrase]
    return [phrase, (*phrase[:-1], f"{last}s")]


class ContentCategoriesSettings(BaseModel):
    """``[policies.content_categories]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """A category scoring at least this refuses the message."""
    terms_file: str | None = None
    """The data file; ``None`` is the shipped ``config/content_terms.toml``.
    Relative paths resolve against the directory of relay.toml."""
    subject_weight: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    """How many times a term in the Subject counts."""
    categories: tuple[str, ...] | None = None
    """Only these categories of the file apply; ``None``: all of them."""


class ContentCategories:
    """Refuses prohibited content; each account may be allowed some categories."""

    name = "content_categories"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        terms: ContentTerms,
        *,
        accounts: Mapping[str, frozenset[str]] | None = None,
        threshold: float = 5.0,
        subject_weight: float = 2.0,
        categories: Iterable[str] | None = None,
    ) -> None:
        active = list(terms.categories) if categories is None else list(categories)
        for name in active:
            if name not in terms.categories:
                raise ValueError(f"unknown category {name!r}")
        self.threshold = threshold
        self.subject_weight = subject_weight
        self.categories: tuple[str, ...] = tuple(active)
        self._allowed = dict(accounts or {})
        # One matcher over every term of the active categories; a term may be in
        # several categories, so each phrase maps to its (category, term, weight).
        phrases: dict[str, int] = {}
        self._owners: list[list[tuple[str, str, float]]] = []
        for name in self.categories:
            for term, weight in terms.categories[name].terms.items():
                key = " ".join(words(term))
                if key not in phrases:
                    phrases[key] = len(phrases)
                    self._owners.append([])
                self._owners[phrases[key]].append((name, term, weight))
        self._terms = PhraseMatcher(list(phrases))
        self._spam = PhraseMatcher(terms.spam_subject)
        self._spam_phrases = terms.spam_subject
        self.on_warning: WarningHook | None = None
        """Set by the relay: called with (account, phrases) for spam-trigger
        phrases in a Subject. The verdict stays PASS."""

    @classmethod
    def from_table(cls, table: Mapping[str, Any], env: PolicyEnv) -> ContentCategories:
        """Build from ``[policies.content_categories]``; ``ValueError("key: reason")``
        for a bad setting, an unusable terms file or an unknown category in an
        account's ``allowed_content``."""
        try:
            settings = ContentCategoriesSettings.model_validate(dict(table))
        except ValidationError as exc:
            raise ValueError(describe(exc)) from None
        terms = load_terms(settings.terms_file, env.base_dir)
        known = ", ".join(terms.categories)
        for index, name in enumerate(settings.categories or ()):
            if name not in terms.categories:
                raise ValueError(
                    f"categories[{index}]: unknown category {name!r} (known: {known})"
                )
        allowed: dict[str, frozenset[str]] = {}
        for account_name, account in env.accounts.items():
            for name in sorted(account.allowed_content):
                if name not in terms.categories:
                    raise ValueError(
                        f"accounts.{account_name}.allowed_content: unknown category "
                        f"{name!r} (known: {known})"
                    )
            allowed[account_name] = account.allowed_content
        return cls(
            terms,
            accounts=allowed,
            threshold=settings.threshold,
            subject_weight=settings.subject_weight,
            categories=settings.categories,
        )

    def spam_subject_phrases(self, subject: str) -> list[str]:
        """The spam-trigger phrases in ``subject``, as written in the data file."""
        counts = self._spam.count(self._spam.split(subject))
        return [self._spam_phrases[index] for index in sorted(counts)]

    def scores(
        self, subject: str, texts: Iterable[str]
    ) -> dict[str, tuple[float, list[str]]]:
        """Each active category with a non-zero score: (score, terms by weight)."""
        split = self._terms.split
        subject_counts = self._terms.count(split(subject))
        # The text and HTML versions of a message say the same thing: a term
        # counts as often as in the part that has it most, not in their sum.
        body_counts: dict[int, int] = {}
        for text in texts:
            for index, count in self._terms.count(split(text)).items():
                body_counts[index] = max(body_counts.get(index, 0), count)
        found: dict[str, list[tuple[float, str]]] = {}
        for index in body_counts.keys() | subject_counts.keys():
            in_body = min(body_counts.get(index, 0), MAX_COUNT)
            in_subject = min(subject_counts.get(index, 0), MAX_COUNT)
            hits = in_body + self.subject_weight * in_subject
            for category, term, weight in self._owners[index]:
                found.setdefault(category, []).append((weight * hits, term))
        result: dict[str, tuple[float, list[str]]] = {}
        for category, contributions in found.items():
            contributions.sort(key=lambda item: (-item[0], item[1]))
            score = math.fsum(points for points, _ in contributions)
            if score > 0:
                result[category] = (score, [term for _, term in contributions])
        return result

    async def check(self, ctx: PolicyContext) -> Verdict:
        """Refuse the highest-scoring category the account may not send."""
        message = ctx.message
        if message is None:
            return PASS
        subject = _subject(message)
        if self.on_warning is not None:
            phrases = self.spam_subject_phrases(subject)
            if phrases:
                self.on_warning(ctx.account, phrases)
        allowed = self._allowed.get(ctx.account, frozenset())
        if all(category in allowed for category in self.categories):
            return PASS
        body = await load_body(message)
        scores = self.scores(subject, body.texts)
        worst: tuple[float, str, list[str]] | None = None
        for category in self.categories:  # file order breaks ties
            if category in allowed or category not in scores:
                continue
            score, terms = scores[category]
            if score >= self.threshold and (worst is None or score > worst[0]):
                worst = (score, category, terms)
        if worst is None:
            return PASS
        score, category, terms = worst
        named = ", ".join(f"'{term}'" for term in terms[:MAX_NAMED_TERMS])
        return refuse(
            "prohibited_content",
            f"content looks like {category} (score {score:.1f} >= "
            f"{self.threshold:.1f}): {named}",
            score=score,
            threshold=self.threshold,
        )


from_table = ContentCategories.from_table
"""The registry's factory for ``content_categories``."""


def default_terms_text() -> str:
    """The shipped ``config/content_terms.toml``."""
    return resources.files("config").joinpath("content_terms.toml").read_text("utf-8")


def load_terms(terms_file: str | None, base_dir: Path) -> ContentTerms:
    """Read and check a terms file; ``ValueError("terms_file: ...")`` if unusable.

    ``None`` reads the shipped file; a relative path resolves against ``base_dir``.
    """
    if terms_file is None:
        where = "the shipped content_terms.toml"
        try:
            text = default_terms_text()
        except OSError as exc:  # a broken installation
            raise ValueError(f"terms_file: cannot read {where}: {exc}") from None
    else:
        path = Path(terms_file)
        if not path.is_absolute():
            path = base_dir / path
        where = str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ValueError(f"terms_file: cannot read {where}: {reason}") from None
        except UnicodeDecodeError:
            raise ValueError(f"terms_file: {where} is not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"terms_file: {where}: TOML syntax error: {exc}") from None
    problems: list[str] = []
    terms = parse_terms(data, problems)
    if problems:
        raise ValueError(f"terms_file: {where}: {'; '.join(problems)}")
    return terms


def parse_terms(data: Mapping[str, Any], problems: list[str]) -> ContentTerms:
    """The categories and phrases of a parsed terms file; appends what is wrong
    (with its key path) to ``problems``."""
    spam: list[str] = []
    categories: dict[str, Category] = {}
    for name, table in data.items():
        if name == SPAM_SUBJECT:
            spam = _spam_phrases(table, problems)
            continue
        if not _CATEGORY_NAME.match(name):
            problems.append(
                f"{name}: a category name is lower case letters, digits and '_'"
            )
            continue
        if not isinstance(table, Mapping):
            problems.append(f"{name}: must be a table with description and terms")
            continue
        category = _category(name, table, problems)
        if category is not None:
            categories[name] = category
    if not categories and not problems:
        problems.append("defines no category")
    return ContentTerms(categories=categories, spam_subject=tuple(spam))


def _category(
    name: str, table: Mapping[str, Any], problems: list[str]
) -> Category | None:
    unknown = set(table) - {"description", "terms"}
    if unknown:
        problems.append(f"{name}.{sorted(unknown)[0]}: unknown key")
    description = table.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{name}.description: must be a string")
    raw_terms = table.get("terms")
    if not isinstance(raw_terms, Mapping) or not raw_terms:
        problems.append(f"{name}.terms: must be a table of term = weight")
        return None
    terms: dict[str, float] = {}
    for term, weight in raw_terms.items():
        if not words(term):
            problems.append(f"{name}.terms.{term!r}: has no words")
        elif (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            problems.append(f"{name}.terms.{term!r}: weight must be a number above 0")
        else:
            terms[term] = float(weight)
    return Category(name, str(description), terms)


def _spam_phrases(table: object, problems: list[str]) -> list[str]:
    phrases = table.get("phrases") if isinstance(table, Mapping) else None
    if not isinstance(phrases, list):
        problems.append(f"{SPAM_SUBJECT}.phrases: must be a list of strings")
        return []
    kept = []
    for index, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not words(phrase):
            problems.append(f"{SPAM_SUBJECT}.phrases[{index}]: must be words")
        else:
            kept.append(phrase)
    return kept


def _subject(message: MessageLike) -> str:
    """The Subject with RFC 2047 encoded-words decoded (the header parse only
    when there are some); the raw value if it cannot be parsed."""
    raw = message.header("Subject")
    if raw is None or "=?" not in raw:
        return raw or ""
    try:
        value = message.headers.get("subject")
    except (ValueError, LookupError, MessageError):
        return raw
    return raw if value is None else str(value)
