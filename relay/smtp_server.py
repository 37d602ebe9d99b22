"""The SMTP listener: aiosmtpd's protocol on the main loop, set up for a smarthost.

:class:`RelaySMTP` adjusts aiosmtpd where a production relay must differ: every
reply carries an enhanced status code, sessions bind their log context and are
counted, a refused DATA (too large, over-long line) still ends its transaction, and
a reply can close the connection after it is sent (draining). :class:`SmtpListener`
owns the listening socket.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, SMTP

from config.models import ServerConfig
from relay.feedback_reports import MAX_REPORT_BYTES
from relay.replies import SmtpReply, protocol_error_reason, with_enhanced_code
from relay.smtp_handler import RelayHandler, RelaySession

log = structlog.get_logger(__name__)

_DATA_CHUNK = 1024 * 1024
_UNLIMITED = 2**62

# A client that sends more than this many commands of one kind in a session is cut
# off (aiosmtpd's command_call_limit applies per command; "*" is every other one).
_CALL_LIMITS = {
    "*": 100,
    "AUTH": 10,
    "EHLO": 50,
    "HELO": 50,
    "STARTTLS": 2,
    "NOOP": 1_000_000,
    "RSET": 1_000_000,
    "MAIL": 1_000_000,
    "RCPT": 10_000_000,
    "DATA": 1_000_000,
    "QUIT": 1,
}


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with the relay's adjustments."""

    def __init__(self, handler: RelayHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.relay_handler = handler
        self._raw_replies = False
        self.last_reply = ""

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    @property
    def tls_active(self) -> bool:
        """True once STARTTLS has completed on this connection."""
        return self._tls_protocol is not None

    def close_after_reply(self) -> None:
        """Close the connection once the reply now being sent has been written."""
        self.loop.call_soon(self._close_transport)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: str | bytes) -> None:
        """Send a reply, adding an enhanced status code where aiosmtpd left none."""
        if isinstance(status, bytes):
            await super().push(status)
            return
        if not self._raw_replies and status[:1] in ("4", "5"):
            reason = protocol_error_reason(status)
            if reason is not None:
                self.relay_handler.protocol_error(reason, status)
        if not self._raw_replies:
            status = with_enhanced_code(status)
        self.last_reply = status
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:  # noqa: N802 - aiosmtpd's name
        """EHLO lines carry no enhanced codes (RFC 2034 §3)."""
        self._raw_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:  # noqa: N802
        """HELO's reply carries no enhanced code either."""
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    async def handle_exception(self, error: Exception) -> str:
        """Faults answer 451 4.3.0 naming the session (never aiosmtpd's 500 + text)."""
        session = self.session if isinstance(self.session, RelaySession) else None
        reply = self.relay_handler.fault(session, error)
        if self.envelope is not None and session is not None:
            # A half-done transaction must not be continued (as RSET does).
            self.envelope = self._create_envelope()
        return reply

    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802
        """Run MAIL; count aiosmtpd's own refusals (SIZE) like the handler's."""
        await super().smtp_MAIL(arg)
        session = self.session
        if isinstance(session, RelaySession) and session.transaction is None:
            self.relay_handler.mail_refused_by_protocol(session, self.last_reply)

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        """Run DATA; if the data was refused before the hook, end the transaction."""
        await self._read_data(arg)
        session = self.session
        if isinstance(session, RelaySession) and session.transaction is not None:
            code = self.last_reply[:3]
            if code not in {"354", "503", "501", "530"}:
                self.relay_handler.data_refused_by_protocol(session, self.last_reply)

    async def _read_data(self, arg: str) -> None:
        """DATA, read in a few large pieces rather than line by line.

        aiosmtpd reads DATA one line at a time, which is most of its cost per
        message. This reads up to each ``.<CRLF>`` and accepts only
        ``<CRLF>.<CRLF>`` (or a lone ``.<CRLF>`` first) as the end of data, exactly
        as RFC 5321 §4.1.1.4 says; anything with a bare CR or LF is refused later by
        the handler, so no smuggled end-of-data can pass. The size limit is applied
        while reading, with the rest of the data discarded.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        if envelope is None or not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or _UNLIMITED
        session = self.session
        if (
            isinstance(session, RelaySession)
            and session.transaction is not None
            and session.transaction.channel is not None
        ):
            # Feedback for the relay itself: reports are small, and larger ones
            # are not read (MAX_REPORT_BYTES); nobody had to log in to send it.
            limit = min(limit, MAX_REPORT_BYTES)
        reader = self._reader
        data = bytearray()
        too_much = False
        # The stream's line limit (1001 octets, for commands) is widened for this
        # read only; StreamReader has no public way to read past it.
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = _DATA_CHUNK  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    chunk = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    chunk = await reader.readexactly(exc.consumed)
                except asyncio.IncompleteReadError:
                    self._close_transport()  # the client went away mid-DATA
                    return
                if too_much:
                    # Keep only enough to recognise the terminator.
                    data = data[-4:]
                data += chunk
                if data == b".\r\n" or data.endswith(b"\r\n.\r\n"):
                    break
                if not too_much and len(data) > limit + 3:
                    too_much = True
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if too_much:
            await self.push("552 Error: Too much mail data")
            self.envelope = self._create_envelope()
            return
        # Drop the terminator (keeping the CRLF that ends the last line), then
        # undo dot-stuffing: one leading "." comes off every line (§4.5.2).
        content = bytes(data[:-3])
        if content.startswith(b"."):
            content = content[1:]
        content = content.replace(b"\r\n.", b"\r\n")
        envelope.content = content
        envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push("250 OK" if status is MISSING else status)

    async def _handle_client(self) -> None:
        session = self.session
        if not isinstance(session, RelaySession):  # pragma: no cover - set by aiosmtpd
            return
        refusal: SmtpReply | None = self.relay_handler.session_opened(self, session)
        if refusal is not None:
            await self.push(refusal.render())
            self._close_transport()
            return
        try:
            await super()._handle_client()
        finally:
            self.relay_handler.session_closed(self, session)


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SmtpListener:
    """The listening socket for mailers; one :class:`RelaySMTP` per connection."""

    def __init__(
        self, config: ServerConfig, handler: RelayHandler, host: str, port: int
    ) -> None:
        self._config = config
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._tls = _tls_context(config)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> RelaySMTP:
        cfg = self._config
        return RelaySMTP(
            self._handler,
            hostname=cfg.hostname,
            ident="ESMTP compliance-relay",
            data_size_limit=cfg.max_message_size_bytes,
            enable_SMTPUTF8=cfg.smtputf8,
            decode_data=False,
            tls_context=self._tls,
            require_starttls=cfg.require_tls,
            timeout=cfg.idle_timeout_seconds,
            auth_required=False,
            auth_require_tls=not cfg.allow_cleartext_auth,
            auth_exclude_mechanism=["CRAM-MD5"],
            command_call_limit=_CALL_LIMITS,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host=self._host, port=self._port, reuse_address=True
        )
        log.info(
            "smtp_listening", host=self._host, port=self.port, tls=self._tls is not None
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; open sessions carry on."""
        if self._server is not None:
            self._server.close()
