"""The dashboard's pages and static files. A page is a shell: it holds no user data (with keys required the server
does not know whose page it is), and its script fills it from /v1 with the key the browser keeps for the session.
Nothing here reads the database; every number on a page comes from the public API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from service.api.deps import PathText
from service.api.problems import Problem
from service.web.assets import PLOTLY_FILE, STATIC, vendored

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")

# Every static file a page may load, by name: no path from the request reaches the file system.
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
STATIC_FILES = {p.name: p for p in STATIC.iterdir() if p.suffix in _STATIC_TYPES}
# Scripts from this origin only; Plotly sets inline styles on the charts it draws.
_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"title": title, "charts": vendored() is not None,
                                                          **context}, headers=_HEADERS)


@router.get("/", response_class=HTMLResponse)
def home_page(request: Request) -> HTMLResponse:
    return _page(request, "home.html", "HubTune")


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request) -> HTMLResponse:
    return _page(request, "datasets.html", "Datasets")


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request) -> HTMLResponse:
    return _page(request, "models.html", "Models")


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", "Jobs")


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_page(request: Request) -> HTMLResponse:
    return _page(request, "new_job.html", "New job")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: PathText) -> HTMLResponse:
    # the id is only echoed (escaped) for the script; whether the job exists, and whose it is, /v1 says
    return _page(request, "job.html", "Job", job_id=job_id)


@router.get("/static/{name}")
def static_file(name: PathText) -> FileResponse:
    path = STATIC_FILES.get(name) or (vendored() if name == PLOTLY_FILE else None)
    if path is None:
        raise Problem(404, "not found", f"no static file {name}")
    return FileResponse(path, media_type=_STATIC_TYPES[path.suffix],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"})
