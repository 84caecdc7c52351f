"""`respiscan serve` as a real process on a free loopback port: HTTP over a socket, a body refused from its
headers alone, a request in flight when SIGTERM comes finishes, then the process ends by itself."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from respiscan.data.samples import discover

pytest.importorskip("uvicorn")
STARTUP_S = 180  # imports torch and loads the bundle; slow on a busy 2-core machine


@pytest.fixture(scope="module")
def images(synth_data) -> dict[str, Path]:
    samples = [s for s in discover(synth_data) if s.split == "test"]
    return {m: next(s.path for s in samples if s.modality == m) for m in ("xray", "ct")}


def respiscan(*argv: object, blocked: tuple[str, ...] = ()) -> list[str]:
    """The command line of `respiscan ARGV` in a fresh interpreter where `blocked` modules cannot be imported."""
    code = (f"import sys\nfor name in {list(blocked)!r}:\n    sys.modules[name] = None\n"
            f"sys.argv = ['respiscan', *{[str(a) for a in argv]!r}]\nfrom respiscan.cli import main\nmain()\n")
    return [sys.executable, "-c", code]


class Served:
    """A `respiscan serve` process, its URL read from the line it prints when it listens."""

    def __init__(self, bundle: Path, tmp: Path):
        self.audit = tmp / "audit.jsonl"
        self.proc = subprocess.Popen(respiscan("serve", bundle, "--port", 0, "--audit-log", self.audit),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.strip())
                ready.set()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(STARTUP_S):
            self.proc.kill()
            pytest.fail(f"respiscan serve printed nothing in {STARTUP_S} s: {self.proc.stderr.read()}")
        self.url = self.lines[0].split(" on ")[1].split()[0]
        self.host, self.port = self.url.removeprefix("http://").split(":")

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.status, json.loads(response.read())

    def raw(self, request: bytes, then: bytes = b"", before_rest=None, timeout: float = 60) -> bytes:
        """Send `request` over a plain socket, call `before_rest`, send `then`, and read the whole answer."""
        with socket.create_connection((self.host, int(self.port)), timeout=timeout) as sock:
            sock.sendall(request)
            if before_rest:
                before_rest()
            if then:
                sock.sendall(then)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer


def form(image: Path) -> tuple[bytes, bytes]:
    body = (b'--b0undary\r\nContent-Disposition: form-data; name="xray"; filename="a.png"\r\n\r\n'
            + image.read_bytes() + b"\r\n--b0undary--\r\n")
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n").encode()
    return head, body


def test_serve_answers_http_and_stops_cleanly_on_sigterm(bundle, images, tmp_path):
    from respiscan.serving import load

    served = Served(bundle, tmp_path)
    try:
        assert served.get("/healthz") == (200, {"status": "ok"})
        assert served.get("/readyz")[1]["weights_sha256"] == served.get("/v1/model")[1]["weights_sha256"]
        # a 150 MB body is refused from its headers: not one byte of it is sent
        answer = served.raw(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                            b"boundary=b0undary\r\nContent-Length: 157286400\r\n\r\n", timeout=30)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b"over the limit of 67108864 bytes" in answer
        # a prediction whose body is half sent when SIGTERM arrives still gets its answer
        head, body = form(images["xray"])
        answer = served.raw(head + body[:len(body) // 2], then=body[len(body) // 2:],
                            before_rest=lambda: (served.proc.send_signal(signal.SIGTERM), time.sleep(1.0)))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        result = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert result["probability"] == pytest.approx(load(bundle).predict(xray=images["xray"])["probability"])
        assert served.proc.wait(timeout=60) == 0
    finally:
        served.proc.kill()
    assert served.lines[-1] == "stopped"
    records = [json.loads(line) for line in served.audit.read_text().splitlines()]
    assert [r["status"] for r in records] == [200, 413, 200]  # /v1/model, the big body, the prediction


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]


def test_public_host_without_tokens_is_refused(bundle):
    proc = subprocess.run(respiscan("serve", bundle, "--host", "0.0.0.0"), capture_output=True, text=True,
                          timeout=120)
    assert_one_line_error(proc, "--host 0.0.0.0 is reachable from other machines: give --token-file (lines of "
                                "`NAME TOKEN`), or serve on 127.0.0.1")


def test_serve_without_the_extra_is_one_line(bundle):
    proc = subprocess.run(respiscan("serve", bundle, blocked=("fastapi",)), capture_output=True, text=True,
                          timeout=120)
    assert_one_line_error(proc, 'respiscan serve needs fastapi: pip install "respiscan[serve]"')


def test_busy_port_is_one_line(bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(respiscan("serve", bundle, "--port", port, "--audit-log", "/dev/null"),
                              capture_output=True, text=True, timeout=STARTUP_S)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} ")
