"""Pass-through reference: the ceiling of the aiosmtpd + aiosmtplib stack.

``python bench/passthrough.py --upstream 127.0.0.1:PORT --pool 16``

A bare aiosmtpd server whose ``handle_DATA`` forwards each message at once with
aiosmtplib over a pool of persistent upstream connections, and replies 250 only
after the upstream accepted it. No queue, no policy, no disk. It accepts AUTH PLAIN
(or LOGIN) over cleartext with any credentials, so that the load generator can treat
it like the relay. Prints ``LISTENING <port>`` on stdout once it accepts
connections; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


def _accept_any(*_args: Any) -> AuthResult:
    return AuthResult(success=True)


class Forwarder:
    """``handle_DATA``: forward over a pooled upstream connection, then reply."""

    def __init__(self, host: str, port: int, pool_size: int) -> None:
        self.host = host
        self.port = port
        self.pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self.clients: list[aiosmtplib.SMTP] = []
        for _ in range(pool_size):
            client = aiosmtplib.SMTP(
                hostname=host,
                port=port,
                start_tls=False,
                timeout=60,
                local_hostname="passthrough.bench.test",
            )
            self.clients.append(client)
            self.pool.put_nowait(client)

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        client = await self.pool.get()
        try:
            if not client.is_connected:
                await client.connect()
            await client.sendmail(
                envelope.mail_from or "",
                envelope.rcpt_tos,
                envelope.original_content or b"",
            )
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                return f"{exc.code} 5.0.0 upstream: {exc.message}"
            await _drop(client)
            return f"451 4.4.0 upstream: {exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError) as exc:
            await _drop(client)
            return f"451 4.4.1 upstream unavailable: {type(exc).__name__}"
        finally:
            self.pool.put_nowait(client)
        return "250 2.0.0 OK: forwarded"

    async def close(self) -> None:
        for client in self.clients:
            if client.is_connected:
                with contextlib.suppress(Exception):
                    await client.quit()


async def _drop(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()


async def serve(listen_host: str, listen_port: int, upstream: str, pool: int) -> None:
    up_host, _, up_port = upstream.rpartition(":")
    handler = Forwarder(up_host, int(up_port), pool)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="passthrough.bench.test",
            auth_require_tls=False,
            auth_required=False,
            authenticator=_accept_any,
        )

    server = await loop.create_server(factory, listen_host, listen_port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await handler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (0: any)")
    parser.add_argument("--upstream", required=True, help="host:port of the sink")
    parser.add_argument("--pool", type=int, default=16, help="upstream connections")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port), args.upstream, args.pool))


if __name__ == "__main__":
    main()
