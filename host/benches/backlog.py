#!/usr/bin/env python3
"""A destination slower than its traffic: what its backlog costs the gateway.

Starts a sink that answers each request after `--delay` seconds (asyncio, any number of
connections), the release `switchyard` (build it first: `cargo build --release -p
switchyard`; `--binary` for another build) on a throwaway data dir routing every event to
`--destinations` destinations on that sink, then posts ~1 KiB events with wrk (Debian's
package) for `--seconds` with 32 connections, as fast as the gateway accepts them. It
prints the rate accepted, the gateway's resident memory once posting stops, and its CPU
time and the deliveries made over the next 10 s, while the backlog drains at the sink's
pace (`delivery.destination_concurrency` / `--delay` per destination), and how long it
takes to stop on SIGTERM (killed after 60 s). Meanwhile, in those 10 s, it posts an
event every 20 ms to a second source routed to a destination that answers at once, and
prints how long those took from ingest to delivery: what one destination's backlog does
to the others'. Loopback only; stops by itself.

    python3 host/benches/backlog.py                   # one slow destination
    python3 host/benches/backlog.py --destinations 2  # two: the dispatcher's permits run out
"""

import argparse
import asyncio
import http.client
import pathlib
import re
import subprocess
import tempfile
import threading
import time

from gateway_proc import free_port, cpu_seconds, rss_mib, start_gateway, wrk_post

ROOT = pathlib.Path(__file__).resolve().parents[2]


def slow_sink(port, delay, served, arrived):
    """Answers each request after `delay` s, or at once under /fast, where it notes when
    each event (its body the number it was sent with) arrived."""
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                if head.startswith(b"POST /fast"):
                    arrived[int(body)] = time.monotonic()
                else:
                    await asyncio.sleep(delay)
                    served[0] += 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=float, default=1.0, help="the sink's answer time, s")
    ap.add_argument("--destinations", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=8, help="how long wrk posts")
    ap.add_argument("--binary", default=ROOT / "target/release/switchyard")
    args = ap.parse_args()

    sink_port, port, served, arrived = free_port(), free_port(), [0], {}
    threading.Thread(target=slow_sink, args=(sink_port, args.delay, served, arrived),
                     daemon=True).start()
    names = [f"slow{i}" for i in range(args.destinations)]
    destinations = "".join(
        f'[[destinations]]\nname = "{n}"\nurl = "http://127.0.0.1:{sink_port}/{n}"\n'
        for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp, "switchyard.toml")
        config.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
data_dir = "data"
queue_capacity = 100000
[delivery]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
{destinations}
[[routes]]
source = "s"
destinations = {names!r}
[[sources]]
name = "f"
[[destinations]]
name = "fast"
url = "http://127.0.0.1:{sink_port}/fast"
[[routes]]
source = "f"
destinations = ["fast"]
""".replace("'", '"'))
        gateway = start_gateway(args.binary, config, port)
        try:
            rate = wrk_post(port, args.seconds, tmp)
            time.sleep(1)
            rss = rss_mib(gateway.pid)
            cpu, sent = cpu_seconds(gateway.pid), served[0]
            posted = probe(port, 10, 0.02)
            cpu, sent = cpu_seconds(gateway.pid) - cpu, served[0] - sent
            time.sleep(1)
        finally:
            gateway.terminate()
            try:
                stopped = time.monotonic()
                gateway.wait(timeout=60)
                stop = f"stopped {time.monotonic() - stopped:.1f} s after SIGTERM"
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
                stop = "still stopping 60 s after SIGTERM: killed"
    print(f"{args.destinations} destination(s) answering after {args.delay} s: "
          f"accepted {rate:,.0f} events/s for {args.seconds} s; "
          f"resident memory then {rss:,.0f} MiB; over the next 10 s "
          f"{sent} deliveries and {cpu:.2f} s of gateway CPU; {stop}")
    late = sorted(arrived.get(n, float("inf")) - at for n, at in posted.items())
    if late:
        pick = lambda q: late[min(len(late) - 1, int(q * len(late)))] * 1000
        print(f"meanwhile {len(late)} events to a destination answering at once: "
              f"{sum(x != float('inf') for x in late)} delivered, ingest to delivery "
              f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {late[-1] * 1000:.1f} ms")


def probe(port, seconds, every):
    """Posts an event (its body a number) to source `f` every `every` s for `seconds`, one
    at a time on one connection; returns when each was sent, by number."""
    sent, conn = {}, http.client.HTTPConnection("127.0.0.1", port)
    start = time.monotonic()
    for n in range(int(seconds / every)):
        time.sleep(max(0.0, start + n * every - time.monotonic()))
        sent[n] = time.monotonic()
        conn.request("POST", "/v1/ingest/f", body=str(n),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        reply.read()
        if reply.status != 202:
            del sent[n]
    conn.close()
    return sent


if __name__ == "__main__":
    main()
