"""The probe's own TCP proxy, which loses a response in transit.

It listens on loopback, forwards each HTTP/1.1 request to the target (the one host and port the probe was
given, with the target's ``Host``), and reads the target's answer whole. It then keeps the answer and
closes the client's connection without a byte of it: the target did its work and sent its answer, and the
client never got it, as when a load balancer or a mobile network drops a connection at the wrong moment.
"""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, TypeVar

import anyio
import h11
from anyio.abc import SocketAttribute

from ._probe_http import Answer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx
    from anyio.abc import ByteStream, SocketStream

__all__ = ["LosingProxy", "losing_proxy"]

Head = TypeVar("Head", h11.Request, h11.Response)
_HOP_BY_HOP = {b"host", b"connection", b"keep-alive", b"proxy-connection"}


class LosingProxy:
    """A running proxy: its port, and the answers it lost."""

    def __init__(self, target: httpx.URL) -> None:
        self.target = target
        self.lost: list[Answer] = []
        self.port = 0

    async def handle(self, client: SocketStream) -> None:
        """Forward the request on ``client``'s connection, and lose its answer."""
        async with client:
            incoming = h11.Connection(h11.SERVER)
            head, body = await _read(client, incoming, h11.Request)
            tls = ssl.create_default_context() if self.target.scheme == "https" else None
            port = self.target.port or (443 if tls else 80)
            connecting = (
                anyio.connect_tcp(self.target.host, port)
                if tls is None
                else anyio.connect_tcp(self.target.host, port, ssl_context=tls, tls_standard_compatible=False)
            )
            async with await connecting as upstream:
                outgoing = h11.Connection(h11.CLIENT)
                headers = [(n, v) for n, v in head.headers if n.lower() not in _HOP_BY_HOP]
                headers += [(b"host", self.target.netloc), (b"connection", b"close")]
                request = h11.Request(method=head.method, target=head.target, headers=headers)
                await upstream.send(outgoing.send(request) + outgoing.send(h11.Data(data=body)))
                await upstream.send(outgoing.send(h11.EndOfMessage()) or b"")
                answer, answer_body = await _read(upstream, outgoing, h11.Response)
            seen = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in answer.headers}
            self.lost.append(Answer(answer.status_code, seen, answer_body))
            # Leaving closes the client's connection: the answer was sent in full, and it is lost.


async def _read(stream: ByteStream, connection: h11.Connection, kind: type[Head]) -> tuple[Head, bytes]:
    """Read one whole message of ``kind`` (its head, then its body to the end) from ``stream``."""
    head: Head | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                data = b""
            connection.receive_data(data)
        elif isinstance(event, kind):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return head, bytes(body)
        elif isinstance(event, h11.InformationalResponse):
            continue
        else:
            raise ConnectionError(f"the connection closed before a whole {kind.__name__.lower()} arrived")


@asynccontextmanager
async def losing_proxy(target: httpx.URL) -> AsyncIterator[LosingProxy]:
    """Run a `LosingProxy` in front of ``target`` on 127.0.0.1, on a free port, for the ``with`` block."""
    proxy = LosingProxy(target)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def handle(client: SocketStream) -> None:
        # On any failure the client sees its connection close, which is what a broken proxy looks like.
        with suppress(OSError, ConnectionError, h11.ProtocolError, anyio.BrokenResourceError):
            await proxy.handle(client)

    async with listener, anyio.create_task_group() as group:
        proxy.port = listener.extra(SocketAttribute.local_port)
        group.start_soon(listener.serve, handle)
        try:
            yield proxy
        finally:
            group.cancel_scope.cancel()
