"""A fault-injecting TCP proxy for PostgreSQL, to break a unit of work's connection at chosen moments.

`FaultProxy` listens on a free loopback port and forwards each connection to the target server. It reads
the PostgreSQL wire protocol as it forwards, just enough to find a COMMIT (a simple-query or extended-query
message whose SQL starts with ``COMMIT``) and the server's reply to it, so that a test can cut a connection:

- `CommitCut.DROP`: the COMMIT never reaches the server; nothing commits, the client never hears back;
- `CommitCut.BEFORE_REPLY`: the COMMIT reaches the server and commits; its reply never reaches the client;
- `CommitCut.AFTER_REPLY`: the reply is forwarded, then the connection is cut (it dies idle, in the pool).

Besides: `cut_all` (every open connection, now), `half_open` (stop forwarding one direction, sockets kept
open), `blackhole` (forward nothing, connect nothing upstream), `refuse` (stop listening: connects are
refused) and `heal` (back to normal, for the connections open and those to come).

The proxy answers a client's SSLRequest (and GSSENCRequest) with ``N`` itself, so the stream it reads is
always plaintext. It runs on the loop of whoever starts it, which must keep running (never block it on a
thread's join) while clients use it; the clients may be on any loop, thread or process::

    async with FaultProxy("127.0.0.1", 5432) as proxy:
        engine = create_async_engine(proxy.url(database_url))
        proxy.cut_at_commit(CommitCut.BEFORE_REPLY)
        ...
        await proxy.commit_cut.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import struct
from collections import Counter
from typing import TYPE_CHECKING, Literal, Self

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["CommitCut", "Direction", "FaultProxy"]

Direction = Literal["to_server", "to_client"]
"""One direction of a proxied connection: the client's bytes to the server, or the server's to the client."""

_NEGOTIATIONS = frozenset({80877103, 80877104})  # SSLRequest, GSSENCRequest: answered "N" by the proxy
_READ = 65536


class CommitCut(enum.Enum):
    """Where `FaultProxy.cut_at_commit` cuts a connection that sends a COMMIT."""

    DROP = "drop"
    """The COMMIT is not forwarded: nothing commits, and the client's COMMIT fails."""
    BEFORE_REPLY = "before_reply"
    """The COMMIT is forwarded and the server's reply (up to ReadyForQuery) swallowed: it committed, unseen."""
    AFTER_REPLY = "after_reply"
    """The reply is forwarded, then the connection is cut: it committed, and the connection is dead."""


class _Frames:
    """Splits one direction of the PostgreSQL protocol into whole messages (type byte, length, payload)."""

    def __init__(self, *, startup: bool) -> None:
        self._buffer = bytearray()
        self._startup = startup  # the client's first messages carry no type byte

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Return the (type, whole message bytes) completed by ``data``; type is b"" for startup ones."""
        self._buffer += data
        frames: list[tuple[bytes, bytes]] = []
        while True:
            offset = 0 if self._startup else 1
            if len(self._buffer) < offset + 4:
                return frames
            (length,) = struct.unpack_from("!i", self._buffer, offset)
            if length < 4:
                raise ConnectionError(f"not the PostgreSQL protocol: a message of length {length}")
            end = offset + length
            if len(self._buffer) < end:
                return frames
            frame = bytes(self._buffer[:end])
            del self._buffer[:end]
            if self._startup:
                (code,) = struct.unpack_from("!i", frame, 4)
                self._startup = code in _NEGOTIATIONS  # only a StartupMessage ends the untyped phase
                frames.append((b"", frame))
            else:
                frames.append((frame[:1], frame))


def _is_commit(kind: bytes, frame: bytes) -> bool:
    """Whether a client message runs COMMIT: a Query ('Q') or a Parse ('P') of a COMMIT statement."""
    if kind == b"Q":
        sql = frame[5:]
    elif kind == b"P":
        name_end = frame.index(b"\x00", 5)
        sql = frame[name_end + 1 :]
    else:
        return False
    return sql.lstrip().upper().startswith(b"COMMIT")


class _Link:
    """One proxied connection: the client's socket, the server's, and the faults armed on it."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.swallow = False  # the server's messages are dropped until its ReadyForQuery, then the link is cut
        self.cut_after_reply = False  # the link is cut once the server's ReadyForQuery is forwarded

    def cut(self) -> None:
        """Reset both sockets at once."""
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()

    async def to_server(self, reader: asyncio.StreamReader) -> None:
        frames = _Frames(startup=True)
        while data := await reader.read(_READ):
            out = bytearray()
            for kind, frame in frames.feed(data):
                if not kind and struct.unpack_from("!i", frame, 4)[0] in _NEGOTIATIONS:
                    self.client.write(b"N")  # refuse encryption: the proxy must read the stream
                    continue
                if _is_commit(kind, frame) and (how := self.proxy._take_commit_cut()) is not None:
                    if how is CommitCut.DROP:
                        self.proxy._record("commit_dropped")
                        self.proxy.commit_cut.set()
                        self.cut()
                        return
                    self.swallow = how is CommitCut.BEFORE_REPLY
                    self.cut_after_reply = how is CommitCut.AFTER_REPLY
                out += frame
            if out and self.proxy._forwards("to_server") and self.server is not None:
                self.server.write(bytes(out))
                await self.server.drain()

    async def to_client(self, reader: asyncio.StreamReader) -> None:
        frames = _Frames(startup=False)
        while data := await reader.read(_READ):
            out = bytearray()
            cut_now = False
            for kind, frame in frames.feed(data):
                if self.swallow:
                    if kind == b"Z":
                        self.proxy._record("commit_reply_swallowed")
                        cut_now = True
                        break
                    continue
                out += frame
                if self.cut_after_reply and kind == b"Z":
                    self.proxy._record("cut_after_commit_reply")
                    cut_now = True
                    break
            if out and self.proxy._forwards("to_client"):
                self.client.write(bytes(out))
                await self.client.drain()
            if cut_now:
                self.proxy.commit_cut.set()
                self.cut()
                return


class FaultProxy:
    """A TCP proxy in front of PostgreSQL that cuts, silences or refuses connections on command.

    Use it as ``async with FaultProxy(host, port) as proxy``; `url` rewrites a database URL to go through it.
    Every fault applies until `heal` (the COMMIT cut: to the next ``times`` COMMITs). ``faults`` counts
    what was injected, by name; ``commit_cut`` is set once a COMMIT cut has happened.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.faults: Counter[str] = Counter()
        self.commit_cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._blocked: set[Direction] = set()
        self._blackhole = False
        self._commit_cuts: list[CommitCut] = []

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        """A proxy in front of the server of the database ``url``."""
        parsed = make_url(url)
        return cls(parsed.host or "127.0.0.1", parsed.port or 5432)

    def url(self, url: str) -> str:
        """Return the database ``url`` pointing at the proxy instead of its server."""
        return make_url(url).set(host=self.host, port=self.port).render_as_string(hide_password=False)

    async def __aenter__(self) -> Self:
        await self._listen()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        server = self._server
        self._stop_listening()
        self.cut_all(count=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # -- faults -------------------------------------------------------------------------------------------

    def cut_all(self, *, count: bool = True) -> int:
        """Reset every open connection now; return how many were cut."""
        links = list(self._links)
        for link in links:
            link.cut()
        if count and links:
            self._record("cut", len(links))
        return len(links)

    def cut_at_commit(self, how: CommitCut, *, times: int = 1) -> None:
        """Cut the connection of each of the next ``times`` COMMITs, as ``how`` says (see `CommitCut`)."""
        self.commit_cut.clear()
        self._commit_cuts.extend([how] * times)

    def half_open(self, direction: Direction) -> None:
        """Stop forwarding ``direction`` on every connection, open and new; the sockets stay open."""
        self._blocked.add(direction)
        self._record(f"half_open_{direction}")

    def blackhole(self) -> None:
        """Forward nothing, either way; new connections are accepted and never reach the server."""
        self._blackhole = True
        self._record("blackhole")

    def refuse(self) -> None:
        """Stop listening: new connects are refused (open connections go on). `heal` listens again."""
        self._stop_listening()
        self._record("refuse")

    async def heal(self) -> None:
        """Undo every fault: forward both ways, accept connects again, forget armed COMMIT cuts."""
        self._blocked.clear()
        self._blackhole = False
        self._commit_cuts.clear()
        if self._server is None:
            await self._listen()

    # -- the plumbing -------------------------------------------------------------------------------------

    def _record(self, fault: str, n: int = 1) -> None:
        self.faults[fault] += n

    def _forwards(self, direction: Direction) -> bool:
        return not self._blackhole and direction not in self._blocked

    def _take_commit_cut(self) -> CommitCut | None:
        return self._commit_cuts.pop(0) if self._commit_cuts else None

    async def _listen(self) -> None:
        # Listening again after `refuse` reuses the port, so URLs handed out stay valid.
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # not wait_closed(): from Python 3.12 on it waits for the open connections too

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        link = _Link(self, client_writer)
        self._links.add(link)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._blackhole:
                while await client_reader.read(_READ):
                    pass  # accepted, and nothing goes anywhere
                return
            try:
                server_reader, link.server = await asyncio.open_connection(*self.target)
            except OSError:
                return
            pumps = [
                asyncio.ensure_future(link.to_server(client_reader)),
                asyncio.ensure_future(link.to_client(server_reader)),
            ]
            # Either side closing ends the link: the other is closed too, as a real network path would be.
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pending:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
            link.cut()
            with contextlib.suppress(Exception):
                client_writer.close()
