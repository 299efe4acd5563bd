#!/usr/bin/env python3
"""A destination's rate limit at work: when deliveries arrive, and what pacing costs.

Starts the release `switchyard` (build it first: `cargo build --release -p switchyard`)
on a throwaway data dir with one destination at `--rate` deliveries per second (none
with `--rate 0`), a receiver that stamps each arrival, posts `--events` events one by one,
waits for all of them to arrive, and prints how many arrived within 1, 5 and 10 s of the
first, the span, and the gateway's CPU time while posting and while draining (from
/proc). Loopback only; stops by itself (at most `--events / --rate + 30` s).

    python3 host/benches/pacing.py --rate 200 --events 3000
    python3 host/benches/pacing.py --rate 0 --events 3000     # the same without a limit
"""

import argparse
import http.client
import http.server
import pathlib
import tempfile
import threading
import time

from gateway_proc import free_port, cpu_seconds, start_gateway

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=200, help="rate_limit (0: none)")
    ap.add_argument("--events", type=int, default=3000)
    args = ap.parse_args()

    arrivals = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            arrivals.append(time.monotonic())
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = free_port()
    limit = f"rate_limit = {args.rate}" if args.rate > 0 else ""
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp, "switchyard.toml")
        config.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
data_dir = "data"
[delivery]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "http://127.0.0.1:{receiver.server_address[1]}/in"
{limit}
[[routes]]
source = "s"
destinations = ["d"]
""")
        gateway = start_gateway(ROOT / "target/release/switchyard", config, port)
        try:
            before = cpu_seconds(gateway.pid)
            client = http.client.HTTPConnection("127.0.0.1", port)
            for n in range(args.events):
                client.request("POST", "/v1/ingest/s", body=b'{"n":%d}' % n,
                               headers={"content-type": "application/json"})
                response = client.getresponse()
                response.read()
                assert response.status == 202, response.status
            posted = cpu_seconds(gateway.pid)
            deadline = time.monotonic() + (args.events / args.rate if args.rate else 0) + 30
            while len(arrivals) < args.events and time.monotonic() < deadline:
                time.sleep(0.05)
            drained = cpu_seconds(gateway.pid)
        finally:
            gateway.terminate()
            gateway.wait()
    first = arrivals[0]
    within = [sum(1 for t in arrivals if t - first < w) for w in (1, 5, 10)]
    print(f"rate_limit {args.rate or 'none'}: {len(arrivals)} of {args.events} arrived, "
          f"the last {arrivals[-1] - first:.2f} s after the first; "
          f"within 1 s {within[0]}, 5 s {within[1]}, 10 s {within[2]}")
    print(f"gateway CPU: {posted - before:.2f} s while posting, "
          f"{drained - posted:.2f} s while draining")


if __name__ == "__main__":
    main()
