"""A capture upstream: an aiosmtpd sink on loopback that records what it receives.

Tests tell it how to answer, per recipient (``rcpt_replies``) or for the data
(``data_reply``), and read back ``messages`` (envelope and exact bytes) and the
number of ``connections`` it saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    """One message as the upstream got it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class CaptureUpstream:
    """Records envelopes; answers per recipient as told."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str | list[str]] = field(default_factory=dict)
    """Recipient -> reply line, or a list of lines used one per attempt (last repeats)."""
    data_reply: str | None = None
    """Reply to DATA for every message except null-sender ones (DSNs get through)."""
    connections: int = 0
    authenticator: Callable[..., Any] | None = None
    """An aiosmtpd authenticator; when set, AUTH is offered over cleartext."""
    commands: list[str] = field(default_factory=list)
    refused_sender_domains: set[str] = field(default_factory=set)
    """MAIL FROM at these domains gets ``553 5.7.1`` (an unverified sender)."""
    _server: asyncio.AbstractServer | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _attempts: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The ``smtp://`` URL for ``[upstream] url``."""
        return f"smtp://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (on ``port``, or a free one when it is 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _CountingSMTP(
                self,
                _Handler(self),
                enable_SMTPUTF8=True,
                hostname="upstream.test",
                loop=loop,
                authenticator=self.authenticator,
                auth_require_tls=False,
            ),
            host=self.host,
            port=self.port,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop connections."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def reply_for(self, rcpt: str) -> str | None:
        """The programmed reply for this attempt at ``rcpt``, if any."""
        programmed = self.rcpt_replies.get(rcpt)
        if programmed is None:
            return None
        if isinstance(programmed, str):
            return programmed
        n = self._attempts.get(rcpt, 0)
        self._attempts[rcpt] = n + 1
        return programmed[min(n, len(programmed) - 1)]

    async def record(self, received: Received) -> None:
        """Store a message and wake waiters."""
        async with self._arrived:
            self.messages.append(received)
            self._arrived.notify_all()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` messages arrived (bounded by ``timeout``)."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.messages) >= count)
        return self.messages

    def to(self, address: str) -> list[Received]:
        """Messages that had ``address`` among their recipients."""
        return [m for m in self.messages if address in m.rcpt_tos]


class _CountingSMTP(SMTP):
    def __init__(self, owner: CaptureUpstream, handler: object, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        owner.connections += 1
        self._owner = owner

    async def smtp_RSET(self, arg: str) -> None:  # noqa: N802
        self._owner.commands.append("RSET")
        await super().smtp_RSET(arg)


class _Handler:
    def __init__(self, owner: CaptureUpstream) -> None:
        self._owner = owner

    async def handle_MAIL(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if address.rpartition("@")[2] in self._owner.refused_sender_domains:
            return "553 5.7.1 Sender address rejected: not owned by you"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._owner.reply_for(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        reply = self._owner.data_reply
        if (
            reply is not None
            and not reply.startswith("2")
            and envelope.mail_from != "<>"
        ):
            return reply
        await self._owner.record(
            Received(
                mail_from=""
                if envelope.mail_from == "<>"
                else envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content or b"",
                mail_options=list(envelope.mail_options),
            )
        )
        return "250 2.0.0 OK: captured"


Factory = Callable[[], CaptureUpstream]
