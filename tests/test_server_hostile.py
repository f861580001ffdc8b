"""Hostile requests against a live server on loopback (issue 17): each is refused with the right status, changes
nothing, and a normal job still finishes afterwards.

Classes: oversized chunked bodies; lone surrogates; deeply nested JSON; decompression and text-chunk bombs on
every image route; a gallery file swapped for a symlink or gone; a foreign Host header (DNS rebinding);
cross-site text/plain, form and bodyless POSTs; a CORS preflight on a server with auth."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image, PngImagePlugin

from dapple.interfaces.guard import default_allowed_hosts
from dapple.interfaces.server import create_app
from dapple.service.jobs import JobService

FAST = {"prompt": "a red circle", "steps": 2, "seed": 3}
STUDIO_ORIGIN = "https://studio.example"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    def __init__(self, data: Path, pipe, **options) -> None:
        self.service = JobService(data, lambda: pipe)
        self.service.start()
        self.port = _free_port()
        app = create_app(self.service, model_name="tiny", allowed_hosts=default_allowed_hosts("127.0.0.1"),
                         **options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory, pipe):
    server = LiveServer(tmp_path_factory.mktemp("hostile"), pipe, cors_origins=[STUDIO_ORIGIN])
    yield server
    server.close()


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _png(width: int = 64, height: int = 64, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _pixel_bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (10 gigapixels) with almost no data."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        _chunk(b"IEND", b"")


def _text_bomb() -> bytes:
    """A small PNG with a zTXt chunk, before the image data as infotext is, that inflates to 200 MB."""
    png = _png()
    payload = b"parameters\0\0" + zlib.compress(b"A" * (200 * 2**20), 9)
    return png[:33] + _chunk(b"zTXt", payload) + png[33:]  # after the 8-byte signature and the IHDR chunk


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _job_finishes(http: httpx.Client) -> None:
    """The server still works: a normal job runs to the end."""
    accepted = http.post("/api/v1/jobs", json=FAST)
    assert accepted.status_code == 202, accepted.text
    for _ in range(600):
        job = http.get(f"/api/v1/jobs/{accepted.json()['id']}").json()
        if job["status"] in ("finished", "failed", "cancelled"):
            assert job["status"] == "finished", job
            return
        time.sleep(0.05)
    raise AssertionError("the job did not end")


def _job_count(http: httpx.Client) -> int:
    return len(http.get("/api/v1/jobs", params={"limit": 1000}).json())


def _send_chunked(port: int, path: str, total: int, chunk: int = 2**20) -> bytes:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length), reading the answer while sending."""
    connection = socket.create_connection(("127.0.0.1", port))
    answer = bytearray()

    def read() -> None:  # until the connection closes or the whole answer (headers + Content-Length) is in
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            answer.extend(data)
            head, separator, body = bytes(answer).partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if separator and length and len(body) >= int(length.group(1)):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n".encode())
    block = b'{"prompt": "' + b"a" * (chunk - 12)
    try:
        sent = 0
        while sent < total:
            connection.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            sent += len(block)
        connection.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed before the end, as it should
    reader.join(15)
    connection.close()
    return bytes(answer)


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/sdapi/v1/txt2img"])
def test_a_chunked_40mb_body_is_refused_while_it_arrives(live, http, path: str) -> None:
    before_jobs, before_rss = _job_count(http), _rss_mb()
    answer = _send_chunked(live.port, path, 40 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"at most 33554432" in answer and b"connection: close" in answer.lower()
    assert _rss_mb() - before_rss < 200
    assert _job_count(http) == before_jobs
    _job_finishes(http)


def test_a_lone_surrogate_is_refused_and_the_job_list_still_reads(http) -> None:
    before = _job_count(http)
    body = '{"prompt": "a \\ud800 circle", "steps": 2}'
    for path in ("/api/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/options"):
        answer = http.post(path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "surrogate" in answer.text, (path, answer.text)
    paired = http.post("/api/v1/jobs", content='{"prompt": "a \\ud83d\\ude00 circle", "steps": 2}',
                       headers={"content-type": "application/json"})  # a proper pair (an emoji) is fine
    assert paired.status_code == 202
    assert http.get("/api/v1/jobs").status_code == 200 and _job_count(http) == before + 1
    assert http.get("/sdapi/v1/options").status_code == 200
    _job_finishes(http)


def test_a_utf16_body_cannot_carry_what_utf8_may_not(http) -> None:
    """UTF-16 JSON is ASCII with NULs between: without a check it would pass the surrogate and depth scans."""
    before = _job_count(http)
    for text in ('{"prompt": "a \\ud800 circle", "steps": 2}', "[" * 1000 + "]" * 1000, '{"prompt": "x"}'):
        for path in ("/api/v1/jobs", "/sdapi/v1/txt2img"):
            answer = http.post(path, content=text.encode("utf-16"), headers={"content-type": "application/json"})
            assert answer.status_code == 422 and "NUL bytes" in answer.text, (path, answer.text[:200])
    assert _job_count(http) == before and http.get("/api/v1/jobs").status_code == 200
    _job_finishes(http)


def test_deeply_nested_json_is_refused_everywhere(http) -> None:
    options = http.get("/sdapi/v1/options").json()
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/api/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options",
                 "/sdapi/v1/png-info"):
        for body in (deep, '{"prompt": "x", "styles": ' + deep + "}"):
            answer = http.post(path, content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 422 and "nests deeper than 64" in answer.text, (path, answer.text[:200])
    # brackets inside strings are text, not nesting
    assert http.post("/api/v1/jobs", json={**FAST, "prompt": "[" * 500}).status_code == 202
    assert http.get("/sdapi/v1/options").json() == options
    _job_finishes(http)


@pytest.mark.parametrize("bomb", ["pixels", "text"])
def test_image_bombs_are_refused_on_every_image_route(http, bomb: str) -> None:
    data = _b64(_pixel_bomb() if bomb == "pixels" else _text_bomb())
    before = _job_count(http)
    answers = [
        http.post("/api/v1/jobs", json={**FAST, "init_image": data}),
        http.post("/api/v1/jobs", json={**FAST, "init_image": _b64(_png()), "mask": data}),
        http.post("/sdapi/v1/img2img", json={**FAST, "init_images": [data]}),
        http.post("/sdapi/v1/img2img", json={**FAST, "init_images": [_b64(_png())], "mask": data}),
        http.post("/sdapi/v1/png-info", json={"image": data}),
    ]
    for answer in answers:
        assert 400 <= answer.status_code < 500, (answer.request.url, answer.status_code, answer.text[:300])
    assert _job_count(http) == before
    _job_finishes(http)


def test_png_info_reads_a_normal_picture(http) -> None:
    answer = http.post("/sdapi/v1/png-info", json={"image": _b64(_png(text={"parameters": "a cat\nSteps: 3"}))})
    assert answer.status_code == 200 and answer.json()["info"] == "a cat\nSteps: 3"


def test_a_gallery_file_swapped_for_a_symlink_or_gone_is_not_served(live, http, tmp_path) -> None:
    for _ in range(3):
        _job_finishes(http)
    newest = http.get("/api/v1/images", params={"limit": 3}).json()
    swapped, gone = newest[0]["id"], newest[1]["id"]
    path = live.service.image_path(swapped)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    path.unlink()
    path.symlink_to(secret)
    inside = live.service.image_path(newest[2]["id"])
    for url in (f"/api/v1/images/{swapped}", f"/api/v1/images/{swapped}/thumbnail"):
        answer = http.get(url)
        assert answer.status_code == 403 and "not for the web" not in answer.text, answer.text
    path.unlink()
    path.symlink_to(inside)  # a symlink to another gallery file is refused too
    assert http.get(f"/api/v1/images/{swapped}").status_code == 403
    live.service.image_path(gone).unlink()
    for url in (f"/api/v1/images/{gone}", f"/api/v1/images/{gone}/thumbnail"):
        answer = http.get(url)
        assert answer.status_code == 410 and "file is gone" in answer.json()["detail"]
    assert http.get(f"/api/v1/images/{newest[2]['id']}").status_code == 200
    live.service.image_path(newest[2]["id"]).write_bytes(b"not a png any more")
    assert http.get(f"/api/v1/images/{newest[2]['id']}/thumbnail").status_code == 410
    for offset, status in ((2**62, 200), (2**63, 422), (10**30, 422), (-1, 422)):
        assert http.get("/api/v1/images", params={"offset": offset}).status_code == status, offset
    assert http.get("/api/v1/images", params={"offset": 2**62}).json() == []
    _job_finishes(http)


def test_a_foreign_host_header_is_refused(live, http) -> None:
    before = _job_count(http)
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example", "localhost.evil.example"):
        answer = http.post("/api/v1/jobs", json=FAST, headers={"host": host})
        assert answer.status_code == 421 and "not served here" in answer.text, host
        assert http.get("/api/v1/images", headers={"host": host}).status_code == 421
    for host in (f"127.0.0.1:{live.port}", f"localhost:{live.port}", f"[::1]:{live.port}"):
        assert http.get("/api/v1/health", headers={"host": host}).status_code == 200, host
    assert _job_count(http) == before
    _job_finishes(http)


def test_cross_site_simple_requests_are_refused(live, http) -> None:
    options = http.get("/sdapi/v1/options").json()
    before = _job_count(http)
    evil = {"origin": "https://evil.example"}
    text_plain = {"content-type": "text/plain"}
    form = {"content-type": "application/x-www-form-urlencoded"}
    attempts = [
        ("/sdapi/v1/txt2img", json.dumps(FAST), {**text_plain, **evil}, 403),
        ("/sdapi/v1/options", json.dumps({"samples_format": "jpg"}), {**text_plain, **evil}, 403),
        ("/api/v1/jobs", json.dumps(FAST), {**form, **evil}, 403),
        ("/sdapi/v1/interrupt", "", evil, 403),  # bodyless: refused by its Origin
        ("/sdapi/v1/interrupt", "", {"sec-fetch-site": "cross-site"}, 403),
        ("/sdapi/v1/interrupt", "", {"sec-fetch-site": "same-site", "origin": "http://localhost:3000"}, 403),
        # no Origin, yet not JSON: a non-browser client sending text/plain is refused by type
        ("/sdapi/v1/options", json.dumps({"samples_format": "jpg"}), text_plain, 415),
        ("/api/v1/jobs", "prompt=x", form, 415),
    ]
    for path, body, headers, status in attempts:
        answer = http.post(path, content=body, headers=headers)
        assert answer.status_code == status, (path, headers, answer.status_code, answer.text)
    job = http.post("/api/v1/jobs", json=FAST).json()["id"]
    assert http.delete(f"/api/v1/jobs/{job}", headers=evil).status_code == 403
    assert http.get("/sdapi/v1/options").json() == options
    assert _job_count(http) == before + 1
    # the allowed origin, the page's own origin, and clients that send no Origin all work
    assert http.post("/sdapi/v1/options", json={"samples_format": "png"},
                     headers={"origin": STUDIO_ORIGIN}).status_code == 200
    assert http.post("/sdapi/v1/interrupt", headers={"origin": live.url, "sec-fetch-site": "same-origin"}
                     ).status_code == 200
    _job_finishes(http)


def test_a_preflight_is_answered_before_auth(tmp_path, pipe) -> None:
    server = LiveServer(tmp_path / "data", pipe, auth=("ann", "s3cret"), cors_origins=[STUDIO_ORIGIN])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            preflight = client.options("/sdapi/v1/txt2img", headers={
                "origin": STUDIO_ORIGIN, "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type"})
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == STUDIO_ORIGIN
            unauthenticated = client.get("/api/v1/jobs", headers={"origin": STUDIO_ORIGIN})
            assert unauthenticated.status_code == 401
            assert unauthenticated.headers["access-control-allow-origin"] == STUDIO_ORIGIN  # the page can read why
            other = client.options("/sdapi/v1/txt2img", headers={
                "origin": "https://evil.example", "access-control-request-method": "POST"})
            assert "access-control-allow-origin" not in other.headers
            authed = client.post("/api/v1/jobs", json=FAST, auth=("ann", "s3cret"), headers={"origin": STUDIO_ORIGIN})
            assert authed.status_code == 202
            assert client.post("/api/v1/jobs", json=FAST, auth=("ann", "wrong")).status_code == 401
    finally:
        server.close()


def test_prompt_length_is_limited_in_characters_and_tokens(http, pipe) -> None:
    from dapple.errors import InvalidRequestError

    before = _job_count(http)
    answer = http.post("/api/v1/jobs", json={**FAST, "prompt": "a" * 20_001})
    assert answer.status_code == 422 and "at most 20000 characters" in answer.text
    assert _job_count(http) == before
    with pytest.raises(InvalidRequestError, match="prompt is 1800 tokens long; allowed: at most 1500 tokens"):
        pipe.generate("red " * 1800, steps=1)
    with pytest.raises(InvalidRequestError, match="negative_prompt is 1600 tokens"):
        pipe.generate("red", negative_prompt="blue " * 1600, steps=1)
    assert pipe.generate("red " * 1400, steps=1, seed=1).images  # long prompts within the limit still work
    _job_finishes(http)


def test_the_allowed_hosts_follow_the_bind_address() -> None:
    assert set(default_allowed_hosts("127.0.0.1")) == {"127.0.0.1", "localhost", "::1"}
    assert "127.0.0.2" in default_allowed_hosts("127.0.0.2")  # another loopback address answers its own name
    assert "studio.lan" in default_allowed_hosts("localhost", ["Studio.LAN"])
    assert default_allowed_hosts("192.168.1.5") == ["192.168.1.5"]
    assert default_allowed_hosts("0.0.0.0") is None  # every interface, no names given: any Host (and a warning)
    assert default_allowed_hosts("0.0.0.0", ["gpu-box.lan"]) == ["gpu-box.lan"]
