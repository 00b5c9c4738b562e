"""A TCP link between two services that can be delayed or cut: for tests and benchmarks.

    python -m edgellm.linkproxy --listen 127.0.0.1:50063 --target 127.0.0.1:50053 --delay-ms 5

Point a service at the listen address instead of the target and every byte crosses this
proxy: `delay_ms` holds each piece of data that long before passing it on (one-way latency,
which `tc tbf` cannot add and `netem` is not in this kernel), and `cut()` stops moving bytes
in both directions while every connection stays open, like a pulled cable or a dead WiFi
link: no reset, no error, just silence. `restore()` reconnects the link.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

_READ_BYTES = 1 << 16


class LinkProxy:
    def __init__(self, target: str, listen: str = "127.0.0.1:0", delay_ms: float = 0.0) -> None:
        self.target_host, target_port = target.rsplit(":", 1)
        self.target_port = int(target_port)
        self.listen_host, listen_port = listen.rsplit(":", 1)
        self.port = int(listen_port)
        self.delay_s = delay_ms / 1000
        self._up = asyncio.Event()
        self._up.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    # ---- control, from any thread ----------------------------------------------------------
    def cut(self) -> None:
        self._call(self._up.clear)

    def restore(self) -> None:
        self._call(self._up.set)

    def _call(self, fn) -> None:
        if self._loop is None:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def start_in_thread(self) -> LinkProxy:
        """Serve from a daemon thread of this process (tests); returns once listening."""
        started = threading.Event()

        async def main() -> None:
            await self.start()
            started.set()
            await asyncio.Event().wait()

        threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="linkproxy").start()
        if not started.wait(10):
            raise RuntimeError("link proxy did not start")
        return self

    # ---- the link ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connect, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await self._up.wait()  # a cut link accepts nothing new either
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, target_writer), self._pipe(target_reader, client_writer), return_exceptions=True
        )
        for writer in (client_writer, target_writer):
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read, hold for delay_s, write, in order; nothing moves while cut."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:  # the sender closed its side: pass that on
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._up.wait()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                await self._up.wait()
                data = await reader.read(_READ_BYTES)
                await queue.put((loop.time() + self.delay_s, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgellm.linkproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to accept connections on")
    parser.add_argument("--target", required=True, help="host:port to forward them to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to every byte")
    args = parser.parse_args(argv)

    async def run() -> None:
        proxy = LinkProxy(args.target, args.listen, args.delay_ms)
        await proxy.start()
        print(f"linkproxy {proxy.address} -> {args.target} (+{args.delay_ms:g} ms)", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
