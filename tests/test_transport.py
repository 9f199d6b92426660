"""The providers' HTTP transport against real local servers: framing, keep-alive,
a connection the server closed in the pool, timeouts as httpx's exceptions, TLS,
and the SDK's default transport kept when a proxy is configured."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest

from worker.providers.transport import StreamTransport, body_of, lean_http_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on a free port; yields the port and the count of connections made."""
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=tls)
    async with server:
        yield server.sockets[0].getsockname()[1], connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def client(timeout: float = 5) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=StreamTransport(), timeout=timeout)


def test_chunked_and_sized_bodies_and_keep_alive() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if b"/chunked" in request:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for piece in (b"data: one\n\n", b"data: two\n\n"):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")
            else:
                body = request.split(b"\r\n\r\n", 1)[1]
                writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n" % len(body))
                writer.write(body)
            await writer.drain()

    async def scenario() -> None:
        async with serve(handler) as (port, connections), client() as http:
            base = f"http://127.0.0.1:{port}"
            async with http.stream("POST", base + "/chunked", json={"a": 1}) as response:
                assert response.status_code == 200
                pieces = [piece async for piece in response.aiter_raw()]
            assert pieces == [b"data: one\n\n", b"data: two\n\n"]
            echoed = await http.post(base + "/echo", content=b"hello")
            assert (echoed.status_code, echoed.content) == (201, b"hello")
            assert len(connections) == 1  # both on one kept-alive connection

    asyncio.run(scenario())


_CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"b;ext=1\r\ndata: one\n\n\r\n"
    + b"B\r\ndata: two\n\n\r\n"
    + b"%x\r\n%s\r\n" % (100_000, b"x" * 100_000)
    + b"0\r\nx-trailer: yes\r\n\r\n"
)


@pytest.mark.parametrize("split", [1, 2, 3, 7, 4096, len(_CHUNKED)])
def test_a_chunked_body_cut_anywhere_between_reads_reads_whole(split: int) -> None:
    """The body read off the connection (`body_of`, what the providers read) is
    the chunks' data however the framing falls across network reads: sizes with
    extensions, a chunk larger than a read, trailers; the connection is reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            # The framing (the first and last bytes) `split` bytes a write, the
            # large chunk's data between in blocks.
            cuts = [*range(0, 100, split), *range(100, len(_CHUNKED) - 100, 8192)]
            cuts += range(len(_CHUNKED) - 100, len(_CHUNKED), split)
            for at, end in zip(cuts, [*cuts[1:], len(_CHUNKED)], strict=True):
                writer.write(_CHUNKED[at:end])
                await writer.drain()
                if split < 16:
                    await asyncio.sleep(0.001)  # a read each

    async def scenario() -> None:
        async with serve(handler) as (port, connections), client() as http:
            for _ in range(2):
                async with http.stream("GET", f"http://127.0.0.1:{port}/") as response:
                    body = body_of(response)
                    assert body is not None
                    pieces = [piece async for piece in body.pieces()]
                    assert body_of(response) is None  # read once only
                    with pytest.raises(httpx2.StreamConsumed):
                        await anext(body.pieces())
                assert b"".join(pieces) == b"data: one\n\ndata: two\n\n" + b"x" * 100_000
            assert len(connections) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"zz\r\nabc\r\n0\r\n\r\n", "not a hex number"),
        (b"-3\r\nabc\r\n0\r\n\r\n", "not a hex number"),
        (b"0x3\r\nabc\r\n0\r\n\r\n", "not a hex number"),
        (b"-0\r\n\r\n", "not a hex number"),
        (b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "not a hex number"),
        (b"1" * 5000 + b"\r\n", "too long"),
        (b"3\r\nabcd\r\n0\r\n\r\n", "did not end with CRLF"),
        (b"3\r\nabc\r\n", "ended early"),
        (b"1" * 5000, "too long"),
    ],
)
def test_a_chunked_body_framed_wrong_is_a_protocol_error(body: bytes, error: str) -> None:
    async def check(response: httpx2.Response) -> None:
        read = body_of(response)
        assert read is not None
        with pytest.raises(httpx2.RemoteProtocolError, match=error):
            [piece async for piece in read.pieces()]

    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    asyncio.run(_one_response(head + body, check))


def test_bytes_after_a_chunked_body_are_never_read_as_the_next_response() -> None:
    """A server that sends more than its response (here a whole second response,
    in the same write as the last chunk) leaves the connection out of use: the
    next request goes on a new one and gets the server's answer to it, not the
    bytes that came early."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n"
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly"
            )
            await writer.drain()

    async def scenario() -> None:
        async with serve(handler) as (port, connections), client() as http:
            for _ in range(2):
                async with http.stream("GET", f"http://127.0.0.1:{port}/") as response:
                    body = body_of(response)
                    assert body is not None
                    assert [piece async for piece in body.pieces()] == [b"first"]
            assert len(connections) == 2

    asyncio.run(scenario())


def test_bytes_sent_to_an_idle_connection_are_never_read_as_the_next_response() -> None:
    """A server that writes to a connection after its response, unasked (here a
    whole response, a moment later): the connection is not used again, and the
    next request gets the server's answer to it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
            await writer.drain()

    async def scenario() -> None:
        async with serve(handler) as (port, connections), client() as http:
            for _ in range(2):
                response = await http.get(f"http://127.0.0.1:{port}/")
                assert response.content == b"first"
                await asyncio.sleep(0.2)  # the unasked bytes arrive meanwhile
            assert len(connections) == 2

    asyncio.run(scenario())


def test_a_body_with_a_content_coding_is_left_to_httpx() -> None:
    """A compressed body is not read off the connection as it is: httpx undoes
    the coding."""
    packed = gzip.compress(b"data: one\n\n")

    async def check(response: httpx2.Response) -> None:
        assert body_of(response) is None
        assert await response.aread() == b"data: one\n\n"

    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
    asyncio.run(_one_response(head % len(packed) + packed, check))


def test_a_body_that_stalls_before_its_trailers_times_out() -> None:
    """The idle timeout covers the wait for the trailers after the last chunk
    too: the read raises httpx's ReadTimeout, not a hang."""

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def scenario() -> None:
        async with (
            serve(stall) as (port, _),
            client(timeout=0.3) as http,
            http.stream("GET", f"http://127.0.0.1:{port}/") as response,
        ):
            body = body_of(response)
            assert body is not None
            pieces = body.pieces()
            assert await anext(pieces) == b"first"
            started = asyncio.get_running_loop().time()
            with pytest.raises(httpx2.ReadTimeout):
                await anext(pieces)
            assert asyncio.get_running_loop().time() - started < 5

    asyncio.run(scenario())


async def _one_response(raw: bytes, check: Callable[[httpx2.Response], Awaitable[None]]) -> None:
    """A server that answers one GET with `raw` (head and body), and `check`
    of the streamed response."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()

    async with (
        serve(handler) as (port, _),
        client() as http,
        http.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        await check(response)


def test_a_connection_closed_in_the_pool_is_replaced() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # ... and close it, as a server's idle timeout would.

    async def scenario() -> None:
        async with serve(handler) as (port, connections), client() as http:
            for _ in range(3):
                assert (await http.get(f"http://127.0.0.1:{port}/")).content == b"ok"
                await asyncio.sleep(0.05)
            assert len(connections) == 3

    asyncio.run(scenario())


def test_timeouts_and_failures_are_httpx_exceptions() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        await writer.drain()

    async def scenario() -> None:
        async with (
            serve(stall) as (port, _),
            client(timeout=0.3) as http,
            http.stream("GET", f"http://127.0.0.1:{port}/") as response,
        ):
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"first"
            with pytest.raises(httpx2.ReadTimeout):
                await anext(chunks)
        async with serve(cut) as (port, _), client() as http:
            with pytest.raises(httpx2.RemoteProtocolError):
                await http.get(f"http://127.0.0.1:{port}/")
        async with client() as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get("http://127.0.0.1:9/")

    asyncio.run(scenario())


def test_tls_with_the_servers_certificate_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        await writer.drain()

    async def scenario(expect_ok: bool) -> None:
        async with serve(handler, tls=server_tls) as (port, _), client() as http:
            if expect_ok:
                assert (await http.get(f"https://127.0.0.1:{port}/")).content == b"secure"
            else:
                with pytest.raises(httpx2.ConnectError):
                    await http.get(f"https://127.0.0.1:{port}/")

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    asyncio.run(scenario(expect_ok=False))  # not a certificate the system trusts
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    asyncio.run(scenario(expect_ok=True))


def test_a_configured_proxy_keeps_the_sdks_own_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert lean_http_client(5) is not None
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert lean_http_client(5) is None
