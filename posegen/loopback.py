"""A loopback Inference API: the Hugging Face protocol (posegen.hosted) served on 127.0.0.1,
for `posegen demo --hosted` and the tests. It needs no network and no GPU.

It checks the bearer token (401 otherwise, as the real API answers), can play a cold model
(503 with `estimated_time` until `cold_seconds` have passed since its first request), and
answers an image of the control image's size: the skeleton it was sent, recolored, so the
output shows the pose. Tests queue scripted answers (`Answer`) and read what it received."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageOps


@dataclass(frozen=True)
class Answer:
    """One scripted answer, after `delay` seconds: `status` with a JSON `body` (and
    `retry_after`), or (200 without a body) the image."""

    status: int = 200
    body: dict[str, Any] | None = None
    retry_after: str | None = None
    delay: float = 0.0


@dataclass
class Received:
    path: str
    authorization: str
    body: dict[str, Any]
    at: float


@dataclass
class LoopbackProvider:
    token: str
    cold_seconds: float = 0.0
    script: deque[Answer] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._first: float | None = None
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LoopbackProvider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name for it
                provider.handle(self)

            def log_message(self, *_: Any) -> None:  # quiet: no request lines on stderr
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length") or 0)
        raw = request.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        with self._lock:
            now = time.monotonic()
            self._first = now if self._first is None else self._first
            auth = request.headers.get("authorization", "")
            self.received.append(Received(request.path, auth, body, now))
            answer = self.script.popleft() if self.script else None
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            self._answer(request, answer, body, auth=auth, since_first=now - self._first)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(
        self,
        request: BaseHTTPRequestHandler,
        answer: Answer | None,
        body: dict[str, Any],
        *,
        auth: str,
        since_first: float,
    ) -> None:
        if answer is None and auth != f"Bearer {self.token}":
            answer = Answer(401, {"error": "Invalid credentials in Authorization header"})
        if answer is None and since_first < self.cold_seconds:
            left = round(self.cold_seconds - since_first, 2)
            answer = Answer(503, {"error": "Model is currently loading", "estimated_time": left})
        answer = answer or Answer()
        if answer.delay:
            time.sleep(answer.delay)
        if answer.status != 200 or answer.body is not None:  # a JSON answer, even a 200
            return _send(request, answer.status, json.dumps(answer.body or {}).encode(),
                         "application/json", answer.retry_after)  # fmt: skip
        try:
            png = _render(body["inputs"]["image"])
        except (KeyError, TypeError, ValueError, OSError):
            error = json.dumps({"error": "inputs.image is not a base64 image"}).encode()
            return _send(request, 400, error, "application/json", None)
        return _send(request, 200, png, "image/png", None)


def _render(image_b64: str) -> bytes:
    """The control image, recolored: an image of its size that shows the pose."""
    control = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("L")
    out = ImageOps.colorize(control, black=(40, 60, 110), white=(250, 220, 160))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _send(
    request: BaseHTTPRequestHandler,
    status: int,
    data: bytes,
    content_type: str,
    retry_after: str | None,
) -> None:
    try:
        request.send_response(status)
        request.send_header("content-type", content_type)
        request.send_header("content-length", str(len(data)))
        if retry_after is not None:
            request.send_header("retry-after", retry_after)
        request.end_headers()
        request.wfile.write(data)
    except OSError:  # the client gave up (its time limit): nothing to answer
        return
