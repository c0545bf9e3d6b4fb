"""GET /playground: the page (loading it needs no key; it asks for one) and its scripts, all
served from here, so the page works where the browser reaches nothing but the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).resolve().parent.parent / "playground"
router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def playground() -> FileResponse:
    return FileResponse(PAGE / "index.html", media_type="text/html")


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/playground/static", StaticFiles(directory=PAGE), name="playground")
