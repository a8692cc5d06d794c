"""The explorer's web server: FastAPI over `service.Jobs`, and the static page (``static/``).

FastAPI because a Python ML user knows it (type-checked JSON endpoints, served by uvicorn) and it keeps
the page a plain HTML + JavaScript file we control and test in a real browser; Gradio would hide the
page's structure behind its own components and websocket protocol. The server binds to 127.0.0.1 unless
told otherwise; every model call goes through the one job queue.
"""
from __future__ import annotations

from importlib import resources
from typing import Any

from ..errors import PatchscopeError
from .service import Explorer, FieldError, Jobs, Query


def check_installed() -> None:
    """Refuse at once, naming the extra, when fastapi or uvicorn is missing."""
    _fastapi()
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise PatchscopeError("the explorer needs the app extra: pip install 'pyvene-patchscopes[app]' "
                              "(fastapi, uvicorn)") from None


def _fastapi():
    try:
        import fastapi
        import fastapi.responses
        import fastapi.staticfiles
    except ImportError:
        raise PatchscopeError("the explorer needs the app extra: pip install 'pyvene-patchscopes[app]' "
                              "(fastapi, uvicorn)") from None
    return fastapi


def create_app(explorer: Explorer) -> Any:
    """The FastAPI app serving `explorer`: the page at ``/``, the JSON API under ``/api``."""
    fastapi = _fastapi()
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    app = fastapi.FastAPI(title="Patchscopes explorer", docs_url=None, redoc_url=None)
    jobs = Jobs(explorer)
    app.state.jobs = jobs
    static = resources.files("pyvene_patchscopes.explore") / "static"

    @app.exception_handler(FieldError)
    async def field_error(request, error: FieldError):  # noqa: ARG001
        return JSONResponse({"error": {"field": error.field, "message": str(error)}}, status_code=422)

    @app.get("/")
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/info")
    def info() -> dict:
        return explorer.info()

    @app.post("/api/tokens")
    def tokens(body: dict = fastapi.Body(...)) -> dict:
        return {"tokens": explorer.tokens(body.get("prompt") if isinstance(body, dict) else None)}

    @app.post("/api/jobs")
    def submit(body: dict = fastapi.Body(...)) -> dict:
        job = jobs.submit(str(body.get("kind", "")), Query.from_json(body))
        return {"id": job.id}

    def job_json(job, job_id: str):
        if job is None:
            return JSONResponse({"error": {"field": "id", "message": f"no job {job_id!r}"}}, status_code=404)
        return job.to_json()

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str):
        return job_json(jobs.get(job_id), job_id)

    @app.delete("/api/jobs/{job_id}")
    def cancel(job_id: str):
        return job_json(jobs.cancel(job_id), job_id)

    @app.post("/api/spec")
    def spec(body: dict = fastapi.Body(...)) -> dict:
        return explorer.spec(Query.from_json(body), body.get("source_layer"), body.get("target_layer"))

    return app


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning") -> None:
    """Run the explorer until interrupted (``patchscopes explore``)."""
    check_installed()
    import uvicorn

    uvicorn.run(create_app(explorer), host=host, port=port, log_level=log_level)


__all__ = ["create_app", "serve", "check_installed"]
