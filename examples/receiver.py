#!/usr/bin/env python3
"""A webhook receiver that prints every request it gets and answers 204.

Run with: python3 examples/receiver.py [PORT]   (default 9000, loopback only)
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        print(f"--- {self.command} {self.path}")
        for name, value in self.headers.items():
            print(f"{name}: {value}")
        try:
            print(json.dumps(json.loads(body), indent=2))
        except ValueError:
            print(body.decode("utf-8", "replace"))
        sys.stdout.flush()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    print(f"listening on http://127.0.0.1:{port}")
    HTTPServer(("127.0.0.1", port), Receiver).serve_forever()
