"""Fallback counting SMTP sink, used only when Postfix's smtp-sink is not installed.

``python bench/pysink.py 127.0.0.1:PORT``: accepts every message, discards it and
writes ``sess=N quit=N mesg=N\\r`` to stdout after each one, like ``smtp-sink -c``.
A bare asyncio protocol (no aiosmtpd) so that it stays far from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import os
import sys


class _Counters:
    sess = 0
    quit = 0
    mesg = 0

    @classmethod
    def emit(cls) -> None:
        line = f"sess={cls.sess} quit={cls.quit} mesg={cls.mesg}\r".encode()
        os.write(1, line)


class SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.bench.test ESMTP pysink\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        _Counters.sess += 1
        _Counters.emit()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = buf.find(b"\r\n.\r\n")
                if end < 0:
                    # Keep only what could still hold the start of the terminator.
                    buf = buf[-4:]
                    break
                buf = buf[end + 5 :]
                self.in_data = False
                _Counters.mesg += 1
                _Counters.emit()
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.bench.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.in_data = True
                buf = b"\r\n" + buf  # the terminator may follow at once
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                _Counters.quit += 1
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


async def main(addr: str) -> None:
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, int(port), backlog=256)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
