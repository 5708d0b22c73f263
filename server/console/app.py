"""The console's web application (Starlette + Jinja2): read-only pages over a coordinator's registries.

Every family: pointed at the coordinator's registry root, the console opens each task family's
registry under it (``server.coordroot.family_registries``) and every page says which family each
adapter, composition, audit problem and evaluation belongs to; a family is picked with the
``family`` query parameter where a name alone is ambiguous (a composition's seq, a run id).

Why Starlette and server-side SVG: the console must run on a coordinator with no internet and be
auditable by reading it; Starlette (already installed with Flower) routes and parses uploads,
Jinja2 escapes every value, and matplotlib draws charts as SVG, so no JavaScript is shipped.

Read-only by construction: each registry is opened with ``Registry(path, read_only=True)`` (no
lock, no Chroma, no writes); uploaded egress logs are parsed in memory (the cross-check reads a
private temporary copy outside the registry) and what they show lives only in this process.
Access: ``create_app(..., token=...)`` requires the token on every request — header
``Authorization: Bearer <token>`` or ``X-RPE-Token``, or the ``rpe_console`` cookie, which a
visit to any page with ``?token=<token>`` sets (HttpOnly, SameSite=Strict, Secure under TLS)
before redirecting to the same page without it (a path on this origin only). ``server/console/cli.py``
decides when a token and TLS are required.

Truth and safety (issue 26): every page carries the verdict of ``server.coordroot.verify_sources``
(``server/console/integrity.py``: the check ``rpe audit verify`` runs) and flags each record and
composition a finding names; the auditor can enter a known head per family and download a signed
audit report. ``server/console/security.py`` refuses any Host but the one the console was started for
(DNS rebinding) and every POST without the session's CSRF token or from another origin; page
handlers are synchronous endpoints (Starlette runs them in its thread pool) and uploads are parsed
and checked in a worker thread, so no request waits for another's work.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from server import auditsign
from server.console import charts, views
from server.console.integrity import Integrity, IntegrityCache, parse_anchor
from server.console.security import CSRF_FIELD, SESSION_COOKIE, Csrf, HostGuard, same_origin_path
from server.console.views import ConsoleInputError, FamilyView
from server.coordroot import family_registries
from server.crosscheck import cross_check
from server.nearness import summary as nearness_summary
from server.registry import Registry

HERE = Path(__file__).resolve().parent
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # an egress log line is ~1-3 kB: 8 MiB is thousands of replies
COOKIE = "rpe_console"
MAX_REMEMBERED_UPLOADS = 64
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # nothing to other sites; the console's own forms keep their Origin
    "Cache-Control": "no-store",
}


def _fmt(value: Any, digits: int = 4) -> str:
    """Numbers as the pages show them (the browser test parses the same text)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}g}"
    return str(value)


class TokenMiddleware(BaseHTTPMiddleware):
    """Refuse every request without the access token (constant-time comparison)."""

    def __init__(self, app: Any, token: str, secure_cookie: bool) -> None:
        super().__init__(app)
        self.token = token
        self.secure_cookie = secure_cookie

    def _ok(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not self._ok(given):
                return _plain(401, "wrong access token; ask the coordinator operator for the console's token")
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            resp = RedirectResponse(same_origin_path(request.url.path, urlencode(rest)), status_code=303)
            resp.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", secure=self.secure_cookie)
            return resp
        auth = request.headers.get("authorization", "")
        header = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-rpe-token")
        if not (self._ok(header) or self._ok(request.cookies.get(COOKIE))):
            return _plain(
                401,
                "this console needs its access token: open it once with ?token=<token> (printed "
                "by `rpe console` and stored in its token file), or send Authorization: Bearer <token>",
            )
        return await call_next(request)


def _plain(status: int, message: str) -> Response:
    return Response(
        message + "\n", status_code=status, media_type="text/plain; charset=utf-8", headers=SECURITY_HEADERS
    )


class Console:
    """The state of one console: every family's read-only registry, and uploaded summaries."""

    def __init__(self, registry_dir: str | os.PathLike[str], blob_key: Any = None) -> None:
        root = Path(registry_dir).expanduser().resolve()
        found = family_registries(root)
        if not found:
            Registry(root, read_only=True, blob_key=blob_key)  # raises the registry's own clear error
            found = {root.name: root}
        self.root = root
        self.families: list[FamilyView] = views.open_families(found, blob_key=blob_key)
        self.uploads: dict[str, dict[str, Any]] = {}  # site -> spent summary of its uploaded egress log
        self.checks: dict[str, dict[str, Any]] = {}  # site -> its last cross-check here (for the report)
        self.anchors: dict[str, dict[str, Any]] = {}  # family -> the known head the auditor entered
        self.integrity_cache = IntegrityCache()
        self.csrf = Csrf()
        self.secure_cookie = False
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.templates.env.filters["fmt"] = _fmt

    def family(self, request: Request) -> FamilyView:
        """The family the request names (``?family=``), the root's when it names none."""
        return views.family(self.families, request.query_params.get("family"))

    # -- helpers --------------------------------------------------------------------------------
    def integrity(self) -> Integrity:
        """The shared check's verdict (``server.console.integrity``), cached per state of the files."""
        return self.integrity_cache.get(self.families, self.anchors)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        """A page, with the integrity banner and the CSRF token of the browser's session (created here)."""
        context.setdefault("nav", name.split(".")[0])
        context["registry_path"] = str(self.root)
        context["families"] = [
            {"name": f.name, "path": _rel(f.path, self.root), "records": f.stats()["records"], "error": f.error}
            for f in self.families
        ]
        context.setdefault("integrity", self.integrity())
        context["banner"] = context["integrity"].banner()
        session = Csrf.session(request)
        fresh = session is None
        if session is None:
            session = secrets.token_urlsafe(24)
        context["csrf"] = self.csrf.token(session)
        resp = self.templates.TemplateResponse(request, name, context, status_code=status, headers=SECURITY_HEADERS)
        if fresh:
            resp.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", secure=self.secure_cookie)
        return resp

    def error(self, request: Request, status: int, message: str, back: str = "/") -> Response:
        return self.page(request, "error.html", status=status, message=message, back=back, nav="")

    async def upload(self, request: Request) -> tuple[bytes, str, dict[str, str]]:
        """The one uploaded file (capped) and the other form fields; ConsoleInputError on anything else
        (a cross-site or token-less form included: nothing is read or kept then)."""
        why = self.csrf.origin_problem(request)
        if why:
            raise ConsoleInputError(why)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise ConsoleInputError("the upload has no Content-Length; send it as a normal form upload")
        if int(length) > MAX_UPLOAD_BYTES + 64 * 1024:
            raise ConsoleInputError(
                f"the upload is {int(length):,} bytes; the console accepts egress logs up to "
                f"{MAX_UPLOAD_BYTES:,} bytes (check offline: rpe audit cross-check / rpe "
                "privacy spent)"
            )
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
        except Exception as exc:  # noqa: BLE001 - multipart parser errors are the client's fault
            raise ConsoleInputError(f"the upload is not a valid form ({type(exc).__name__}: {exc})") from None
        file = form.get("egress")
        if file is None or isinstance(file, str):
            raise ConsoleInputError("choose an egress log file (the site's <site-dir>/egress.jsonl) to upload")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise ConsoleInputError(f"{file.filename}: larger than {MAX_UPLOAD_BYTES:,} bytes; not accepted")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        why = self.csrf.check(request, fields.get(CSRF_FIELD))
        if why:
            raise ConsoleInputError(why)
        return data, file.filename or "upload", fields

    # -- pages ----------------------------------------------------------------------------------
    def overview(self, request: Request) -> Response:
        stats = [{"family": f.name, "path": _rel(f.path, self.root), **f.stats()} for f in self.families]
        return self.page(
            request,
            "overview.html",
            stats=stats,
            total={k: sum(s[k] for s in stats) for k in ("records", "removed")},
            sites=views.sites(self.families),
            disk=views.disk_bytes(self.root),
            audit=views.audit_statuses(self.families, self.integrity().verdicts),
            bases=views.bases(self.families),
            encryption={f.name: f.registry.blob_encryption for f in self.families if f.registry is not None},
        )

    def registry_page(self, request: Request) -> Response:
        q = request.query_params
        sort, desc = q.get("sort", "created"), q.get("order") == "desc"
        try:
            chosen = [self.family(request)] if q.get("family") else self.families
            rows = views.records(
                self.families,
                site=q.get("site"),
                task=q.get("task"),
                text=q.get("q"),
                sort=sort,
                descending=desc,
                family_name=q.get("family"),
            )
        except ConsoleInputError as exc:
            return self.error(request, 400, str(exc), "/registry")
        integ = self.integrity()
        for r in rows:
            r["flags"] = integ.record_flags(r["family"], r["id"])
        colour = q.get("colour", "site")
        if colour not in ("site", "task"):
            return self.error(request, 400, f"the map can be coloured by site or task, not {colour!r}", "/registry")
        filters = {k: q.get(k, "") for k in ("family", "site", "task", "q")}
        opened = [f.registry for f in self.families if f.registry is not None]
        return self.page(
            request,
            "registry.html",
            rows=rows,
            total=sum(len(reg) for reg in opened),
            sort=sort,
            desc=desc,
            colour=colour,
            filters=filters,
            maps=[f.name for f in chosen if f.registry is not None],
            sites=sorted({s for reg in opened for s in reg.distinct("site")}),
            tasks=sorted({t for reg in opened for t in reg.distinct("task")}),
            query=urlencode({k: v for k, v in {**filters, "colour": colour}.items() if v}),
            map_query=urlencode({k: v for k, v in {**filters, "colour": colour}.items() if v and k != "family"}),
        )

    def registry_map(self, request: Request) -> Response:
        q = request.query_params
        colour = q.get("colour", "site")
        if colour not in ("site", "task"):
            return _plain(400, f"colour must be site or task, not {colour!r}")
        try:
            fam = self.family(request)
        except ConsoleInputError as exc:
            return _plain(400, str(exc))
        reg = fam.registry
        if reg is None:
            return _plain(404, f"the {fam.name} registry cannot be opened: {fam.error}")
        recs = reg.list(site=q.get("site") or None, task=q.get("task") or None)
        if q.get("q"):
            recs = [r for r in recs if q["q"].lower() in r.id.lower()]
        coords, explained = charts.pca_2d(reg.embeddings([r.id for r in recs]) if recs else _empty(reg.embedding_dim))
        labels = [r.meta.site if colour == "site" else r.meta.task for r in recs]
        svg = charts.pca_map_svg(coords, labels, explained, colour, title=fam.name)
        return Response(svg, media_type="image/svg+xml", headers=SECURITY_HEADERS)

    def record_page(self, request: Request) -> Response:
        rid = request.path_params["record_id"]
        try:
            detail = views.record_detail(self.families, rid, request.query_params.get("family"))
        except ConsoleInputError as exc:
            return self.error(request, 404, str(exc), "/registry")
        fam = views.family(self.families, detail["family"])
        used = [c for c in views.compositions([fam]) if rid in c["retrieved"]]
        flags = self.integrity().record_flags(detail["family"], rid)
        return self.page(request, "record.html", rec=detail, used=used, nav="registry", flags=flags)

    def compositions_page(self, request: Request) -> Response:
        integ = self.integrity()
        comps = [{**c, "flags": integ.line_flags(c["family"], c["line"])} for c in views.compositions(self.families)]
        heads = views.audit_reports(self.families)
        return self.page(request, "compositions.html", comps=comps, heads=heads, anchors=self.anchors)

    def _composition(self, request: Request) -> dict[str, Any]:
        return views.composition(self.families, int(request.path_params["seq"]), request.query_params.get("family"))

    def composition_page(self, request: Request) -> Response:
        try:
            c = self._composition(request)
        except ConsoleInputError as exc:
            return self.error(request, 404, str(exc), "/compositions")
        reg = views.family(self.families, c["family"]).registry
        known = set(reg.ids()) if reg is not None else set()
        rows = [
            {"id": i, "distance": d, "weight": w, "sha": h, "live": i in known, **scaled}
            for i, d, w, h, scaled in zip(
                c["retrieved"], c["distances"], c["weights"], c["adapter_sha256"], c["update_norm"]["rows"]
            )
        ]
        c["flags"] = self.integrity().line_flags(c["family"], c["line"])
        return self.page(
            request,
            "composition.html",
            c=c,
            rows=rows,
            nav="compositions",
            weight_sum=sum(float(w) for w in c["weights"]),
            nearness_text=nearness_summary(c["nearness"]),
        )

    def composition_chart(self, request: Request) -> Response:
        try:
            c = self._composition(request)
        except ConsoleInputError as exc:
            return _plain(404, str(exc))
        svg = charts.weights_svg(
            c["retrieved"], c["weights"], f"{c['family']}: {c['strategy']} weights for {c['target']}"
        )
        return Response(svg, media_type="image/svg+xml", headers=SECURITY_HEADERS)

    def audit_page(
        self,
        request: Request,
        check: dict[str, Any] | None = None,
        status: int = 200,
        upload_error: str | None = None,
        anchor_error: str | None = None,
    ) -> Response:
        integ = self.integrity()
        return self.page(
            request,
            "audit.html",
            status=status,
            integrity=integ,
            audit=views.audit_statuses(self.families, integ.verdicts),
            reports=views.audit_reports(self.families),
            check=check,
            upload_error=upload_error,
            anchor_error=anchor_error,
            anchors=self.anchors,
            sites=[s["site"] for s in views.sites(self.families)],
            max_upload=MAX_UPLOAD_BYTES,
        )

    def audit_get(self, request: Request) -> Response:
        return self.audit_page(request)

    def _cross_check(self, data: bytes, name: str, site: str) -> dict[str, Any]:
        """Parse and cross-check an uploaded egress log (a worker thread: megabytes of JSON and every
        family's log must not stop the other requests)."""
        views.parse_egress(data, name)
        with tempfile.TemporaryDirectory(prefix="rpe-console-") as tmp:
            path = Path(tmp) / "egress.jsonl"
            path.write_bytes(data)
            logs = {f.name: f.audit_path for f in self.families}  # one check over every family's log
            rep = cross_check(path, logs, site)
        return {"site": site, "file": name, "ok": rep.ok, "text": rep.format(), **rep.to_dict()}

    async def cross_check_post(self, request: Request) -> Response:
        try:
            data, name, fields = await self.upload(request)
            site = fields.get("site", "").strip()
            if not site:
                raise ConsoleInputError("say which site the egress log belongs to")
            check = await run_in_threadpool(self._cross_check, data, name, site)
        except ConsoleInputError as exc:
            return await run_in_threadpool(self.audit_page, request, None, 400, str(exc))
        if site not in self.checks and len(self.checks) >= MAX_REMEMBERED_UPLOADS:
            self.checks.pop(next(iter(self.checks)))
        self.checks[site] = check
        return await run_in_threadpool(self.audit_page, request, check)

    async def anchor_post(self, request: Request) -> Response:
        """The auditor enters a known head of a family's log (or clears it): every page then checks
        the log against it, so a truncated or rewritten tail is named."""
        try:
            why = self.csrf.origin_problem(request)
            if why:
                raise ConsoleInputError(why)
            try:
                form = await request.form(max_files=0, max_fields=4, max_part_size=4096)
            except Exception as exc:  # noqa: BLE001 - a malformed form is the client's fault
                raise ConsoleInputError(f"the anchor form is not a valid form ({type(exc).__name__})") from None
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            why = self.csrf.check(request, fields.get(CSRF_FIELD))
            if why:
                raise ConsoleInputError(why)
            fam = views.family(self.families, fields.get("family", ""))
            text = fields.get("anchor", "").strip()
            if text:
                try:
                    self.anchors[fam.name] = parse_anchor(text)
                except ValueError as exc:
                    raise ConsoleInputError(str(exc)) from None
            else:
                self.anchors.pop(fam.name, None)
        except ConsoleInputError as exc:
            return await run_in_threadpool(self.audit_page, request, None, 400, None, str(exc))
        return RedirectResponse("/audit", status_code=303)

    def audit_report_file(self, request: Request) -> Response:
        """The signed audit report (``server.auditsign``) of what this console found: verify of every
        family (with the anchors entered), the per-site reports and the cross-checks run here."""
        from server.registry.coordkey import key_paths, load_key

        fmt = request.path_params["fmt"]
        if fmt not in ("json", "html"):
            return _plain(404, "the report is offered as report.json or report.html")
        key_file = key_paths(self.root)[0]
        if not key_file.is_file():
            return _plain(404, f"{key_file} does not exist: the report is signed with the registry's coordinator key")
        integ = self.integrity()
        reports = {f.name: views.audit_report(f.audit_path) for f in self.families if f.audit_path.is_file()}
        body = auditsign.build_body(integ.verdicts, reports, self.checks, str(self.root), self.anchors)
        doc = auditsign.sign(load_key(self.root), body)
        if fmt == "html":
            return Response(auditsign.to_html(doc), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)
        headers = {**SECURITY_HEADERS, "Content-Disposition": 'attachment; filename="rpe-audit-report.json"'}
        return Response(auditsign.to_json(doc), media_type="application/json", headers=headers)

    def privacy_page(self, request: Request, status: int = 200, upload_error: str | None = None) -> Response:
        return self.page(
            request,
            "privacy.html",
            status=status,
            recorded=views.recorded_privacy(self.families),
            uploads=self.uploads,
            upload_error=upload_error,
            max_upload=MAX_UPLOAD_BYTES,
        )

    def privacy_get(self, request: Request) -> Response:
        return self.privacy_page(request)

    async def privacy_post(self, request: Request) -> Response:
        try:
            data, name, fields = await self.upload(request)
            site = fields.get("site", "").strip()
            if not site:
                raise ConsoleInputError("say which site the egress log belongs to")
            summary = await run_in_threadpool(lambda: views.spent(views.parse_egress(data, name)))
        except ConsoleInputError as exc:
            return await run_in_threadpool(self.privacy_page, request, 400, str(exc))
        if site not in self.uploads and len(self.uploads) >= MAX_REMEMBERED_UPLOADS:
            self.uploads.pop(next(iter(self.uploads)))
        self.uploads[site] = {**summary, "file": name}
        return await run_in_threadpool(self.privacy_page, request)

    def evaluations_page(self, request: Request) -> Response:
        return self.page(request, "evaluations.html", runs=views.evaluation_runs(self.families))

    def evaluation_page(self, request: Request) -> Response:
        try:
            ev = views.evaluation(self.families, request.path_params["run_id"], request.query_params.get("family"))
        except ConsoleInputError as exc:
            return self.error(request, 404, str(exc), "/evaluations")
        return self.page(request, "evaluation.html", ev=ev, nav="evaluations")

    def evaluation_file(self, request: Request) -> Response:
        try:
            path = views.evaluation_file(
                self.families,
                request.path_params["run_id"],
                request.path_params["name"],
                request.query_params.get("family"),
            )
        except ConsoleInputError as exc:
            return _plain(404, str(exc))
        return FileResponse(path, headers=SECURITY_HEADERS)

    def not_found(self, request: Request, exc: Exception) -> Response:
        return self.error(request, 404, f"no page {request.url.path!r}; use the links above")


def _rel(path: Path, root: Path) -> str:
    """A family registry's directory as the pages show it: relative to the root (``.`` for the root)."""
    try:
        return str(path.resolve().relative_to(root)) or "."
    except ValueError:
        return str(path)


def _empty(dim: int) -> np.ndarray:
    return np.zeros((0, dim), dtype=np.float32)


def create_app(
    registry_dir: str | os.PathLike[str],
    token: str | None = None,
    secure_cookie: bool = False,
    blob_key: Any = None,
    hosts: Any = None,
) -> Starlette:
    """The console for the coordinator's registry root ``registry_dir`` (every family under it); with
    ``token``, every request must carry it; with ``hosts`` (``security.allowed_hosts``: what
    ``rpe console`` passes), a request for any other Host is refused (see the module doc)."""
    c = Console(registry_dir, blob_key=blob_key)
    c.secure_cookie = secure_cookie
    routes = [
        Route("/", c.overview),
        Route("/registry", c.registry_page),
        Route("/registry/map.svg", c.registry_map),
        Route("/registry/record/{record_id:path}", c.record_page),
        Route("/compositions", c.compositions_page),
        Route("/compositions/{seq:int}", c.composition_page),
        Route("/compositions/{seq:int}/weights.svg", c.composition_chart),
        Route("/audit", c.audit_get),
        Route("/audit/cross-check", c.cross_check_post, methods=["POST"]),
        Route("/audit/anchor", c.anchor_post, methods=["POST"]),
        Route("/audit/report.{fmt}", c.audit_report_file),
        Route("/privacy", c.privacy_get),
        Route("/privacy/egress", c.privacy_post, methods=["POST"]),
        Route("/evaluations", c.evaluations_page),
        Route("/evaluations/{run_id}", c.evaluation_page),
        Route("/evaluations/{run_id}/files/{name}", c.evaluation_file),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(HostGuard, hosts=hosts)] if hosts is not None else []  # first: before the token
    middleware += [Middleware(TokenMiddleware, token=token, secure_cookie=secure_cookie)] if token else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: c.not_found})
    app.state.console = c
    return app
