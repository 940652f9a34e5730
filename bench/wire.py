"""A lean HTTP/1.1 client for the load generators: requests written straight to keep-alive
sockets, answers read by an asyncio protocol that looks only at what a load test needs (the
status, the headers, the body's length).

httpx costs about a millisecond of this process's CPU a request: at a few hundred requests a
second the load generator used more CPU than the server it measured, and its own backlog was
charged to the server as latency. This client costs a few tens of microseconds a request, so
what a bench prints is the server's time, not the generator's.

It speaks only to the site the benches start (one loopback host, answers with a
Content-Length or chunked), and is not a general client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from json import dumps, loads

import httpx

HEAD_END = b"\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"


NO_BODY = (204, 304)  # answers that never have a body (a 1xx is not awaited here)


class WireError(ConnectionError):
    """The server closed the connection, or answered in a way this client does not read."""


@dataclass
class Sent:
    method: str
    path: str


class Answer:
    """What the server answered: enough of httpx.Response for the benches."""

    def __init__(self, request: Sent, status_code: int, head: bytes, body: bytes) -> None:
        self.request = request
        self.status_code = status_code
        self.content = body
        self._head = head
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {}
            for line in self._head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                self._headers[name.strip().lower().decode("latin-1")] = value.strip().decode(
                    "latin-1"
                )
        return self._headers

    def json(self):
        return loads(self.content)


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        lower = head.lower()
        start = end + len(HEAD_END)
        status = int(head[9:12])
        at = lower.find(b"\r\ncontent-length:")
        if status in NO_BODY:  # whatever its headers say (RFC 9112, 6.3)
            body, rest = b"", start
        elif at >= 0:
            stop = lower.find(b"\r\n", at + 2)
            length = int(lower[at + 17 : stop if stop >= 0 else None])
            if len(self.buffer) < start + length:
                return
            body = bytes(self.buffer[start : start + length])
            rest = start + length
        elif b"\r\ntransfer-encoding: chunked" in lower:
            done = self.buffer.find(CHUNKED_END, start)
            if done < 0:
                return
            body = bytes(self.buffer[start:done])  # chunk sizes left in: only its size counts
            rest = done + len(CHUNKED_END)
        else:
            self.waiter.set_exception(WireError("an answer with neither length nor chunks"))
            return
        del self.buffer[:rest]
        if b"\r\nconnection: close" in lower:
            self.keep_alive = False
        self.waiter.set_result((status, head, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(WireError("the server closed the connection"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Wire:
    """Requests to one ``http://host:port`` over a pool of keep-alive connections: an idle
    one if there is one, else a new one (open loop: as many as requests in flight)."""

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None) -> None:
        url = httpx.URL(base_url)
        self.host, self.port = url.host, url.port or 80
        self.headers = dict(headers or {})
        self.idle: list[Connection] = []

    async def _connection(self) -> Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(Connection, self.host, self.port)
        return connection

    def encode(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in {**self.headers, **headers}.items()]
        if body or method not in ("GET", "HEAD"):
            lines.append(f"content-length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        json: object | None = None,
    ) -> Answer:
        headers = dict(headers or {})
        body = b""
        if json is not None:
            body = dumps(json).encode()
            headers["content-type"] = "application/json"
        raw = self.encode(method, path, headers, body)
        connection = await self._connection()
        loop = asyncio.get_running_loop()
        connection.waiter = loop.create_future()
        assert connection.transport is not None
        connection.transport.write(raw)
        try:
            status, head, content = await connection.waiter
        except BaseException:
            # cancelled (a timeout) or lost mid-answer: this connection's state is unknown
            connection.close()
            raise
        connection.waiter = None
        if connection.keep_alive and not connection.closed:
            self.idle.append(connection)
        else:
            connection.close()
        return Answer(Sent(method, path), status, head, content)

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Answer:
        return await self.request("GET", path, headers)

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


def signed_in_as(client: httpx.AsyncClient, wire: Wire) -> Wire:
    """``wire`` sending the session cookie ``client`` got by signing in."""
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    wire.headers["cookie"] = cookie
    return wire
