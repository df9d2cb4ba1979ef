"""A TCP proxy on 127.0.0.1 that adds a fixed delay in each direction.

It stands between an SSH client and a loopback sshd to give the benchmark a
realistic round-trip time (``--delay-ms 20`` each way = 40 ms RTT) without
limiting bandwidth: every chunk read is forwarded ``delay`` later, while
further chunks keep flowing (a pipe, not stop-and-wait). Only the SSH windows
and the machine's CPU limit throughput, as on a long fat network. It buffers
at most ``QUEUE_CHUNKS`` chunks per direction, then stops reading (backpressure).

Run it as a separate process so it does not share a GIL with the client under
test::

    python benchmarks/latency_proxy.py --target-port 2222 --delay-ms 20 --lifetime 900

It prints ``LISTENING <port>`` once it accepts connections, and exits after
``--lifetime`` seconds at the latest.
"""

import argparse
import asyncio
import select
import subprocess
import sys
from pathlib import Path

CHUNK = 256 * 1024
QUEUE_CHUNKS = 1024  # 256 MiB per direction at most; enough for 40 ms at > 5 GB/s
LOOPBACK = "127.0.0.1"


async def _pipe(reader, writer, delay):
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it was read."""
    if delay <= 0:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        return
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(QUEUE_CHUNKS)

    async def read_side():
        while data := await reader.read(CHUNK):
            await queue.put((loop.time() + delay, data))
        await queue.put((loop.time() + delay, b""))

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read_side(), write_side())


async def _handle(client_reader, client_writer, target_port, delay):
    try:
        server_reader, server_writer = await asyncio.open_connection(LOOPBACK, target_port)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay),
            _pipe(server_reader, client_writer, delay),
        )
    except (ConnectionError, OSError):
        pass  # one side went away: close both
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(target_port, delay_ms, listen_port=0, lifetime=900.0, ready=None):
    """Proxy ``127.0.0.1:listen_port`` to ``127.0.0.1:target_port`` for at most ``lifetime`` s.

    :param ready: called with the listening port once connections are accepted.
    """
    delay = delay_ms / 1000.0
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, target_port, delay), LOOPBACK, listen_port)
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(port)
    async with server:
        try:
            await asyncio.wait_for(server.serve_forever(), timeout=lifetime)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass


def spawn(target_port, delay_ms, lifetime=900.0, timeout=10.0, preexec_fn=None):
    """Start the proxy as a child process; return ``(process, port)``.

    :param preexec_fn: run in the child before the proxy starts (e.g. to end it with its parent).
    """
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--target-port", str(target_port),
         "--delay-ms", str(delay_ms), "--lifetime", str(lifetime)],
        stdout=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
    )
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if readable else ""
    if not line.startswith("LISTENING "):
        process.kill()
        process.wait()
        raise RuntimeError(f"latency proxy did not start within {timeout} s: {line!r}")
    return process, int(line.split()[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-port", type=int, required=True, help="port of the server on 127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="delay added each way (0: none)")
    parser.add_argument("--lifetime", type=float, default=900.0, help="exit after this many seconds")
    args = parser.parse_args(argv)

    def ready(port):
        print(f"LISTENING {port}", flush=True)

    asyncio.run(serve(args.target_port, args.delay_ms, args.listen_port, args.lifetime, ready))


if __name__ == "__main__":
    main()
