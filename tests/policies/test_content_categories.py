"""Content categories: weighted terms per category, per-account allowances."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import MessageKind, Outcome, PolicyContext, Stage, Verdict
from policies.base import AccountPolicy, PolicyEnv
from policies.body import fold
from policies.content_categories import (
    ContentCategories,
    PhraseMatcher,
    ascii_words,
    default_terms_text,
    from_table,
    words,
)
from policies.registry import PolicyConfigError, build_pipeline
from relay.clock import SystemClock
from relay.message import MessageView

CATEGORIES = [
    "gambling",
    "adult",
    "weapons",
    "tobacco",
    "drugs",
    "political",
    "hacking",
    "penny_stocks",
    "forex",
    "payday_loans",
    "lead_sales",
    "get_rich_quick",
]

CLEAN = (
    "Hello Jane,\n\nOur spring collection has arrived: linen shirts, light jackets "
    "and the sandals you asked for. Members get early access this weekend.\n\n"
    "Unsubscribe: https://acme.example/u/1\n"
)
PAYDAY = (
    "Short of money before the end of the month? Get a payday loan today, or a "
    "cash advance straight to your account.\n"
)


def env(
    tmp_path: Path | None = None, allowed: frozenset[str] = frozenset()
) -> PolicyEnv:
    return PolicyEnv(
        accounts={"acme": AccountPolicy(name="acme", allowed_content=allowed)},
        clock=SystemClock(),
        base_dir=tmp_path or Path(),
    )


def message(
    text: str = CLEAN, subject: str = "Spring news", html: str | None = None
) -> MessageView:
    msg = EmailMessage()
    msg["From"] = "news@acme.example"
    msg["Subject"] = subject
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return MessageView(msg.as_bytes().replace(b"\n", b"\r\n"))


def context(
    view: MessageView, kind: MessageKind = MessageKind.MARKETING
) -> PolicyContext:
    return PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="news@acme.example",
        received_at=datetime.now(UTC),
        message=view,
        kind=kind,
    )


async def check(
    view: MessageView,
    allowed: frozenset[str] = frozenset(),
    kind: MessageKind = MessageKind.MARKETING,
    **table: Any,
) -> Verdict:
    return await from_table(table, env(allowed=allowed)).check(context(view, kind))


def terms_file(tmp_path: Path, body: str, name: str = "terms.toml") -> str:
    (tmp_path / name).write_text(body, encoding="utf-8")
    return name


# -- the shipped data file ---------------------------------------------------------


def test_the_shipped_file_covers_every_category_of_the_policy() -> None:
    data = tomllib.loads(default_terms_text())
    assert [name for name in data if name != "spam_subject"] == CATEGORIES
    for name in CATEGORIES:
        assert data[name]["description"]
        assert 10 <= len(data[name]["terms"]) <= 25, name
    assert 20 <= len(data["spam_subject"]["phrases"]) <= 30
    policy = from_table({}, env())
    assert policy.categories == tuple(CATEGORIES)


# -- verdicts ------------------------------------------------------------------------


async def test_clean_marketing_passes() -> None:
    assert (await check(message())).outcome is Outcome.PASS


async def test_prohibited_content_is_refused_naming_category_score_and_terms() -> None:
    verdict = await check(message(PAYDAY))
    assert (verdict.outcome, verdict.reason) == (Outcome.REFUSE, "prohibited_content")
    assert verdict.detail == (
        "content looks like payday_loans (score 7.0 >= 5.0): 'payday loan', "
        "'cash advance'"
    )
    assert verdict.figures == {"score": 7.0, "threshold": 5.0}


async def test_transactional_mail_is_checked_too() -> None:
    verdict = await check(message(PAYDAY), kind=MessageKind.TRANSACTIONAL)
    assert verdict.reason == "prohibited_content"


async def test_an_allowed_category_passes() -> None:
    assert (await check(message(PAYDAY), frozenset({"payday_loans"}))).outcome is (
        Outcome.PASS
    )


async def test_an_allowance_covers_only_its_category() -> None:
    text = PAYDAY + "Try our online casino: free spins and an online casino bonus!\n"
    verdict = await check(message(text), frozenset({"payday_loans"}))
    assert verdict.detail.startswith("content looks like gambling (score ")


async def test_the_highest_scoring_category_is_named_with_at_most_five_terms() -> None:
    text = (
        "online casino, sports betting, free spins, no deposit bonus, sportsbook, "
        "roulette and blackjack. Also a payday loan.\n"
    )
    verdict = await check(message(text))
    assert verdict.detail == (
        "content looks like gambling (score 22.0 >= 5.0): 'no deposit bonus', "
        "'online casino', 'sports betting', 'free spins', 'sportsbook'"
    )


async def test_categories_setting_limits_what_is_checked() -> None:
    assert (await check(message(PAYDAY), categories=["gambling"])).outcome is (
        Outcome.PASS
    )


# -- scoring ------------------------------------------------------------------------


def custom(tmp_path: Path, **table: Any) -> ContentCategories:
    name = terms_file(
        tmp_path,
        '[spam_subject]\nphrases = ["act now", "100% free"]\n'
        '[widgets]\ndescription = "test"\n'
        '[widgets.terms]\n"blue widget" = 2.5\n"gadget" = 1\n"widget" = 1\n',
    )
    return from_table({"terms_file": name, **table}, env(tmp_path))


async def test_threshold_is_inclusive(tmp_path: Path) -> None:
    view = message("A blue widget and another blue widget.\n")
    at = await custom(tmp_path).check(context(view))
    assert at.detail == "content looks like widgets (score 5.0 >= 5.0): 'blue widget'"
    above = await custom(tmp_path, threshold=5.5).check(context(view))
    assert above.outcome is Outcome.PASS


def test_each_term_counts_at_most_three_times(tmp_path: Path) -> None:
    policy = custom(tmp_path)
    assert policy.scores("", ["gadget " * 10]) == {"widgets": (3.0, ["gadget"])}


def test_a_longer_phrase_hides_the_terms_inside_it(tmp_path: Path) -> None:
    policy = custom(tmp_path)
    assert policy.scores("", ["one blue widget, one widget"]) == {
        "widgets": (3.5, ["blue widget", "widget"])
    }


def test_subject_terms_count_subject_weight_times(tmp_path: Path) -> None:
    assert custom(tmp_path).scores("Gadget!", ["a gadget"]) == {
        "widgets": (3.0, ["gadget"])
    }
    assert custom(tmp_path, subject_weight=0).scores("Gadget!", []) == {}
    assert custom(tmp_path, subject_weight=3.5).scores("gadget", []) == {
        "widgets": (3.5, ["gadget"])
    }


async def test_subject_weight_can_tip_the_verdict(tmp_path: Path) -> None:
    policy = custom(tmp_path)
    body_only = await policy.check(context(message("a blue widget\n")))
    assert body_only.outcome is Outcome.PASS  # 2.5
    both = await policy.check(
        context(message("a blue widget\n", subject="Blue widgets"))
    )
    assert both.figures["score"] == 7.5  # 2.5 + 2 x 2.5


def test_text_and_html_versions_are_not_counted_twice(tmp_path: Path) -> None:
    policy = custom(tmp_path)
    assert policy.scores("", ["blue widget", "<p>blue widget</p>", "x"]) == {
        "widgets": (2.5, ["blue widget"])
    }


@pytest.mark.parametrize(
    "text",
    [
        "PAYDAY LOAN",
        "payday-loan",
        "Payday\n   loans",
        "payday loans!",
    ],
)
def test_matching_ignores_case_separators_and_plural(text: str) -> None:
    policy = from_table({}, env())
    assert policy.scores("", [text])["payday_loans"][0] == 5.0


def test_matching_ignores_accents_both_ways() -> None:
    policy = from_table({}, env())
    assert policy.scores("", ["Un prêt rapide"])["payday_loans"][1] == ["pret rapide"]
    assert policy.scores("", ["CASINO EN LÍNEA y casino en ligne"])["gambling"][1] == [
        "casino en ligne",
        "casino",
    ]


def test_matching_is_on_whole_words() -> None:
    policy = from_table({}, env())
    assert "gambling" not in policy.scores("", ["casinoroyale pokerface xcasino"])


async def test_encoded_subject_is_decoded() -> None:
    view = message(CLEAN, subject="Prêt rapide, payday loan!")
    assert "=?utf-8?" in view.content.decode()
    verdict = await check(view)
    assert verdict.detail.startswith("content looks like payday_loans (score 16.0")


def test_non_ascii_terms_use_the_unicode_word_splitter(tmp_path: Path) -> None:
    name = terms_file(
        tmp_path, '[cyr]\ndescription = ""\nterms = { "онлайн казино" = 5 }\n'
    )
    policy = from_table({"terms_file": name}, env(tmp_path))
    assert policy.scores("", ["Лучшее Онлайн-Казино!"]) == {
        "cyr": (5.0, ["онлайн казино"])
    }


def test_phrase_matcher_counts_overlaps_once() -> None:
    matcher = PhraseMatcher(["a b", "b c", "b"])
    assert matcher.count(words("a b c b b c")) == {0: 1, 1: 1, 2: 1}


def reference_count(phrases: list[str], text_words: list[str]) -> dict[int, int]:
    """How PhraseMatcher counted before its shortcuts: at every occurrence of
    each first word, the longest phrase that matches; overlaps counted once."""
    by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    for index, phrase in enumerate(phrases):
        folded = tuple(words(phrase))
        variants = [folded]
        last = folded[-1]
        if len(last) >= 3 and not last.endswith("s") and last.isalpha():
            variants.append((*folded[:-1], f"{last}s"))
        for variant in variants:
            by_first.setdefault(variant[0], []).append((variant, index))
    for candidates in by_first.values():
        candidates.sort(key=lambda item: -len(item[0]))
    found = []
    for start, word in enumerate(text_words):
        for candidate, index in by_first.get(word, ()):
            if tuple(text_words[start : start + len(candidate)]) == candidate:
                found.append((start, -len(candidate), index))
                break
    counts: dict[int, int] = {}
    reached = 0
    for start, negative_length, index in sorted(found):
        if start >= reached:
            reached = start - negative_length
            counts[index] = counts.get(index, 0) + 1
    return counts


_PHRASE_WORDS = st.sampled_from(["a", "b", "c", "cas", "casino", "casinos", "x"])


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.lists(_PHRASE_WORDS, min_size=1, max_size=3).map(" ".join),
        min_size=1,
        max_size=6,
    ),
    st.lists(_PHRASE_WORDS, max_size=25),
)
def test_phrase_matcher_counts_as_the_reference(
    phrases: list[str], text_words: list[str]
) -> None:
    matcher = PhraseMatcher(phrases)
    assert matcher.count(text_words) == reference_count(phrases, text_words)


def test_the_shipped_terms_count_as_the_reference() -> None:
    terms = tomllib.loads(default_terms_text())
    phrases = [
        term
        for name, table in terms.items()
        if name != "spam_subject"
        for term in table["terms"]
    ]
    matcher = PhraseMatcher(phrases)
    text = ascii_words(CLEAN + PAYDAY + " online casino casinos payday loans " * 3)
    assert matcher.count(text) == reference_count(phrases, text)
    assert matcher.count(ascii_words(CLEAN)) == reference_count(
        phrases, ascii_words(CLEAN)
    )


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_ascii_words_finds_every_ascii_word_of_words(text: str) -> None:
    fast = ascii_words(text)
    # Non-ASCII characters split words: "casinoЖ" gives "casino" (documented).
    assert {w for w in words(text) if w.isascii()} <= set(fast)
    if fold(text).isascii():
        assert fast == words(text)


# -- spam-trigger subject phrases ---------------------------------------------------


async def test_spam_subject_phrases_are_reported_never_refused() -> None:
    policy = from_table({}, env())
    seen: list[tuple[str, list[str]]] = []
    policy.on_warning = lambda account, phrases: seen.append((account, phrases))
    view = message(subject="URGENT: act now, 100% FREE for a winner")
    assert (await policy.check(context(view))).outcome is Outcome.PASS
    assert seen == [("acme", ["act now", "100% free", "winner", "urgent"])]


async def test_no_callback_no_work_and_no_report() -> None:
    policy = from_table({}, env())
    assert policy.on_warning is None
    assert (await policy.check(context(message(subject="Act now!")))).outcome is (
        Outcome.PASS
    )
    assert policy.spam_subject_phrases("Cash bonus: risk-free") == [
        "risk-free",
        "cash bonus",
    ]


# -- settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "start"),
    [
        ({"colour": 1}, "colour: unknown key"),
        ({"threshold": 0}, "threshold: Input should be greater than 0"),
        ({"threshold": "high"}, "threshold: Input should be a valid number"),
        ({"subject_weight": -1}, "subject_weight: "),
        (
            {"categories": ["gambling", "knitting"]},
            "categories[1]: unknown category 'knitting'",
        ),
        ({"terms_file": "missing.toml"}, "terms_file: cannot read "),
    ],
)
def test_bad_settings_name_their_key(
    tmp_path: Path, table: Mapping[str, Any], start: str
) -> None:
    with pytest.raises(ValueError, match=r"^\w+(\[\d+\])?: ") as info:
        from_table(table, env(tmp_path))
    assert str(info.value).startswith(start)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[gambling\n", "TOML syntax error"),
        ('[gambling]\ndescription = "x"\n', "gambling.terms: must be a table"),
        (
            '[gambling]\nterms = { "poker" = 0 }\n',
            "gambling.terms.'poker': weight must be",
        ),
        (
            '[gambling]\nterms = { "poker" = true }\n',
            "gambling.terms.'poker': weight must be",
        ),
        ('[gambling]\nterms = { "!!" = 1 }\n', "gambling.terms.'!!': has no words"),
        ('[Gambling]\nterms = { "poker" = 1 }\n', "Gambling: a category name is"),
        (
            '[gambling]\nterms = { "poker" = 1 }\ncolour = 2\n',
            "gambling.colour: unknown key",
        ),
        (
            '[spam_subject]\nphrases = "act now"\n',
            "spam_subject.phrases: must be a list",
        ),
        ("", "defines no category"),
    ],
)
def test_an_unusable_terms_file_is_named_with_the_reason(
    tmp_path: Path, content: str, reason: str
) -> None:
    name = terms_file(tmp_path, content)
    with pytest.raises(ValueError, match=r"^terms_file: ") as info:
        from_table({"terms_file": name}, env(tmp_path))
    assert str(tmp_path / name) in str(info.value)
    assert reason in str(info.value)


def test_terms_file_resolves_against_base_dir_or_is_absolute(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    name = terms_file(tmp_path, '[widgets]\nterms = { "widget" = 1 }\n', "data/t.toml")
    assert from_table({"terms_file": name}, env(tmp_path)).categories == ("widgets",)
    absolute = str(tmp_path / name)
    assert from_table({"terms_file": absolute}, env()).categories == ("widgets",)


def test_unknown_allowed_content_names_the_account_key() -> None:
    with pytest.raises(ValueError, match="knitting") as info:
        from_table({}, env(allowed=frozenset({"gambling", "knitting"})))
    assert str(info.value).startswith(
        "accounts.acme.allowed_content: unknown category 'knitting' (known: gambling,"
    )


def test_the_registry_reports_problems_under_the_policy_path() -> None:
    registry = {"content_categories": from_table}
    with pytest.raises(PolicyConfigError) as info:
        build_pipeline(
            "enforce",
            ("content_categories",),
            {"content_categories": {"threshold": -1}},
            lambda _: None,
            env(),
            registry,
        )
    assert str(info.value).startswith("policies.content_categories: threshold: ")


async def test_cyrillic_and_greek_look_alikes_do_not_hide_a_term() -> None:
    disguised = PAYDAY.replace("payday", "p\u0430yd\u0430y").replace(
        "advance", "adv\u03b1nce"
    )
    assert disguised != PAYDAY
    verdict = await check(message(disguised))
    assert verdict.reason == "prohibited_content"
    assert "'payday loan'" in verdict.detail
