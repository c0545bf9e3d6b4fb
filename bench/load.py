"""HTTP load for the benchmarks: wrk (a C load generator) when it is on the PATH, else an
asyncio + httpx client in this process.

On a 2-core machine the load generator competes with the server for the CPU; a Python client
spends more of it per request than the server's cheapest route does, which flatters every
ratio against /health. wrk spends little, so its figures are the ones to quote.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.stack import percentile


@dataclass(frozen=True)
class Request:
    """One kind of request. `paths` with several entries: each request picks one at random."""

    paths: list[str]
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Result:
    requests: int
    errors: int  # answers >= 400, and socket errors
    rps: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
        }


def generator() -> str:
    return "wrk" if shutil.which("wrk") and not os.environ.get("POSEGEN_BENCH_NO_WRK") else "httpx"


def run(base: str, request: Request, *, concurrency: int, seconds: float) -> Result:
    if generator() == "wrk":
        return _wrk(base, request, concurrency=concurrency, seconds=seconds)
    return asyncio.run(_httpx(base, request, concurrency=concurrency, seconds=seconds))


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]
) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data request, built once and sent as is."""
    boundary = "posegenbench" + os.urandom(8).hex()
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data, ctype) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}";'
            f' filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _lua_string(data: bytes) -> str:
    # A Lua long string cannot hold arbitrary bytes safely; decimal escapes can.
    return '"' + "".join(f"\\{b}" for b in data) + '"'


_DONE = """
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"errors\\": %d, \\"duration_us\\": %d,"
    .. " \\"p50_us\\": %d, \\"p99_us\\": %d}\\n",
    summary.requests, errors, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _wrk(base: str, request: Request, *, concurrency: int, seconds: float) -> Result:
    lines = [f"wrk.method = {_lua_string(request.method.encode())}"]
    if request.body:
        lines.append(f"wrk.body = {_lua_string(request.body)}")
    for name, value in request.headers.items():
        lines.append(f"wrk.headers[{_lua_string(name.encode())}] = {_lua_string(value.encode())}")
    if len(request.paths) > 1:
        lines.append(
            "local paths = {" + ",".join(_lua_string(p.encode()) for p in request.paths) + "}"
        )
        lines.append("math.randomseed(os.time())")
        lines.append("request = function() return wrk.format(nil, paths[math.random(#paths)]) end")
    else:
        lines.append(f"wrk.path = {_lua_string(request.paths[0].encode())}")
    lines.append(_DONE)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text("\n".join(lines))
        out = subprocess.run(
            [
                "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                "-s", str(script), base,
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON "))
    data = json.loads(line.removeprefix("WRKJSON "))
    return Result(
        requests=data["requests"],
        errors=data["errors"],
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


async def _httpx(base: str, request: Request, *, concurrency: int, seconds: float) -> Result:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.request(
                    request.method,
                    random.choice(request.paths),
                    headers=request.headers,
                    content=request.body or None,
                )
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Result(
        requests=len(latencies),
        errors=errors,
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )
