#!/usr/bin/env python3
"""`switchyard backup` of a large store, and what it costs the gateway meanwhile.

Starts the release `switchyard` (build it first: `cargo build --release -p switchyard`;
`--binary` for another build) on a throwaway data dir whose one destination refuses
connections (FAILED at once, so every event keeps a held delivery, as in an outage), fills
the store by posting ~1 KiB events with wrk (Debian's package) for `--fill` seconds, then
posts for 10 s twice more: once alone, once with `switchyard backup` started a second in.
It prints the events and size copied, how long the backup took, and the rate accepted
with and without it. Loopback only; stops by itself.

    python3 host/benches/backup.py             # ~20 s of filling
    python3 host/benches/backup.py --fill 60   # a larger store
"""

import argparse
import pathlib
import subprocess
import tempfile
import threading
import time

from gateway_proc import free_port, start_gateway, wrk_post

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fill", type=int, default=20, help="seconds of posting before")
    ap.add_argument("--binary", default=ROOT / "target/release/switchyard")
    args = ap.parse_args()

    port, refused = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp, "switchyard.toml")
        config.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
data_dir = "data"
queue_capacity = 100000
[delivery]
allowed_networks = ["127.0.0.0/8"]
failure_threshold = 1
[[sources]]
name = "s"
[[destinations]]
name = "down"
url = "http://127.0.0.1:{refused}/down"
[[routes]]
source = "s"
destinations = ["down"]
""")
        def post(seconds):
            return wrk_post(port, seconds, tmp)

        gateway = start_gateway(args.binary, config, port)
        try:
            post(args.fill)
            alone = post(10)
            result = {}

            def backup():
                time.sleep(1)
                started = time.monotonic()
                out = subprocess.run(
                    [args.binary, "backup", "--config", config, pathlib.Path(tmp, "copy.db")],
                    capture_output=True, text=True)
                result["seconds"] = time.monotonic() - started
                result["out"] = (out.stdout + out.stderr).strip()

            thread = threading.Thread(target=backup)
            thread.start()
            during = post(10)
            thread.join()
        finally:
            gateway.terminate()
            gateway.wait(timeout=60)
    print(f"{result['out']}\n"
          f"backup took {result['seconds']:.1f} s (wall); ingest {alone:,.0f} events/s "
          f"alone, {during:,.0f} events/s over 10 s with the backup")


if __name__ == "__main__":
    main()
