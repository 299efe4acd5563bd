"""Helpers the benchmark scripts share: a free loopback port, a gateway started and
listening, wrk posting events to it, and what /proc says of a process (CPU time,
resident memory)."""

import os
import pathlib
import re
import socket
import subprocess
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU time of `pid`, in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    """Resident memory of `pid`, in MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_gateway(binary, config, port):
    """Starts `binary serve --config config` (output discarded) and waits, up to ~10 s,
    until it accepts connections on `port`; returns the process."""
    gateway = subprocess.Popen([binary, "serve", "--config", config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return gateway


def wrk_post(port, seconds, tmp):
    """Posts ~1 KiB JSON events to source `s` of the gateway on `port` with wrk (Debian's
    package: 2 threads, 32 connections) for `seconds`, as fast as it accepts them; returns
    the rate, requests per second. `tmp` is a directory for wrk's script."""
    script = pathlib.Path(tmp, "post.lua")
    script.write_text('wrk.method = "POST"\nwrk.body = string.rep("x", 1000)\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "-s", script,
         f"http://127.0.0.1:{port}/v1/ingest/s"],
        capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))
