#!/usr/bin/env python3
"""Range-capable HTTP file server for benches/remote.sh.

Serves DIR on 127.0.0.1:PORT with an injected delay before every answer
(the round trip of a distant server), ETags, and a byte counter at
GET /__stats (body bytes sent so far, requests answered: GET and HEAD, and
rounds: requests that arrived while no other was being served, which with a
delay well above the client's own work counts sequential round trips).

usage: remote_httpd.py DIR PORT DELAY_MS
"""
import http.server
import os
import sys
import threading
import time

ROOT, PORT, DELAY = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000.0
LOCK = threading.Lock()
STATS = {"sent": 0, "requests": 0, "rounds": 0, "busy": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        if self.path != "/__stats":
            with LOCK:
                if STATS["busy"] == 0:
                    STATS["rounds"] += 1
                STATS["busy"] += 1
        try:
            self.answer_now(head)
        finally:
            if self.path != "/__stats":
                with LOCK:
                    STATS["busy"] -= 1

    def answer_now(self, head):
        time.sleep(DELAY)
        if self.path == "/__stats":
            body = ("%d %d %d\n" % (STATS["sent"], STATS["requests"], STATS["rounds"])).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with LOCK:
            STATS["requests"] += 1  # every request but /__stats: HEADs and errors too
        rel = self.path.lstrip("/")
        path = os.path.join(ROOT, rel)
        if ".." in rel.split("/") or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = os.stat(path)
        size = st.st_size
        etag = '"%x-%x-%x"' % (st.st_ino, size, st.st_mtime_ns)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a)
            end = min(int(b), size - 1) if b else size - 1
            status = 206
        self.send_response(status)
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", self.date_time_string(st.st_mtime))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        n = end - start + 1
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if head:
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = n
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
        with LOCK:
            STATS["sent"] += n


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
