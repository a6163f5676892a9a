"""The labeling server: one page for people and a small JSON API that scripts can use too.

    GET  /?token=T          the labeling page (the token rides in the URL once; the page sends it as a header)
    GET  /api/next          the labeler's next batch row, or 204 when their queue is done
    POST /api/judgments     {"batch_id", "prompt_id", "preferred", "idempotency_key", "comment"?}
                            -> 201 stored, 200 repeat of the same key; 4xx with {"error": ...} otherwise
    GET  /api/progress      {"labeler", "batch_id", "done", "total", "remaining"}

Every request needs a valid token (`Authorization: Bearer <token>`; the page also accepts ?token=).
Starlette + uvicorn; the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from rlhf.config import ConfigError
from rlhf.labeling import round_files
from rlhf.labeling.batch import Batch
from rlhf.labeling.store import JudgmentError, JudgmentStore

PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
LABELER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_TOKEN = 8


def read_tokens(path: Path) -> dict[str, str]:
    """token -> labeler from a file of `labeler,token` lines (# comments and blank lines allowed)."""
    tokens, names = {}, set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, tok = (s.strip() for s in line.partition(","))
        where = f"{path}:{n}"
        if not sep or not name or not tok:
            raise ConfigError(f"{where}: expected `labeler,token`")
        if not LABELER_RE.match(name):
            raise ConfigError(f"{where}: labeler {name[:70]!r} must be 1-64 of letters, digits, _ . @ -")
        if len(tok) < MIN_TOKEN:
            raise ConfigError(f"{where}: the token for {name} is shorter than {MIN_TOKEN} characters")
        if tok in tokens or name in names:
            raise ConfigError(f"{where}: labeler or token repeated")
        tokens[tok] = name
        names.add(name)
    if not tokens:
        raise ConfigError(f"{path}: no `labeler,token` lines")
    return tokens


def _csp_hash(tag: str) -> str:
    body = re.search(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_csp_hash('script')}; style-src {_csp_hash('style')}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page URL carries the token
    "Cache-Control": "no-store",
}


def _error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={**SECURITY_HEADERS, **headers})


class TokenAuth:
    """ASGI middleware: every HTTP request names a labeler by a valid token, or gets 401 and goes no further."""

    def __init__(self, app, tokens: dict[str, str]):
        self.app, self.tokens = app, tokens

    def labeler(self, scope) -> str | None:
        supplied = None
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, value = v.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    supplied = value.strip()
        if supplied is None and scope.get("path") == "/" and scope.get("method") == "GET":
            supplied = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[-1]
        if not supplied:
            return None
        for tok, name in self.tokens.items():  # constant time per token
            if hmac.compare_digest(tok.encode(), supplied.encode()):
                return name
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            name = self.labeler(scope)
            if name is None:
                resp = _error(
                    401,
                    "missing or invalid token: send `Authorization: Bearer <token>` (open the page as /?token=<token>)",
                    **{"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send)
                return
            scope.setdefault("state", {})["labeler"] = name
        await self.app(scope, receive, send)


class LabelingAPI:
    """The page and JSON endpoints over one round's judgment store; ``app()`` wraps them in token auth."""

    def __init__(self, store: JudgmentStore, max_body: int = 16384):
        self.store, self.max_body = store, max_body

    async def page(self, request: Request):
        return HTMLResponse(PAGE, headers=SECURITY_HEADERS)

    async def next_row(self, request: Request):
        row = self.store.next_for(request.state.labeler)
        if row is None:
            return Response(status_code=204, headers=SECURITY_HEADERS)
        fields = ("batch_id", "prompt_id", "history", "candidates")
        return JSONResponse({f: row[f] for f in fields}, headers=SECURITY_HEADERS)

    async def progress(self, request: Request):
        return JSONResponse(self.store.progress(request.state.labeler), headers=SECURITY_HEADERS)

    async def judgments(self, request: Request):
        declared = request.headers.get("content-length")
        too_big = f"the body is larger than {self.max_body} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return _error(413, too_big)
        body = b""
        async for chunk in request.stream():  # chunked bodies have no Content-Length: count as they come
            body += chunk
            if len(body) > self.max_body:
                return _error(413, too_big)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return _error(400, f"malformed JSON: {e}")
        try:
            status, rec = await run_in_threadpool(self.store.add, request.state.labeler, payload)
        except JudgmentError as e:
            return _error(e.status, str(e))
        return JSONResponse({"stored": status == 201, "judgment": rec}, status_code=status, headers=SECURITY_HEADERS)

    async def not_found(self, request: Request, exc):
        what = "no such endpoint" if exc.status_code == 404 else "method not allowed"
        return _error(exc.status_code, f"{request.method} {request.url.path[:200]}: {what}")

    def app(self, tokens: dict[str, str]):
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/api/next", self.next_row, methods=["GET"]),
            Route("/api/progress", self.progress, methods=["GET"]),
            Route("/api/judgments", self.judgments, methods=["POST"]),
        ]
        return TokenAuth(
            Starlette(routes=routes, exception_handlers={404: self.not_found, 405: self.not_found}), tokens
        )


def make_app(store: JudgmentStore, tokens: dict[str, str], max_body: int = 16384):
    return LabelingAPI(store, max_body).app(tokens)


def labeler_tokens(token: str | None = None, tokens_file: str | None = None) -> dict[str, str]:
    """token -> labeler: the tokens file's, or one labeler "labeler" with ``token`` (default: a random one)."""
    if tokens_file:
        return read_tokens(Path(tokens_file))
    tok = token or secrets.token_urlsafe(18)
    if len(tok) < MIN_TOKEN:
        raise ConfigError(f"--token must be at least {MIN_TOKEN} characters")
    return {tok: "labeler"}


def announce(prog: str, lc, tokens: dict[str, str], from_file: bool) -> None:
    """Each labeler's page address (a token from a file shown only by its first characters); a warning off loopback."""
    shown_host = f"[{lc.host}]" if ":" in lc.host else lc.host
    if lc.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{prog}: warning: listening on {lc.host}; tokens travel in clear text unless a TLS proxy fronts this")
    for tok, name in tokens.items():
        shown = tok if not from_file else tok[:3] + "…"
        print(f"{prog}: {name}: http://{shown_host}:{lc.port}/?token={shown}", flush=True)


def run_serve(cfg, run_dir: Path, round_no: int, token: str | None = None, tokens_file: str | None = None) -> None:
    import uvicorn

    lc = cfg.label
    batch = Batch.load(run_dir, round_no)
    tokens = labeler_tokens(token, tokens_file)
    store = JudgmentStore(round_files(run_dir, round_no).judgments, batch)
    if store.recovered_bytes:
        print(f"label serve: cut {store.recovered_bytes} bytes of an unfinished last line (never acknowledged)")
    print(f"label serve: {batch.batch_id}, {len(batch.rows)} prompts, {len(store.judgments())} judgments so far")
    announce("label serve", lc, tokens, bool(tokens_file))
    try:
        uvicorn.run(
            make_app(store, tokens, lc.max_body_bytes),
            host=lc.host,
            port=lc.port,
            log_level="warning",
            access_log=False,
        )
    finally:
        store.close()
