#!/usr/bin/env python3
"""Where the gateway's CPU goes per delivered event, by stage of the data path.

Runs the load harness (`cargo bench -p switchyard --bench load`), samples the gateway
process with `perf record --call-graph dwarf` for a few seconds in the middle of its
blast, sorts every sample into the stage its call stack belongs to, and prints each
stage's share and its microseconds of CPU per delivered event (the share times the
harness's own "µs per delivered event"). Run it twice with different chains to see what a
plugin costs, e.g.:

    python3 host/benches/stages.py                         # the quickstart route (fresh)
    python3 host/benches/stages.py --plugins 'plugins = []' # no plugin at all

Needs `perf` (Debian: linux-perf) and the right to profile a child process (root, or
`kernel.perf_event_paranoid` <= 1). Loopback only; bounded like the harness itself.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

# First match wins, so a stack that is in the writer thread and also mentions the store
# counts once. Tested against symbols of the release build (DWARF unwinding).
STAGES = [
    ("store: writer thread", ("write_loop",)),
    ("store: syncer thread (fdatasync)", ("sync_loop",)),
    ("plugin (wasmtime, guest)", ("plugin::", "wasmtime")),
    ("store: async side", ("store::sqlite",)),
    ("delivery: HTTP client", ("reqwest", "hyper_util::client", "hyper::client",
                               "delivery::dispatch", "role::Client")),
    ("ingest: handler", ("ingest::",)),
    ("ingest: HTTP server", ("hyper::proto", "axum", "tower", "hyper::server",
                             "serve_connection", "serve::serve")),
    ("pipeline", ("pipeline::",)),
    ("tokio scheduling", ("tokio::runtime",)),
]


def stacks_of(perf_script: str):
    """(thread name, frames outermost first) per sample of `perf script -F comm,ip,sym`."""
    comm, frames = None, []
    for line in perf_script.splitlines():
        if not line.strip():
            if frames:
                yield comm, frames[::-1]
            frames = []
        elif not line.startswith((" ", "\t")):
            comm = line.split()[0]
        else:
            parts = line.split(None, 1)
            frames.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1] if len(parts) > 1 else "?"))
    if frames:
        yield comm, frames[::-1]


def stage_of(comm: str, frames) -> str:
    joined = " ".join(frames)
    for name, needles in STAGES:
        if any(n in joined for n in needles):
            return name
    # Guest code runs on wasmtime's fiber stacks, which DWARF unwinding cannot leave, so
    # its samples in a runtime worker name no stage (with no plugin there are almost none).
    if comm.startswith("tokio-rt"):
        return "runtime worker, unattributed (mostly guest code)"
    return "other: " + comm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plugins", help="the route's `plugins = [...]` TOML line (LOAD_PLUGINS)")
    ap.add_argument("--events", type=int, default=150_000, help="events in the blast")
    ap.add_argument("--seconds", type=float, default=5.0, help="how long to sample")
    ap.add_argument("--frequency", type=int, default=499, help="samples per second")
    args = ap.parse_args()

    env = dict(os.environ)
    if args.plugins:
        env["LOAD_PLUGINS"] = args.plugins
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["cargo", "bench", "-p", "switchyard", "--bench", "load", "--no-run"],
                   cwd=root, check=True)
    bench = subprocess.Popen(
        ["cargo", "bench", "-p", "switchyard", "--bench", "load", "--", str(args.events), "64"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pid = None
    deadline = time.time() + 120
    while pid is None and time.time() < deadline and bench.poll() is None:
        found = subprocess.run(["pgrep", "-n", "-f", "switchyard --log-format"],
                               capture_output=True, text=True).stdout.split()
        pid = found[0] if found else None
        time.sleep(0.1)
    if pid is None:
        print("the gateway did not start", file=sys.stderr)
        bench.kill()
        return 1
    time.sleep(3)  # past start-up and the first seconds of the blast
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(["perf", "record", "-q", "--call-graph", "dwarf,16384",
                        "-F", str(args.frequency), "-p", pid, "-o", data,
                        "--", "sleep", str(args.seconds)],
                       check=True, stderr=subprocess.DEVNULL)
        out, _ = bench.communicate()
        script = subprocess.run(["perf", "script", "-F", "comm,ip,sym", "-i", data],
                                capture_output=True, text=True).stdout
    print(out.strip())
    per_event = re.search(r"\(([0-9]+) µs per delivered event\)", out)
    counts = collections.Counter(stage_of(c, f) for c, f in stacks_of(script))
    total = sum(counts.values())
    if not total or not per_event:
        print("no samples, or the harness printed no CPU figure", file=sys.stderr)
        return 1
    us = int(per_event.group(1))
    print(f"\n{total} samples of the gateway; {us} µs of CPU per delivered event in all")
    print(f"{'stage':<52} {'share':>6} {'µs/event':>9}")
    for name, n in counts.most_common():
        print(f"{name:<52} {100 * n / total:5.1f}% {us * n / total:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
