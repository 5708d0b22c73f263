"""Issue 26, class 8: the console itself. Each defect against a real ``python -m server.console``
process on 127.0.0.1 (raw HTTP, as an attacker's page or a rebinding name would send it):

- a Host that is not the one the console was started for (DNS rebinding) gets nothing;
- a form POST without the session's CSRF token, or from another origin, changes nothing;
- an 8 MiB upload being checked does not stop other requests (worker thread), and a larger one is refused;
- deep JSON in an upload is a clear 400, not a 500;
- a task name with ``$`` (mathtext) and a site named ``_x`` (dropped from a legend) draw literally;
- ``?token=`` never redirects off-site.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import uuid

import numpy as np
import pytest
from support.console import BASE, DIM, SHAPES, Console, _adapter

from server.composer import compose_for_target
from server.registry import AdapterMeta, Registry

ODD = {"_x": "$x^{$", "ok": "plain", "$a$": "_t"}  # site -> task: names a lying site could pick


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = tmp_path_factory.mktemp("console-sec")
    reg = Registry.init(root / "reg", base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM, chroma_host=None)
    rng = np.random.default_rng(3)
    for i, (site, task) in enumerate(ODD.items()):
        for j in range(2):
            z = (rng.standard_normal(DIM) + 3 * i).astype(np.float32)
            meta = AdapterMeta(site=site, task=task, modality="text", base_fingerprint=BASE, sample_count=5 + j)
            reg.add(_adapter(10 * i + j), z, meta)
    res = compose_for_target(reg, rng.standard_normal(DIM), strategy="sim", k=3, target="$t^{$", out_dir=None)
    reg.close()
    return {"root": root / "reg", "tmp": root, "composed": res}


@pytest.fixture
def console(odd, tmp_path):
    c = Console(odd["root"], tmp_path / "console.log")
    yield c
    c.stop()


def _req(c: Console, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=timeout)
    try:
        h = {"Host": f"127.0.0.1:{c.port}", **(headers or {})}
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _multipart(fields: dict[str, str], data: bytes, name: str = "egress.jsonl") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="egress"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _session(c: Console, page: str = "/privacy") -> tuple[str, str]:
    """(cookie header, csrf token) as the console's own page gives a browser."""
    status, headers, body = _req(c, "GET", page)
    assert status == 200
    cookie = re.search(r"rpe_session=([^;]+)", headers.get("set-cookie", "")).group(1)
    token = re.search(rb'name="csrf" value="([0-9a-f]+)"', body).group(1).decode()
    return f"rpe_session={cookie}", token


def _egress_lines(n: int, pad: int = 0) -> bytes:
    line = {
        "v": 1,
        "ts": "2026-01-01T00:00:00Z",
        "message_type": "train",
        "run_id": "1",
        "records": [],
        "total_bytes": 0,
        "extra": {"outcome": "ok", "pad": "x" * pad},
    }
    return b"".join(json.dumps({**line, "run_id": str(i)}).encode() + b"\n" for i in range(n))


def test_a_foreign_host_header_is_refused(console):
    status, _, body = _req(console, "GET", "/", headers={"Host": f"attacker.example:{console.port}"})
    assert status == 421 and b"DNS rebinding" in body and b"registry" not in body.lower()
    for host in (f"127.0.0.1:{console.port + 1}", "127.0.0.1", "", "localhost.attacker.example"):
        assert _req(console, "GET", "/audit", headers={"Host": host})[0] == 421, host
    assert _req(console, "GET", "/", headers={"Host": f"localhost:{console.port}"})[0] == 200
    assert _req(console, "GET", "/")[0] == 200


def test_a_cross_site_form_post_changes_nothing(console):
    data = _egress_lines(2)
    body, ctype = _multipart({"site": "victim"}, data)
    attacker = {"Content-Type": ctype, "Origin": "http://attacker.example", "Sec-Fetch-Site": "cross-site"}
    status, _, page = _req(console, "POST", "/privacy/egress", body, attacker)
    assert status == 400 and b"another site" in page
    cookie, token = _session(console)
    # the browser's own cookie, but no token (a form on another site cannot read it)
    body, ctype = _multipart({"site": "victim"}, data)
    status, _, page = _req(console, "POST", "/privacy/egress", body, {"Content-Type": ctype, "Cookie": cookie})
    assert status == 400 and b"security token" in page
    body, ctype = _multipart({"site": "victim", "csrf": "0" * 64}, data)
    status, _, page = _req(console, "POST", "/privacy/egress", body, {"Content-Type": ctype, "Cookie": cookie})
    assert status == 400 and b"security token" in page
    assert b"victim" not in _req(console, "GET", "/privacy", headers={"Cookie": cookie})[2]
    # the console's own form, with its token: accepted
    body, ctype = _multipart({"site": "victim", "csrf": token}, data)
    origin = {"Origin": f"http://127.0.0.1:{console.port}", "Sec-Fetch-Site": "same-origin"}
    status, _, page = _req(
        console, "POST", "/privacy/egress", body, {"Content-Type": ctype, "Cookie": cookie, **origin}
    )
    assert status == 200 and b"victim" in page
    # a token is bound to its session: another browser's token does not work with this cookie
    other_cookie, other_token = _session(console)
    assert other_token != token
    body, ctype = _multipart({"site": "victim2", "csrf": other_token}, data)
    status, _, _ = _req(console, "POST", "/privacy/egress", body, {"Content-Type": ctype, "Cookie": cookie})
    assert status == 400


def test_an_8_mib_upload_does_not_block_other_requests(console):
    cookie, token = _session(console, "/audit")
    data = _egress_lines(50000)  # many lines: seconds of parsing and matching
    assert 7e6 < len(data) <= 8 * 1024 * 1024
    body, ctype = _multipart({"site": "ok", "csrf": token}, data)
    done: dict[str, float] = {}

    def upload() -> None:
        t0 = time.monotonic()
        done["status"] = _req(console, "POST", "/audit/cross-check", body, {"Content-Type": ctype, "Cookie": cookie})[0]
        done["upload_s"] = time.monotonic() - t0

    th = threading.Thread(target=upload)
    th.start()
    time.sleep(0.3)
    lat = []
    while th.is_alive() and len(lat) < 20:
        t0 = time.monotonic()
        assert _req(console, "GET", "/static/console.css", timeout=30)[0] == 200
        lat.append(time.monotonic() - t0)
        time.sleep(0.05)
    th.join(120)
    assert done.get("status") == 200, done
    assert lat, f"the upload took {done['upload_s']:.2f} s: too quick to measure"
    assert max(lat) < max(1.0, done["upload_s"] / 3), (lat, done)
    # over the bound: refused before it is read
    big, ctype = _multipart({"site": "ok", "csrf": token}, b"x" * (9 * 1024 * 1024))
    status, _, page = _req(console, "POST", "/audit/cross-check", big, {"Content-Type": ctype, "Cookie": cookie})
    assert status == 400 and b"accepts egress logs up to" in page


def test_deep_json_in_an_upload_is_a_clear_400(console):
    cookie, token = _session(console, "/audit")
    deep = b"[" * 200_000 + b"]" * 200_000 + b"\n"
    for path in ("/audit/cross-check", "/privacy/egress"):
        body, ctype = _multipart({"site": "ok", "csrf": token}, deep)
        status, _, page = _req(console, "POST", path, body, {"Content-Type": ctype, "Cookie": cookie})
        assert status == 400 and b"nested deeper than" in page, (path, status, page[-400:])


def test_odd_names_draw_literally_in_the_charts(console, odd):
    for colour in ("site", "task"):
        status, _, svg = _req(console, "GET", f"/registry/map.svg?colour={colour}")
        assert status == 200, svg[-300:]
        labels = re.findall(r"<!-- (.*?) -->", svg.decode())
        names = list(ODD) if colour == "site" else list(ODD.values())
        for name in names:  # every name in the legend, as given (a leading _ behind a zero-width space)
            assert any(lab in (name, "\u200b" + name) for lab in labels), (name, labels)
    seq = int(_req(console, "GET", "/compositions")[2].decode().split('data-seq="')[1].split('"')[0])
    status, _, svg = _req(console, "GET", f"/compositions/{seq}/weights.svg")
    assert status == 200 and "weights for $t^{$" in svg.decode(), svg[-500:]


def test_token_redirect_stays_on_this_origin(odd, tmp_path):
    token_file = tmp_path / "tok"
    c = Console(odd["root"], tmp_path / "console.log", "--token-file", str(token_file))
    try:
        token = token_file.read_text().strip()
        for path in ("//attacker.example", "/\\attacker.example", "//attacker.example/x?y=1", "/%2F%2Fattacker"):
            status, headers, _ = _req(c, "GET", f"{path}{'&' if '?' in path else '?'}token={token}")
            loc = headers.get("location", "")
            assert status == 303 and loc.startswith("/") and not loc.startswith("//") and "\\" not in loc, (path, loc)
        status, headers, _ = _req(c, "GET", f"/registry?site=a&token={token}")
        assert status == 303 and headers["location"] == "/registry?site=a"
    finally:
        c.stop()
