"""Hostile uploads and parameters against a real server: each refused with its 4xx and code
within a second, and the service healthy afterwards. Plus a schemathesis run: no 500s."""

from __future__ import annotations

import io
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from tests.factories import png_bytes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid, tiny PNG whose header claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


GOOD = png_bytes()
CASES = [
    # (name, form overrides, files overrides, expected status, expected code)
    ("empty image", {}, {"image": ("e.png", b"", "image/png")}, 415, "unsupported_image"),
    (
        "not an image",
        {},
        {"image": ("x.png", b"MZ\x90\x00 not a picture", "image/png")},
        415,
        "unsupported_image",
    ),
    (
        "truncated png",
        {},
        {"image": ("t.png", GOOD[: len(GOOD) // 2], "image/png")},
        415,
        "unsupported_image",
    ),
    (
        "30000x30000 header",
        {},
        {"image": ("b.png", bomb_png(), "image/png")},
        415,
        "unsupported_image",
    ),
    (
        "gif",
        {},
        {"image": ("g.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif")},
        415,
        "unsupported_image",
    ),
    (
        "oversized upload",
        {},
        {"image": ("big.png", b"\x00" * (11 * 1024 * 1024), "image/png")},
        413,
        "payload_too_large",
    ),
    (
        "bad pose image",
        {"pose_template_id": None},
        {"pose_image": ("p.png", b"nope", "image/png")},
        415,
        "unsupported_image",
    ),
    ("long prompt", {"prompt": "x" * 1001}, {}, 422, "invalid_request"),
    ("long negative prompt", {"negative_prompt": "x" * 1001}, {}, 422, "invalid_request"),
    ("steps 0", {"num_inference_steps": "0"}, {}, 422, "invalid_request"),
    ("steps 10^9", {"num_inference_steps": "1000000000"}, {}, 422, "invalid_request"),
    ("steps text", {"num_inference_steps": "many"}, {}, 422, "invalid_request"),
    ("guidance -1", {"guidance_scale": "-1"}, {}, 422, "invalid_request"),
    ("guidance inf", {"guidance_scale": "inf"}, {}, 422, "invalid_request"),
    ("strength 2", {"strength": "2"}, {}, 422, "invalid_request"),
    ("controlnet scale nan", {"controlnet_conditioning_scale": "nan"}, {}, 422, "invalid_request"),
    ("seed 2^40", {"seed": str(2**40)}, {}, 422, "invalid_request"),
    ("unknown model", {"model_key": "sd99"}, {}, 422, "invalid_request"),
    ("unknown template", {"pose_template_id": "backflip"}, {}, 422, "invalid_request"),
    ("both pose fields", {}, {"pose_image": ("p.png", GOOD, "image/png")}, 422, "invalid_request"),
]


@pytest.mark.parametrize(("name", "form", "files", "status", "code"), CASES, ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_input_is_refused_quickly(live_api, make_account, name, form, files, status, code):
    account = make_account()
    data = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing", **form}
    data = {k: v for k, v in data.items() if v is not None}
    upload = {"image": ("ok.png", GOOD, "image/png"), **files}
    started = time.monotonic()
    response = httpx.post(f"{live_api}/v1/generations", headers=account.headers, data=data, files=upload, timeout=10)  # fmt: skip
    elapsed = time.monotonic() - started
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert elapsed < 1.0, f"{name} took {elapsed:.2f}s"
    assert httpx.get(f"{live_api}/health").status_code == 200
    assert httpx.get(f"{live_api}/v1/me", headers=account.headers).json()["credits"] == 100


def test_jpeg_is_accepted_and_stored_as_png(live_api, make_account):
    account = make_account()
    response = httpx.post(
        f"{live_api}/v1/generations",
        headers=account.headers,
        data={"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"},
        files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")},
    )
    assert response.status_code == 202, response.text


def test_chunked_oversized_body_is_cut_off(live_api, make_account):
    """No Content-Length: the body is counted as it streams and refused at the limit."""
    account = make_account()

    def body():
        boundary = b"--xyz\r\n"
        yield (
            boundary
            + b'Content-Disposition: form-data; name="model_key"\r\n\r\ntiny-sd15-openpose\r\n'
        )
        yield (
            boundary
            + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        for _ in range(40):
            yield b"\x00" * (1024 * 1024)

    started = time.monotonic()
    response = httpx.post(
        f"{live_api}/v1/generations",
        headers={**account.headers, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=body(),
        timeout=30,
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert time.monotonic() - started < 5
