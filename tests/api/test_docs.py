"""/docs and /redoc need nothing but the API: their scripts and styles are served by it (from
the fastapi-offline package), never from a CDN. tests/browser/ renders them in Chromium."""

from __future__ import annotations

import re


def test_docs_pages_load_their_assets_from_the_api(app):
    for page, assets in (
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
        ("/redoc", ["redoc.standalone.js"]),
    ):
        html = app.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert urls and all(u.startswith("/") for u in urls), urls  # nothing from elsewhere
        for asset in assets:
            assert f"/docs/static/{asset}" in urls
            served = app.get(f"/docs/static/{asset}")
            assert served.status_code == 200 and len(served.content) > 10_000
    assert "/openapi.json" in app.get("/docs").text
