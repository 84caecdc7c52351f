"""The REST API in-process (FastAPI's TestClient, and raw ASGI for clients that stall or leave): every endpoint,
and bad requests, each answered with its own 4xx and one JSON line, the server healthy and its temp area empty
afterwards."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import hashlib
import io
import json
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from respiscan.data.samples import discover  # noqa: E402
from respiscan.errors import RespiscanError  # noqa: E402
from respiscan.serving import load  # noqa: E402
from respiscan.serving.batcher import BatchConfig, Batcher  # noqa: E402
from respiscan.serving.server import Limits, Token, create_app, read_tokens  # noqa: E402

TOKEN = "s3cret-token-of-the-ward-0123"
SMALL = Limits(max_body_bytes=2**20, max_zip_bytes=8 * 2**20, upload_timeout_s=2.0)


@pytest.fixture(scope="module")
def pipeline(bundle):
    return load(bundle)


@pytest.fixture(scope="module")
def images(synth_data) -> dict[str, Path]:
    samples = [s for s in discover(synth_data) if s.split == "test"]
    return {m: next(s.path for s in samples if s.modality == m) for m in ("xray", "ct")}


class Server:
    """One app, its client, its temp area and its audit log."""

    def __init__(self, pipeline, root: Path, **kwargs):
        self.temp, self.audit = root / "temp", root / "audit.jsonl"
        self.app = create_app(pipeline, temp_dir=self.temp, audit_log=self.audit, **kwargs)
        self.client = TestClient(self.app)

    def audit_records(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def temp_is_empty(self, wait_s: float = 0.0) -> bool:
        deadline = time.monotonic() + wait_s
        while any(self.temp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not any(self.temp.iterdir())


@pytest.fixture(scope="module")
def servers(pipeline, tmp_path_factory) -> dict[str, Server]:
    root = tmp_path_factory.mktemp("servers")
    return {"default": Server(pipeline, root / "default"),
            "small": Server(pipeline, root / "small", limits=SMALL),
            "token": Server(pipeline, root / "token", tokens=[Token("ward-3", TOKEN.encode())])}


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary", close: bool = True) -> bytes:
    """A multipart/form-data body written by hand, so that it can be malformed on purpose."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


FORM = {"content-type": "multipart/form-data; boundary=b0undary"}


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels, with a tiny (never decoded) image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def zipped(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def dicom_without_pixels() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chunks(total: int, size: int = 64 * 1024):
    """A body with no Content-Length (chunked transfer): a multipart file part of `total` bytes."""
    yield b'--b0undary\r\nContent-Disposition: form-data; name="xray"; filename="a.png"\r\n\r\n'
    for _ in range(total // size):
        yield b"\0" * size


def post(server: str, url: str = "/v1/predict", **kwargs):
    return lambda s, im: s[server].client.post(url, **kwargs)


def post_files(files, server: str = "default", url: str = "/v1/predict", **kwargs):
    return lambda s, im: s[server].client.post(url, files=files(im) if callable(files) else files, **kwargs)


def image_bytes(path: Path, cut: float = 1.0) -> bytes:
    data = path.read_bytes()
    return data[:int(len(data) * cut)]


# name -> (expected status, how to send it, which server)
BAD = {
    "no file": (400, post("default", headers=FORM, content=multipart([("explain", None, b"true")])), "default"),
    "empty file": (422, post_files({"xray": ("a.png", b"")}), "default"),
    "text as image": (422, post_files({"xray": ("a.png", b"this is a letter, not an X-ray")}), "default"),
    "truncated PNG": (422, post_files(lambda im: {"xray": ("a.png", image_bytes(im["xray"], 0.5))}), "default"),
    "decompression bomb": (422, post_files({"xray": ("bomb.png", png_bomb())}), "default"),
    "150 MB body": (413, post_files({"xray": ("big.png", b"\0" * (150 * 2**20))}), "default"),
    "chunked body over the limit": (413, post("small", content=chunks(3 * 2**20), headers=FORM), "small"),
    "10,000-part multipart": (413, post("default", headers=FORM,
                                        content=multipart([("xray", "a.png", b"1")] * 10_000)), "default"),
    "oversized form field": (413, post_files({"xray": ("a.png", b"x")}, data={"explain": "x" * 5000}), "default"),
    "DICOM without pixels": (422, post_files({"ct": ("slice.dcm", dicom_without_pixels())}), "default"),
    "wrong modality field": (400, post_files({"mri": ("a.png", b"x")}), "default"),
    "zip bomb as a series": (413, post_files({"ct": ("series.zip", zipped({"a.dcm": b"\0" * (64 * 2**20)}))},
                                             "small"), "small"),
    "path traversal name in a zip": (400, post_files({"ct": ("s.zip", zipped({"../../evil.dcm": b"x"}))}), "default"),
    "absolute name in a zip": (400, post_files({"ct": ("s.zip", zipped({"/etc/cron.d/x": b"x"}))}), "default"),
    "symbolic link in a zip": (400, post_files({"ct": ("s.zip", zipped({}, symlink="link.dcm"))}), "default"),
    "corrupt zip": (422, post_files({"ct": ("s.zip", b"PK\x03\x04" + b"\x07" * 100)}), "default"),
    "zipped X-ray": (415, post_files({"xray": ("x.zip", zipped({"a.png": b"x"}))}), "default"),
    "garbage NIfTI": (422, post_files({"ct": ("vol.nii.gz", b"not a volume")}), "default"),
    "wrong token": (401, post_files({"xray": ("a.png", b"x")}, "token",
                                    headers={"Authorization": "Bearer not-the-token-0000000"}), "token"),
    "no token": (401, post_files({"xray": ("a.png", b"x")}, "token"), "token"),
    "basic instead of bearer": (401, post_files({"xray": ("a.png", b"x")}, "token",
                                                headers={"Authorization": f"Basic {TOKEN}"}), "token"),
    "JSON instead of multipart": (415, post("default", json={"xray": "a.png"}), "default"),
    "multipart without a boundary": (415, post("default", content=b"x",
                                               headers={"content-type": "multipart/form-data"}), "default"),
    "truncated multipart": (400, post("default", headers=FORM,
                                      content=multipart([("xray", "a.png", b"x" * 100)], close=False)), "default"),
    "part without a name": (400, post("default", headers=FORM, content=b"--b0undary\r\nContent-Type: image/png\r\n"
                                      b"\r\nxyz\r\n--b0undary--\r\n"), "default"),
    "file field sent as text": (400, post("default", headers=FORM, content=multipart([("xray", None, b"a")])),
                                "default"),
    "the same modality twice": (400, lambda s, im: s["default"].client.post("/v1/predict", files=[
        ("xray", ("a.png", im["xray"].read_bytes())), ("xray", ("b.png", im["xray"].read_bytes()))]), "default"),
    "explain neither true nor false": (400, post_files(lambda im: {"xray": ("a.png", im["xray"].read_bytes())},
                                                       data={"explain": "maybe"}), "default"),
    "batch without files": (400, post("default", "/v1/predict/batch", headers=FORM,
                                      content=multipart([])), "default"),
    "unknown path": (404, lambda s, im: s["default"].client.post("/v1/predicts"), "default"),
    "wrong method": (405, lambda s, im: s["default"].client.get("/v1/predict"), "default"),
    "DICOM endpoint given text": (400, post_files({"dicom": ("a.dcm", b"not DICOM at all")}, url="/v1/dicom"),
                                  "default"),
}


def assert_healthy(server: Server, images: dict[str, Path]) -> None:
    """Still answers a real prediction, and nothing of any request is left in its temp area."""
    response = server.client.post("/v1/predict", files={"xray": ("a.png", images["xray"].read_bytes())},
                                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert server.temp_is_empty(wait_s=2.0), list(server.temp.iterdir())


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_its_4xx_as_one_json_line(servers, images, name):
    status, send, which = BAD[name]
    if name == "DICOM endpoint given text":
        pytest.importorskip("respiscan.serving.dicom_sr", reason="the DICOM SR writer (serving/dicom_sr.py) is "
                                                                 "not in this tree")
    response = send(servers, images)
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
    assert "Traceback" not in body["error"] and str(servers[which].temp) not in body["error"]
    assert_healthy(servers[which], images)


def test_at_least_25_kinds_of_bad_request():
    assert len(BAD) >= 25


def test_150_mb_is_refused_from_its_content_length(servers, images):
    """The body never has to arrive: the declared length is enough (a real socket shows it in
    test_serve_process.py)."""
    response = servers["default"].client.post("/v1/predict", content=b"x", headers={
        **FORM, "content-length": str(150 * 2**20)})
    assert response.status_code == 413 and "over the limit of 67108864 bytes" in response.json()["error"]


def test_messages_name_the_field_not_the_server_path(servers, images):
    response = servers["default"].client.post("/v1/predict", files={"xray": ("chest.png", b"")})
    assert response.json()["error"] == "xray: empty file (0 bytes)"
    response = servers["default"].client.post("/v1/predict", files={
        "ct": ("s.zip", zipped({"../../evil.dcm": b"x"}))})
    assert response.json()["error"] == "ct: archive member '../../evil.dcm' points outside the archive"


def test_predict_is_what_the_pipeline_says_plus_id_hash_and_timings(servers, pipeline, images):
    response = servers["default"].client.post("/v1/predict", files={
        "xray": ("PATIENT_DOE_JOHN.png", images["xray"].read_bytes()), "ct": ("b.png", images["ct"].read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = pipeline.predict(xray=images["xray"], ct=images["ct"])
    assert {k: body[k] for k in expected} == pytest.approx(expected)
    assert set(body) - set(expected) == {"request_id", "model_sha256", "engine", "timings"}
    assert body["model_sha256"] == pipeline.config.weights_sha256 and body["engine"] == "torch"
    assert response.headers["x-request-id"] == body["request_id"]
    assert 0 <= body["timings"]["upload_s"] <= body["timings"]["total_s"]
    record = servers["default"].audit_records()[-1]
    assert record["request_id"] == body["request_id"] and record["status"] == 200
    assert record["model_sha256"] == pipeline.config.weights_sha256 and record["token"] is None
    assert [i["sha256"] for i in record["inputs"]] == [hashlib.sha256(images[m].read_bytes()).hexdigest()
                                                       for m in ("xray", "ct")]
    assert record["result"]["probability"] == pytest.approx(expected["probability"])
    assert "DOE" not in servers["default"].audit.read_text()


def test_explain_returns_gradcam_pngs(servers, images):
    response = servers["default"].client.post("/v1/predict", files={"ct": ("b.png", images["ct"].read_bytes())},
                                              data={"explain": "true"})
    assert response.status_code == 200, response.text
    (figure,) = response.json()["explanations"]
    assert figure["modality"] == "ct"
    image = Image.open(io.BytesIO(base64.b64decode(figure["png_base64"])))
    assert image.format == "PNG" and min(image.size) > 100


def test_ct_volumes_nifti_and_zipped_dicom_series(servers, pipeline, tmp_path):
    from test_volume import LAYOUT, scan, write_dicom_series, write_nifti

    slices = scan(LAYOUT)
    nifti = write_nifti(slices, tmp_path / "chest.nii.gz")
    series = write_dicom_series(slices, tmp_path / "series")
    archive = zipped({f"study/series/{p.name}": p.read_bytes() for p in sorted(series.iterdir())})
    expected = pipeline.predict(ct=nifti)["ct_volume"]
    for name, data in (("chest.nii.gz", nifti.read_bytes()), ("series.zip", archive)):
        response = servers["default"].client.post("/v1/predict", files={"ct": (name, data)})
        assert response.status_code == 200, response.text
        volume = response.json()["ct_volume"]
        assert volume["n_slices"] == len(LAYOUT) and volume["probability"] == pytest.approx(expected["probability"])
        assert volume["path"].startswith("ct") and str(servers["default"].temp) not in json.dumps(volume)


def test_batch_gives_one_result_or_one_error_per_file(servers, pipeline, images):
    response = servers["default"].client.post("/v1/predict/batch", files=[
        ("xray", ("a.png", images["xray"].read_bytes())), ("xray", ("letter.png", b"hello")),
        ("ct", ("c.png", images["ct"].read_bytes()))])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["index"], r["field"], r["filename"]) for r in results] == \
        [(0, "xray", "a.png"), (1, "xray", "letter.png"), (2, "ct", "c.png")]
    assert results[0]["result"] == pytest.approx(pipeline.predict(xray=images["xray"]))
    assert results[1]["status"] == 422 and results[1]["error"].startswith("xray#2: ")
    assert results[2]["result"]["ct_probability"] == pytest.approx(pipeline.predict(ct=images["ct"])["probability"])


def test_model_health_readiness_docs_and_page(servers, pipeline):
    client = servers["default"].client
    model = client.get("/v1/model").json()
    config = pipeline.config.to_dict()
    assert {k: model[k] for k in config} == json.loads(json.dumps(config))
    assert model["hashes"]["weights_sha256"] == pipeline.config.weights_sha256
    assert model["training_sources"] == pipeline.config.data.sources_by_modality()
    assert model["server"]["limits"]["max_body_bytes"] == 64 * 2**20
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["weights_sha256"] == pipeline.config.weights_sha256
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "https://" not in docs
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/static-offline-docs/{asset}").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "https://" not in page.text and "http://" not in page.text and 'id="xray-file"' in page.text


def test_tokens_name_who_asked(servers, images, tmp_path):
    server = servers["token"]
    assert server.client.get("/v1/model").status_code == 401
    assert server.client.get("/healthz").status_code == 200  # probes need no token
    response = server.client.post("/v1/predict", files={"xray": ("a.png", images["xray"].read_bytes())},
                                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    records = server.audit_records()
    assert records[-1]["token"] == "ward-3" and records[-1]["status"] == 200
    assert any(r["status"] == 401 and r["token"] is None for r in records)


def test_token_file_is_checked(tmp_path):
    good = tmp_path / "tokens"
    good.write_text(f"# name token\nward-3 {TOKEN}\n\nradiology {TOKEN}-2\n")
    assert [t.name for t in read_tokens(good)] == ["ward-3", "radiology"]
    for text, problem in ((f"ward-3 {TOKEN} extra\n", "expected `NAME TOKEN`"), ("ward-3 short\n", "shorter than"),
                          (f"a {TOKEN}\na {TOKEN}x\n", "repeats"), (f"a {TOKEN}\nb {TOKEN}\n", "repeats"),
                          ("# nothing\n", "no tokens")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(RespiscanError, match=problem):
            read_tokens(bad)


def blocking_predict(monkeypatch, pipeline, hold_s: float):
    """Make the engine's batches (pipeline.predict_prepared) wait until released (or `hold_s`), and say when
    one has started."""
    started, release = threading.Event(), threading.Event()
    original = pipeline.predict_prepared

    def predict_prepared(cases, tta=1):
        started.set()
        release.wait(hold_s)
        return original(cases, tta)

    monkeypatch.setattr(pipeline, "predict_prepared", predict_prepared)
    return started, release


def test_saturated_server_answers_503_with_retry_after(pipeline, images, monkeypatch, tmp_path):
    server = Server(pipeline, tmp_path, limits=Limits(max_pending=1))
    started, release = blocking_predict(monkeypatch, pipeline, hold_s=120)
    files = {"xray": ("a.png", images["xray"].read_bytes())}
    first: list = []
    worker = threading.Thread(target=lambda: first.append(server.client.post("/v1/predict", files=files)))
    try:
        worker.start()
        assert started.wait(120)
        busy = server.client.post("/v1/predict", files=files)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    finally:
        release.set()
        worker.join(30)
    assert first[0].status_code == 200
    assert server.temp_is_empty(wait_s=2)
    assert [r["status"] for r in server.audit_records()] == [503, 200]


def test_slow_prediction_is_504_and_its_folder_goes_when_it_ends(pipeline, images, monkeypatch, tmp_path):
    server = Server(pipeline, tmp_path, limits=Limits(inference_timeout_s=0.3, max_pending=1))
    blocking_predict(monkeypatch, pipeline, hold_s=1.0)
    response = server.client.post("/v1/predict", files={"xray": ("a.png", images["xray"].read_bytes())})
    assert response.status_code == 504 and "longer than 0.3 s" in response.json()["error"]
    assert server.temp_is_empty(wait_s=60)
    admission = server.app.state.service.admission
    deadline = time.monotonic() + 5
    while admission.admitted and time.monotonic() < deadline:  # given back just after the folder went
        time.sleep(0.05)
    assert admission.admitted == 0


def asgi_upload(app, messages: list[dict | float]) -> list[dict]:
    """Drive the app as a server would: `messages` are what receive() returns, a number is a pause (s)."""
    sent: list[dict] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", FORM["content-type"].encode()), (b"host", b"test")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    queue = list(messages)

    async def receive() -> dict:
        while queue and not isinstance(queue[0], dict):
            await asyncio.sleep(queue.pop(0))
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_slow_client_is_cut_off_with_408(servers, images):
    server = servers["small"]
    head = multipart([("xray", "a.png", images["xray"].read_bytes())])[:60]
    sent = asgi_upload(server.app, [{"type": "http.request", "body": head, "more_body": True}, 30.0])
    assert sent[0]["status"] == 408
    assert "did not arrive within 2 s" in json.loads(sent[1]["body"])["error"]
    assert server.temp_is_empty()
    assert server.audit_records()[-1]["status"] == 408


def test_client_gone_mid_upload_leaves_nothing(servers, images):
    server = servers["default"]
    head = multipart([("xray", "a.png", images["xray"].read_bytes())])[:200]
    asgi_upload(server.app, [{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}])
    assert server.temp_is_empty()
    assert server.audit_records()[-1]["status"] == 499
    assert_healthy(server, images)


def test_dicom_in_structured_report_out(servers, tmp_path):
    pytest.importorskip("respiscan.serving.dicom_sr", reason="the DICOM SR writer (serving/dicom_sr.py) is not "
                                                             "in this tree")
    from test_dicom_sr import PATIENT, ct_series, finding, save

    slices = ct_series(4)
    paths = save(slices, tmp_path / "series")
    archive = zipped({f"DOE_JANE/{p.name}": p.read_bytes() for p in paths})
    client = servers["default"].client
    response = client.post("/v1/dicom", files={"dicom": ("study.zip", archive)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == slices[0].StudyInstanceUID
    label, probability = finding(sr)
    expected = client.post("/v1/predict", files={"ct": ("s.zip", archive)}).json()
    assert probability == pytest.approx(expected["probability"])
    with_cam = client.post("/v1/dicom", files={"dicom": ("study.zip", archive)}, data={"explain": "true"})
    assert with_cam.status_code == 200, with_cam.text
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + with_cam.headers["content-type"].encode() + b"\r\n\r\n" + with_cam.content)
    parts = [pydicom.dcmread(io.BytesIO(p.get_payload(decode=True))) for p in message.get_payload()]
    assert [p.Modality for p in parts][0] == "SR" and len(parts) == 2
    log = servers["default"].audit.read_text()
    assert PATIENT["PatientName"] not in log and PATIENT["PatientID"] not in log and "DOE_JANE" not in log
    assert servers["default"].temp_is_empty()


def test_a_server_without_modality_refuses_it(servers, pipeline, images, monkeypatch):
    monkeypatch.setattr(pipeline, "modalities", ["xray"])
    response = servers["default"].client.post("/v1/predict", files={"ct": ("b.png", images["ct"].read_bytes())})
    assert response.status_code == 400 and "trained without ct" in response.json()["error"]


def test_uploads_are_hashed_as_sent(servers):
    data = np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes()
    servers["default"].client.post("/v1/predict", files={"xray": ("noise.png", data)})
    assert servers["default"].audit_records()[-1]["inputs"][0] == {
        "field": "xray", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# --- batching concurrent requests ---------------------------------------------------------------------------

def held_first_batch(fn, until, settle_s: float = 0.0, hold_s: float = 60.0):
    """`fn` whose first call waits until `until()` is true, then `settle_s`, so that what arrives meanwhile
    queues behind it."""
    first = threading.Event()

    def held(*args, **kwargs):
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + hold_s
            while not until() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(settle_s)
        return fn(*args, **kwargs)

    return held, first


def assert_same_result(got: dict, want: dict) -> None:
    """Batched and single-case results agree: probabilities within 1e-6; shift scores within 1e-5 relative,
    as the engine's float32 embedding of an image differs by an ulp between batch sizes (BLAS kernels) and the
    shift detector's precision matrix magnifies that to about 1e-6."""
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, float):
            tolerance = {"rel": 1e-5} if key.endswith("ood_score") else {"abs": 1e-6}
            assert got[key] == pytest.approx(value, **tolerance), key
        else:
            assert got[key] == value, key


def test_batcher_bounds_batches_and_a_failing_item_fails_alone():
    calls: list[list[str]] = []
    release = threading.Event()

    def upper(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise RespiscanError("a bad item")
        return [item.upper() for item in items]

    held, started = held_first_batch(upper, release.is_set)
    batcher = Batcher(held, BatchConfig(max_batch=3, window_s=0))
    first = batcher.submit("a")
    assert started.wait(30)  # the engine is busy with "a": what comes now waits for the next batch
    rest = [batcher.submit(item) for item in ("b", "bad", "c", "d", "e")]
    gone = batcher.submit("f")
    assert gone.cancel()  # its request timed out while it was queued
    release.set()
    assert first.result(30) == "A"
    assert [f.result(30) for f in rest[:1] + rest[2:]] == ["B", "C", "D", "E"]
    with pytest.raises(RespiscanError, match="a bad item"):
        rest[1].result(30)
    batcher.close()
    assert calls == [["a"], ["b", "bad", "c"], ["b"], ["bad"], ["c"], ["d", "e"]]
    assert list(batcher.sizes) == [1, 3, 2]


def test_batcher_window_groups_items_and_close_finishes_what_was_queued():
    calls: list[list[int]] = []

    def slow_double(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.05)
        return [2 * i for i in items]

    batcher = Batcher(slow_double, BatchConfig(max_batch=32, window_s=1.0))
    futures = [batcher.submit(i) for i in range(5)]  # well within the window of the first
    batcher.close()
    assert [f.result(0) for f in futures] == [0, 2, 4, 6, 8] and calls == [[0, 1, 2, 3, 4]]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(5)
    with pytest.raises(RespiscanError, match="--max-batch"):
        BatchConfig(max_batch=0)


def test_cases_scored_in_one_batch_are_what_predict_gives_each_alone(pipeline, synth_data):
    samples = [s for s in discover(synth_data) if s.split == "test"]
    xrays = [s.path for s in samples if s.modality == "xray"][:4]
    cts = [s.path for s in samples if s.modality == "ct"][:4]
    cases = [{"xray": x} for x in xrays] + [{"ct": c} for c in cts] + [{"xray": xrays[0], "ct": cts[1]},
                                                                       {"xray": xrays[2], "ct": cts[3]}]
    expected = [pipeline.predict(**case) for case in cases]
    release = threading.Event()
    held, started = held_first_batch(pipeline.predict_prepared, release.is_set)
    batcher = Batcher(held, BatchConfig(max_batch=6, window_s=0))
    futures = [batcher.submit(pipeline.prepare_case(**cases[0]))]
    assert started.wait(30)
    futures += [batcher.submit(pipeline.prepare_case(**case)) for case in cases[1:]]
    release.set()
    results = [f.result(60) for f in futures]
    batcher.close()
    assert list(batcher.sizes) == [1, 6, 3]
    for got, want in zip(results, expected):
        assert_same_result(got, want)


def test_a_concurrent_burst_is_batched_and_a_bad_file_fails_alone(pipeline, synth_data, monkeypatch, tmp_path):
    samples = [s for s in discover(synth_data) if s.split == "test"]
    xrays = [s.path for s in samples if s.modality == "xray"][:3]
    cts = [s.path for s in samples if s.modality == "ct"][:3]
    cases = [{"xray": x} for x in xrays] + [{"ct": c} for c in cts[:2]] + [{"xray": xrays[1], "ct": cts[2]}]
    expected = [pipeline.predict(**case) for case in cases]
    requests = [{m: (p.name, p.read_bytes()) for m, p in case.items()} for case in cases]
    requests.insert(3, {"xray": ("letter.png", b"this is a letter, not an X-ray")})
    server = Server(pipeline, tmp_path)
    prepared: list[int] = []
    prepare = pipeline.prepare_case

    def counted(**kwargs):
        try:
            return prepare(**kwargs)
        finally:
            prepared.append(1)

    monkeypatch.setattr(pipeline, "prepare_case", counted)
    # the first case's batch waits until every request was read, so that the others queue behind it
    held, _ = held_first_batch(pipeline.predict_prepared, lambda: len(prepared) == len(requests), settle_s=0.3)
    monkeypatch.setattr(pipeline, "predict_prepared", held)
    answers: dict[int, object] = {}

    def send(i: int) -> None:
        answers[i] = TestClient(server.app).post("/v1/predict", files=requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    bad = answers.pop(3)
    assert bad.status_code == 422 and bad.json()["error"].startswith("xray: ")
    for i, want in zip(sorted(answers), expected):
        response = answers[i]
        assert response.status_code == 200, response.text
        assert_same_result({k: response.json()[k] for k in want}, want)
    sizes = list(server.app.state.service.batcher.sizes)
    assert sum(sizes) == len(cases) and max(sizes) > 1
    assert server.temp_is_empty(wait_s=2)
