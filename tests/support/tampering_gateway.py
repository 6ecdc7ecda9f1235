"""A malicious gateway for the end-to-end tests, run inside the boot network's namespace:
it forwards to the honest gateway and flips one byte in every answer about one CID.

python -m tests.support.tampering_gateway --upstream http://10.77.0.1:8080 --listen 10.77.0.1:8081 --tamper CID
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--tamper", required=True, help="CID whose answers get one byte flipped")
    args = ap.parse_args()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            req = urllib.request.Request(args.upstream + self.path, headers={"Accept": self.headers.get("Accept", "")})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    body, ctype, status = r.read(), r.headers["Content-Type"], r.status
            except urllib.error.HTTPError as e:
                body, ctype, status = e.read(), e.headers.get("Content-Type", "text/plain"), e.code
            if args.tamper in self.path and status == 200 and body:
                body = body[:-1] + bytes([body[-1] ^ 0x01])
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), H)
    print(f"tampering gateway on http://{args.listen} for {args.tamper}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
