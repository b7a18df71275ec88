#!/usr/bin/env python3
"""Opens the demo page (web/index.html, built by web/build.sh) in headless Chromium on its
software WebGPU adapter, waits for the run it makes on load, checks that the GPU and CPU
outputs agree within 1e-5, saves a screenshot, then submits a bad shape and checks that the
page shows the crate's error message. Talks to chromedriver over the W3C WebDriver protocol
with the standard library only.

    python3 web/check-page.py [screenshot.png]
"""

import base64
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

WEB = os.path.dirname(os.path.abspath(__file__))
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--use-webgpu-adapter=swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1000,1150",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port):
    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".wasm": "application/wasm", ".js": "text/javascript"}

        def log_message(self, *args):
            pass

    handler = functools.partial(Handler, directory=WEB)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}").get("value")


def wait_for(base, sid, statuses, timeout_s=180):
    script = ("return [document.body.dataset.status, document.body.dataset.maxDiff || '', "
              "document.getElementById('error').textContent, "
              "document.getElementById('adapter').textContent];")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = call(base, "POST", f"/session/{sid}/execute/sync", {"script": script, "args": []})
        if state[0] in statuses:
            return state
        time.sleep(0.5)
    raise SystemExit(f"check-page: the page stayed {state[0]!r} for {timeout_s} s")


def main():
    shot = sys.argv[1] if len(sys.argv) > 1 else os.path.join(WEB, "screenshot.png")
    if not os.path.exists(os.path.join(WEB, "pkg", "wgpu_attention_web.js")):
        raise SystemExit("check-page: web/pkg is missing; run bash web/build.sh first")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not driver:
        raise SystemExit("check-page: no chromedriver (bash web/setup.sh installs it)")
    page_port, driver_port = free_port(), free_port()
    server = serve(page_port)
    proc = subprocess.Popen([driver, f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{driver_port}"
    try:
        for _ in range(100):
            try:
                call(base, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"args": CHROME_ARGS}}}}
        sid = call(base, "POST", "/session", caps)["sessionId"]
        try:
            call(base, "POST", f"/session/{sid}/url", {"url": f"http://127.0.0.1:{page_port}/"})
            status, diff, error, adapter = wait_for(base, sid, {"done", "error"})
            print(f"check-page: adapter {adapter!r}, status {status}, max |diff| {diff}")
            if status != "done":
                raise SystemExit(f"check-page: the page failed: {error}")
            if not float(diff) <= 1e-5:
                raise SystemExit(f"check-page: GPU and CPU disagree by {diff} (> 1e-5)")
            png = call(base, "GET", f"/session/{sid}/screenshot")
            with open(shot, "wb") as f:
                f.write(base64.b64decode(png))
            print(f"check-page: screenshot written to {shot}")
            # Bad input: 4 query heads over 3 kv heads is an exception with the crate's message.
            call(base, "POST", f"/session/{sid}/execute/sync", {"script": (
                "document.getElementById('kv_heads').value = '3';"
                "document.getElementById('form').requestSubmit();"), "args": []})
            status, _, error, _ = wait_for(base, sid, {"error", "done"})
            if status != "error" or "multiple of kv_heads" not in error:
                raise SystemExit(f"check-page: bad input gave {status!r}: {error!r}")
            print(f"check-page: bad input shown as: {error}")
        finally:
            call(base, "DELETE", f"/session/{sid}")
    finally:
        proc.terminate()
        server.shutdown()
    print("check-page: passed")


if __name__ == "__main__":
    main()
