"""Small SMTP client helpers for tests: a raw line client for byte-exact input."""

from __future__ import annotations

import asyncio
import base64
import contextlib


class RawClient:
    """Speaks SMTP line by line over a plain socket, sending bytes exactly as given.

    smtplib and aiosmtplib repair line endings; smuggling tests need the raw bytes.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        """Connect and read the greeting."""
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        await client.reply()
        return client

    async def reply(self, timeout: float = 10.0) -> str:
        """Read one (possibly multi-line) reply; return it joined with newlines."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("server closed the connection")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text)
                if len(text) < 4 or text[3] != "-":
                    return "\n".join(lines)

    async def cmd(self, line: str | bytes) -> str:
        """Send one command line (CRLF added) and read the reply."""
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def login(self, user: str, password: str) -> str:
        """EHLO and AUTH PLAIN."""
        await self.cmd("EHLO raw.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {token}")

    async def send_data(self, payload: bytes) -> str:
        """DATA, then ``payload`` exactly (it must carry its own terminator)."""
        reply = await self.cmd("DATA")
        assert reply.startswith("354"), reply
        self.writer.write(payload)
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        """Drop the connection."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
