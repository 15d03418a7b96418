"""/docs (Swagger UI) and /redoc (ReDoc), with their JavaScript, CSS and icon served by keel itself.

FastAPI's own pages load those from a CDN, so they are blank on a machine without internet. Here the assets come
from the fastapi-offline package (installed with keel; its files are read, nothing of it is imported) and are
served under /docs/assets/, so the pages load nothing from anywhere else. With API keys set, the pages and
/openapi.json need a key like every route, unless ``serve.public_docs`` opens them (keel/serve/guard.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles

from keel.errors import KeelError
from keel.serve.guard import DOCS_ASSETS

ASSETS_PACKAGE = "fastapi_offline"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # ReDoc's sidebar credit loads its logo from here


def assets_dir() -> Path:
    """The folder holding swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    folder = (
        Path(list(spec.submodule_search_locations)[0]) / "static" if spec and spec.submodule_search_locations else None
    )
    if folder is None or not (folder / "swagger-ui-bundle.js").is_file():
        raise KeelError(
            "the API docs' assets are missing (package fastapi-offline); run `make venv` "
            "(or pip install -r requirements.txt -c constraints.txt)"
        )
    return folder


def add_docs_routes(app) -> None:
    """/docs, /docs/oauth2-redirect and /redoc on ``app`` (built with docs_url=None, redoc_url=None)."""
    folder = assets_dir()
    redoc_js = []

    @app.get(f"{DOCS_ASSETS}redoc.standalone.js", include_in_schema=False)
    async def redoc_script():  # before the mount, which would answer first; the credit's logo is keel's icon
        if not redoc_js:
            text = (folder / "redoc.standalone.js").read_text(encoding="utf-8")
            redoc_js.append(text.replace(REDOC_LOGO, f"{DOCS_ASSETS}favicon.png"))
        return Response(redoc_js[0], media_type="text/javascript")

    app.mount(DOCS_ASSETS.rstrip("/"), StaticFiles(directory=folder), name="docs-assets")

    def root(request: Request) -> str:  # behind a proxy that strips a path prefix
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request):
        r = root(request)
        return get_swagger_ui_html(
            openapi_url=r + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{r}{DOCS_ASSETS}swagger-ui-bundle.js",
            swagger_css_url=f"{r}{DOCS_ASSETS}swagger-ui.css",
            swagger_favicon_url=f"{r}{DOCS_ASSETS}favicon.png",
            oauth2_redirect_url=r + "/docs/oauth2-redirect",
            swagger_ui_parameters={"validatorUrl": None},
        )  # no spec sent to validator.swagger.io

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        r = root(request)
        return get_redoc_html(
            openapi_url=r + app.openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{r}{DOCS_ASSETS}redoc.standalone.js",
            redoc_favicon_url=f"{r}{DOCS_ASSETS}favicon.png",
            with_google_fonts=False,
        )
