"""The explorer's web server: FastAPI over `service.Jobs`, and the static page (``static/``).

FastAPI because a Python ML user knows it (type-checked JSON endpoints, served by uvicorn) and it keeps
the page a plain HTML + JavaScript file we control and test in a real browser; Gradio would hide the
page's structure behind its own components and websocket protocol. The server binds to 127.0.0.1 unless
told otherwise; every model call goes through the one job queue.

Every request passes `guard.Guard` first (trusted Host, own Origin, JSON posts, a size cap). Bodies are
parsed here, strictly (UTF-8, no ``NaN``, no unknown fields), and every 4xx, FastAPI's own included, has
one shape: ``{"error": {"field": ..., "message": ...}}``.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at once
import contextlib
import json
import socket
from importlib import resources
from typing import Any, Iterable

from ..errors import PatchscopeError
from .explorer import Explorer
from .guard import LOCAL_HOSTS, MAX_BODY_BYTES, Guard, error_body, normal_host
from .jobs import Jobs, QueueFull
from .query import FieldError, Query

FIELDS = {  # what each endpoint's body may hold
    "tokens": {"prompt"},
    "jobs": {"kind", "prompt", "position", "preset", "target_prompt", "variant", "verify"},
    "spec": {
        "kind",
        "prompt",
        "position",
        "preset",
        "target_prompt",
        "variant",
        "verify",
        "source_layer",
        "target_layer",
    },
}
MAX_ID_CHARS = 64


def check_installed() -> None:
    """Refuse at once, naming the extra, when fastapi or uvicorn is missing."""
    _fastapi()
    try:
        import uvicorn  # noqa: F401  (only whether it imports)
    except ImportError:
        raise PatchscopeError(
            "the explorer needs the app extra: pip install 'pyvene-patchscopes[app]' (fastapi, uvicorn)"
        ) from None


def _fastapi():
    try:
        import fastapi
        import fastapi.responses
        import fastapi.staticfiles
    except ImportError:
        raise PatchscopeError(
            "the explorer needs the app extra: pip install 'pyvene-patchscopes[app]' (fastapi, uvicorn)"
        ) from None
    return fastapi


def _refuse_constant(name: str) -> Any:
    raise FieldError("request", f"the body holds {name}, which is not JSON (allowed: finite numbers)")


def parse_body(body: bytes, endpoint: str) -> dict[str, Any]:
    """A request body as a JSON object: UTF-8, strict JSON (no NaN or Infinity), only the endpoint's fields."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FieldError("request", f"the body is not UTF-8 (bad byte at offset {err.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise FieldError(
            "request", f"the body is malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise FieldError("request", "the body is nested too deeply (allowed: a flat JSON object)") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise FieldError("request", "the body holds a number too long to read (allowed: ordinary numbers)") from None
    if not isinstance(data, dict):
        raise FieldError(
            "request",
            f"the body is not a JSON object (allowed: an object with the fields {', '.join(sorted(FIELDS[endpoint]))})",
        )
    unknown = sorted(set(data) - FIELDS[endpoint])
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise FieldError(unknown[0][:40], f"unknown field(s) {shown} (allowed: {', '.join(sorted(FIELDS[endpoint]))})")
    return data


def create_app(explorer: Explorer, allowed_hosts: Iterable[str] = LOCAL_HOSTS, max_body: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI app serving `explorer`: the page at ``/``, the JSON API under ``/api``.

    `allowed_hosts` are the names the ``Host`` header may carry (localhost names by default); `app.state.jobs`
    is the queue, and `app.state.jobs.close()` runs when the app shuts down.
    """
    fastapi = _fastapi()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    jobs = Jobs(explorer)

    @contextlib.asynccontextmanager
    async def lifespan(app):  # noqa: ARG001
        yield
        jobs.close()

    app = fastapi.FastAPI(
        title="Patchscopes explorer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.jobs = jobs
    static = resources.files("pyvene_patchscopes.explore") / "static"

    def refuse(status: int, field: str, message: str, headers: dict[str, str] | None = None):
        return JSONResponse(error_body(field, message), status_code=status, headers=headers)

    @app.exception_handler(FieldError)
    async def field_error(request, error: FieldError):  # noqa: ARG001
        return refuse(422, error.field, str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request, error: QueueFull):  # noqa: ARG001
        return refuse(429, "request", str(error), {"Retry-After": "2"})

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # noqa: ARG001
        field = "path" if error.status_code in (404, 405) else "request"
        message = {404: "no such page or endpoint", 405: "this method is not allowed here"}.get(
            error.status_code, str(error.detail)
        )
        return refuse(error.status_code, field, message)

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):  # noqa: ARG001 (a bug: still the one shape, no traceback)
        return refuse(500, "request", f"the explorer failed on this request ({type(error).__name__})")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):  # noqa: ARG001
        where = next(
            (str(part) for e in error.errors() for part in reversed(e.get("loc", ())) if part != "body"), "request"
        )
        return refuse(422, where, "the request does not fit this endpoint")

    async def body_of(request, endpoint: str) -> dict[str, Any]:
        return parse_body(await request.body(), endpoint)

    @app.get("/")
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    heatmap = ("pyvene_patchscopes.export", "static")  # heatmap.js and .css, shared with the exported pages
    app.mount("/static", StaticFiles(directory=str(static), packages=[heatmap]), name="static")

    @app.get("/api/info")
    def info() -> dict:
        return explorer.info()

    @app.post("/api/tokens")
    async def tokens(request: Request):
        data = await body_of(request, "tokens")
        return explorer.tokens(data.get("prompt"))

    @app.post("/api/jobs")
    async def submit(request: Request):
        data = await body_of(request, "jobs")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise FieldError("kind", "kind is missing or not text (allowed: layers, grid, jacobian)")
        job = jobs.submit(kind, Query.from_json(data))
        return {"id": job.id, "warnings": job.warnings}

    def job_json(job_id: str, cancel: bool = False):
        job = None if len(job_id) > MAX_ID_CHARS else (jobs.cancel(job_id) if cancel else jobs.get(job_id))
        if job is None:
            return refuse(404, "id", "no job has this id (finished jobs are kept for a while, then dropped)")
        return job.to_json()

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str):
        return job_json(job_id)

    @app.delete("/api/jobs/{job_id}")
    def cancel(job_id: str):
        return job_json(job_id, cancel=True)

    @app.post("/api/spec")
    async def spec(request: Request):
        data = await body_of(request, "spec")
        return explorer.spec(Query.from_json(data), data.get("source_layer"), data.get("target_layer"))

    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts), max_body=max_body)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or the library's error naming the flag when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise PatchscopeError(f"--host={host!r} is not an address of this machine ({err})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        reason = "it is in use" if err.errno in (98, 48) else (err.strerror or type(err).__name__)
        raise PatchscopeError(
            f"--port={port}: cannot listen on {host}:{port} ({reason}; allowed: a free port, e.g. --port 0 for any)"
        ) from None
    return sock


def hosts_for(host: str, allow: Iterable[str] = ()) -> list[str]:
    """The Host names to answer: localhost names, the bound address itself, and the ones allowed by flag."""
    names = list(LOCAL_HOSTS) + [normal_host(host)] + [normal_host(name) for name in allow]
    return list(dict.fromkeys(n for n in names if n and n not in ("0.0.0.0", "::")))


def serve(
    explorer: Explorer, sock: socket.socket, allowed_hosts: Iterable[str] = LOCAL_HOSTS, log_level: str = "warning"
) -> None:
    """Run the explorer on the bound `sock` until interrupted (``patchscopes explore``); on Ctrl-C the running
    job stops before its next layer and the worker is joined before the process exits."""
    check_installed()
    import uvicorn

    app = create_app(explorer, allowed_hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on; the shutdown is done
        pass
    finally:
        app.state.jobs.close()
        sock.close()


__all__ = ["create_app", "serve", "bind", "hosts_for", "check_installed", "parse_body", "FIELDS"]
