"""Opt-out link: marketing mail needs a visible way out, in any common language."""

from __future__ import annotations

import asyncio
import html
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policies import MessageKind, Outcome, PolicyContext, Stage, Verdict
from policies.base import AccountPolicy, PolicyEnv
from policies.body import body_of, fold
from policies.optout_link import (
    ListUnsubscribe,
    OptOutLink,
    compile_patterns,
    find_optout_link,
    from_table,
    list_unsubscribe_uris,
)
from policies.registry import PolicyConfigError, build_pipeline
from relay.clock import SystemClock
from relay.message import MessageView

PATTERN = compile_patterns()


def env(tmp_path: Path | None = None) -> PolicyEnv:
    return PolicyEnv(
        accounts={"acme": AccountPolicy(name="acme")},
        clock=SystemClock(),
        base_dir=tmp_path or Path(),
    )


def policy(**table: Any) -> OptOutLink:
    return from_table(table, env())


def message(
    *,
    text: str | None = None,
    html_body: str | None = None,
    list_unsubscribe: str | None = None,
) -> MessageView:
    msg = EmailMessage()
    msg["From"] = "news@acme.example"
    msg["To"] = "jane@example.org"
    msg["Subject"] = "Spring news"
    if text is not None:
        msg.set_content(text)
    if html_body is not None:
        if text is None:
            msg.set_content(html_body, subtype="html")
        else:
            msg.add_alternative(html_body, subtype="html")
    content = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if list_unsubscribe is not None:  # raw, so that tests can fold it
        content = f"List-Unsubscribe: {list_unsubscribe}\r\n".encode() + content
    return MessageView(content)


def context(
    view: MessageView, kind: MessageKind | None = MessageKind.MARKETING
) -> PolicyContext:
    return PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="news@acme.example",
        received_at=datetime.now(UTC),
        recipients=("jane@example.org",),
        message=view,
        kind=kind,
    )


async def check(view: MessageView, **table: Any) -> Verdict:
    return await policy(**table).check(context(view))


def anchor(text: str, url: str = "https://acme.example/l/8f3a") -> str:
    return f'<p>Shop news.</p><p><a href="{url}">{text}</a></p>'


# -- the exemption and the basic refusal ------------------------------------------


@pytest.mark.parametrize("kind", [MessageKind.TRANSACTIONAL, None])
async def test_transactional_mail_passes_without_reading_the_body(
    kind: MessageKind | None,
) -> None:
    view = message(text="Your receipt. No links at all.\n")
    verdict = await OptOutLink(list_unsubscribe=ListUnsubscribe.REFUSE).check(
        context(view, kind)
    )
    assert verdict.outcome is Outcome.PASS
    assert view._memo == {}  # the body was never extracted


async def test_marketing_without_any_link_is_refused() -> None:
    verdict = await check(message(text="Big sale this weekend!\n"))
    assert (verdict.outcome, verdict.reason) == (Outcome.REFUSE, "optout_link_missing")
    assert verdict.detail == (
        "marketing message has no visible opt-out link (looked for unsubscribe/opt-out "
        "wording in 0 link(s) of the text part(s))"
    )
    assert verdict.figures == {"links": 0.0}


async def test_marketing_with_only_shop_links_is_refused_naming_the_count() -> None:
    view = message(
        text="See https://acme.example/shop\n",
        html_body=anchor("Shop now") + anchor("Our stores"),
    )
    verdict = await check(view)
    assert verdict.reason == "optout_link_missing"
    assert "in 2 link(s) of the HTML part(s)" in verdict.detail


async def test_an_optout_only_in_the_text_alternative_does_not_count() -> None:
    """Readers show the HTML part; an opt-out the reader never sees is none."""
    view = message(
        text="Unsubscribe: https://acme.example/u/1\n",
        html_body=anchor("Shop now"),
    )
    verdict = await check(view)
    assert verdict.reason == "optout_link_missing"
    text_only = await check(message(text="Unsubscribe: https://acme.example/u/1\n"))
    assert text_only.outcome is Outcome.PASS


# -- what counts as an opt-out link ---------------------------------------------


@pytest.mark.parametrize(
    "wording",
    [
        "Unsubscribe",
        "un-subscribe",
        "Opt out",
        "opt-out of these emails",
        "Manage preferences",
        "Update your email preferences",
        # French
        "Se désabonner",
        "Désinscription",
        "se desinscrire",
        # German
        "Abmelden",
        "Newsletter abbestellen",
        "Vom Newsletter austragen",
        "Newsletter-Abmeldung",
        # Spanish
        "Darse de baja",
        "Cancelar suscripción",
        # Portuguese
        "Descadastrar",
        "Cancelar inscrição",
        # Italian
        "Disiscriviti",
        "Annulla l'iscrizione",
        # Dutch
        "Afmelden",
        "Uitschrijven",
        # Nordic, Polish, Czech
        "Avregistrera",
        "Avsluta prenumeration",
        "Afmeld nyhedsbrev",
        "Wypisz się",
        "Odhlásit odběr",
        # case and width do not matter
        "UNSUBSCRIBE",
        "\uff35\uff2e\uff33\uff35\uff22\uff33\uff23\uff32\uff29\uff22\uff25",  # fullwidth,
    ],
)
async def test_opt_out_wording_in_many_languages_passes(wording: str) -> None:
    verdict = await check(message(html_body=anchor(html.escape(wording))))
    assert verdict.outcome is Outcome.PASS, wording


@pytest.mark.parametrize(
    "url",
    [
        "https://acme.example/unsubscribe?u=1",
        "https://acme.example/newsletter/opt-out/8f3a",
        "https://acme.example/email-preferences?id=9",
        "https://list.example/unsub/8f3a",
        "mailto:unsubscribe@acme.example",
        "https://click.example/t?to=https%3A%2F%2Facme.example%2Fabmelden",
    ],
)
async def test_a_link_whose_only_hint_is_its_url_passes(url: str) -> None:
    assert (await check(message(html_body=anchor("Click here", url)))).outcome is (
        Outcome.PASS
    )


async def test_wording_around_a_click_here_link_counts() -> None:
    view = message(
        html_body='<p>To unsubscribe, <a href="https://acme.example/l/1">click here</a>.</p>'
    )
    assert (await check(view)).outcome is Outcome.PASS


async def test_a_plain_text_opt_out_line_with_a_url_passes() -> None:
    view = message(text="News.\n\nUnsubscribe: https://acme.example/l/8f3a\n")
    assert (await check(view)).outcome is Outcome.PASS


async def test_a_plain_text_opt_out_label_on_the_line_before_passes() -> None:
    view = message(
        text="News.\n\nTo opt out of these emails:\nhttps://acme.example/l/1\n"
    )
    assert (await check(view)).outcome is Outcome.PASS


async def test_opt_out_wording_without_a_url_does_not_count() -> None:
    view = message(text="To unsubscribe, reply with STOP.\n")
    assert (await check(view)).reason == "optout_link_missing"


@pytest.mark.parametrize(
    "html_body",
    [
        '<div style="display:none"><a href="https://acme.example/u">Unsubscribe</a></div>',
        '<a href="https://acme.example/unsubscribe"></a>',
        '<a href="https://acme.example/unsubscribe"><img src="spacer.gif"></a>',
        '<a href="#">Unsubscribe</a>',
        '<a href="javascript:void(0)">Unsubscribe</a>',
        '<a name="unsubscribe">Unsubscribe</a>',
        '<p>Unsubscribe</p><script>"<a href=https://acme.example/unsubscribe>x</a>"</script>',
    ],
)
async def test_hidden_empty_or_unusable_links_do_not_count(html_body: str) -> None:
    assert (await check(message(html_body=html_body))).reason == "optout_link_missing"


async def test_an_image_link_with_opt_out_alt_text_counts() -> None:
    view = message(
        html_body='<a href="https://acme.example/l/1"><img src="u.png" alt="Unsubscribe"></a>'
    )
    assert (await check(view)).outcome is Outcome.PASS


async def test_operator_patterns_add_to_the_built_in_ones() -> None:
    view = message(html_body=anchor("Résilier la lettre"))
    assert (await check(view)).reason == "optout_link_missing"
    assert (await check(view, patterns=["résilier", r"stop\s+mails"])).outcome is (
        Outcome.PASS
    )


# -- List-Unsubscribe -------------------------------------------------------------


async def test_add_mode_does_not_refuse_a_missing_header() -> None:
    checker = policy()
    assert checker.adds_list_unsubscribe is True
    verdict = await checker.check(context(message(html_body=anchor("Unsubscribe"))))
    assert verdict.outcome is Outcome.PASS


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "list_unsubscribe_missing"),
        ("https://acme.example/u/1", "list_unsubscribe_invalid"),
        ("<http://acme.example/u/1>", "list_unsubscribe_invalid"),
        ("<>", "list_unsubscribe_invalid"),
        ("<https://acme.example/u/1>", None),
        ("<mailto:leave@acme.example?subject=unsubscribe>", None),
        ("<http://acme.example/u>, <MAILTO:leave@acme.example>", None),
        ("(comment) < https://acme.example/u\r\n /1 >", None),
    ],
)
async def test_refuse_mode_requires_a_usable_list_unsubscribe(
    header: str | None, reason: str | None
) -> None:
    checker = policy(list_unsubscribe="refuse")
    assert checker.adds_list_unsubscribe is False
    view = message(html_body=anchor("Unsubscribe"), list_unsubscribe=header)
    verdict = await checker.check(context(view))
    assert verdict.reason == (reason or "")
    assert verdict.outcome is (Outcome.PASS if reason is None else Outcome.REFUSE)


async def test_refuse_mode_still_requires_the_link() -> None:
    view = message(
        html_body=anchor("Shop"), list_unsubscribe="<https://acme.example/u>"
    )
    verdict = await check(view, list_unsubscribe="refuse")
    assert verdict.reason == "optout_link_missing"


def test_list_unsubscribe_uris_ignore_whitespace_inside_brackets() -> None:
    assert list_unsubscribe_uris(
        "<mailto:a@b.example>, < https://x.example/\n u >"
    ) == [
        "mailto:a@b.example",
        "https://x.example/u",
    ]


# -- settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message_start"),
    [
        ({"colour": "red"}, "colour: unknown key"),
        (
            {"list_unsubscribe": "maybe"},
            "list_unsubscribe: Input should be 'add' or 'refuse'",
        ),
        ({"patterns": "unsubscribe"}, "patterns: "),
        ({"patterns": ["ok", 3]}, "patterns[1]: "),
        ({"patterns": ["ok", "(unclosed"]}, "patterns[1]: invalid regex"),
        ({"patterns": ["x*"]}, "patterns[0]: matches the empty string"),
    ],
)
def test_bad_settings_name_their_key(
    table: Mapping[str, Any], message_start: str
) -> None:
    with pytest.raises(
        ValueError, match="^" + message_start.replace("[", r"\[").replace("(", r"\(")
    ):
        from_table(table, env())


def test_the_registry_builds_it_and_reports_bad_keys_with_their_path() -> None:
    registry = {"optout_link": from_table}
    pipeline = build_pipeline(
        "enforce",
        ("optout_link",),
        {"optout_link": {"mode": "monitor", "list_unsubscribe": "refuse"}},
        lambda _: None,
        env(),
        registry,
    )
    assert pipeline.order == ("optout_link",)
    with pytest.raises(
        PolicyConfigError, match=r"policies\.optout_link: typo: unknown key"
    ):
        build_pipeline(
            "enforce",
            ("optout_link",),
            {"optout_link": {"typo": 1}},
            lambda _: None,
            env(),
            registry,
        )


# -- properties ------------------------------------------------------------------

WORDING = st.sampled_from(
    [
        "Unsubscribe",
        "Se désabonner",
        "Abmelden",
        "Darse de baja",
        "Descadastrar",
        "Disiscriviti",
        "Afmelden",
        "Opt out",
        "Manage preferences",
    ]
)
SAFE_TAGS = [
    "<p>",
    "</p>",
    "<div>",
    "</div>",
    "<b>",
    "</b>",
    "<br>",
    "<td>",
    "</td>",
    "<table>",
    "</table>",
    '<span style="color:red">',
    "</span>",
    "<img src=x>",
]
FRAGMENT = st.one_of(st.text(max_size=40).map(html.escape), st.sampled_from(SAFE_TAGS))


def run(view: MessageView) -> Verdict:
    return asyncio.run(policy().check(context(view)))


@settings(max_examples=120, deadline=None)
@given(st.lists(FRAGMENT, max_size=12), st.lists(FRAGMENT, max_size=12), WORDING)
def test_an_opt_out_anchor_anywhere_always_passes(
    before: list[str], after: list[str], wording: str
) -> None:
    body = "".join(before) + anchor(html.escape(wording)) + "".join(after)
    assert run(message(html_body=body)).outcome is Outcome.PASS


@settings(max_examples=120, deadline=None)
@given(st.text(max_size=300))
def test_text_without_links_always_refuses(text: str) -> None:
    lowered = text.lower()
    assume("http" not in lowered and "mailto:" not in lowered)
    assert run(message(text=text)).reason == "optout_link_missing"


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.!", max_size=30), max_size=6
    )
)
def test_links_without_opt_out_wording_always_refuse(texts: list[str]) -> None:
    for text in texts:
        assume(PATTERN.search(fold(text)) is None)
    links = "".join(
        f'<p><a href="https://acme.example/p/{i}">{text}</a></p>'
        for i, text in enumerate(texts)
    )
    assert run(message(html_body=f"<p>Spring sale</p>{links}")).reason == (
        "optout_link_missing"
    )


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=500), st.booleans())
def test_arbitrary_text_never_raises(text: str, as_html: bool) -> None:
    view = message(html_body=text) if as_html else message(text=text)
    assert run(view).outcome in (Outcome.PASS, Outcome.REFUSE)
    find_optout_link(body_of(view).links, PATTERN)


@pytest.mark.parametrize(
    "html",
    [
        '<a href="https://acme.example/u" style="font-size:0">Unsubscribe</a>',
        '<span style="opacity: 0"><a href="https://acme.example/u">Unsubscribe</a></span>',
        '<a href="https://acme.example/u" style="color:transparent">Unsubscribe</a>',
        '<a href="https:">Unsubscribe</a>',
        '<a href="https:///unsubscribe">Unsubscribe</a>',
        '<a href="mailto:">Unsubscribe</a>',
    ],
)
def test_invisible_or_unfollowable_links_do_not_count(html: str) -> None:
    verdict = run(message(html_body=f"<p>Shop news.</p><p>{html}</p>"))
    assert verdict.reason == "optout_link_missing"


def test_a_link_hidden_by_a_style_rule_does_not_count() -> None:
    hidden = (
        "<style>.fine { display: none } #gone { font-size: 0 }</style>"
        '<p>News.</p><p class="fine"><a href="https://acme.example/u">Unsubscribe</a>'
        '</p><a id="gone" href="https://acme.example/u">Opt out</a>'
    )
    assert run(message(html_body=hidden)).reason == "optout_link_missing"
    # Hidden only on some screens (@media) is still shown on the others.
    responsive = (
        "<style>@media (max-width: 600px) { .desk { display: none } }</style>"
        '<p class="desk"><a href="https://acme.example/u">Unsubscribe</a></p>'
    )
    assert run(message(html_body=responsive)).outcome is Outcome.PASS
