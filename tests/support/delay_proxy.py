"""A TCP proxy that delays every chunk by a fixed time in each direction (this kernel has no netem).

``python tests/support/delay_proxy.py --listen 127.0.0.1:9193 --target 10.231.2.1:9093 --delay 0.2``: the
multi-host test runs it inside a site's namespace and points that site's SuperNode at it, so every
request and reply of that link is ``delay`` seconds late (TLS passes through untouched).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as the coordinator's own host does when nothing listens: a clean close
    after accepting would look like a TLS failure to the SuperNode (flwr 1.41 then exits for good
    instead of retrying), which no real link produces."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        _reset(writer)  # pass a reset on as a reset
        return
    writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            _reset(writer)  # nothing listens upstream: refuse as the upstream host would
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_addr, required=True)
    parser.add_argument("--target", type=_addr, required=True)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per chunk and direction")
    args = parser.parse_args()
    asyncio.run(_serve(args.listen, args.target, args.delay))


if __name__ == "__main__":
    main()
