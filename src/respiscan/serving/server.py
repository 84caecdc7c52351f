"""`respiscan serve`: a bundle behind a versioned REST API and a self-contained web page (the `serve` extra).

One process loads the bundle once (`respiscan.serving.load`: ONNX when exported, else torch). A request's files
are read and preprocessed in a bounded thread pool; the engine then scores the cases of all the requests that
are waiting in one call per modality (batcher.py: single-case inference runs at half the batch rate), and each
request gets what `predict` would have given it alone. Whatever arrives from the network is treated as hostile:

- a body over `Limits.max_body_bytes` is refused (413) from its Content-Length before it is read, or as soon as
  a chunked body passes the limit; more parts than `max_parts` and oversized fields are 413 as they arrive;
- admission is counted before the body is read: beyond `max_pending` requests in the building, 503 with
  Retry-After; a body that does not arrive within `upload_timeout_s` is cut off (408), a prediction that takes
  longer than `inference_timeout_s` answered 504;
- uploads are streamed (python-multipart's streaming parser, no spooling to the system temp folder) into a
  per-request folder under the server's temp area, under names chosen here, and the folder is removed when the
  request ends (after its worker thread, if a timeout left one running); zip archives are unpacked there only
  after every member is checked (no absolute or `..` names, no links, a total size and member count limit);
- bad input is a JSON `{"error": one line}` with its 4xx; server paths never appear in a message;
- with a token file every /v1 request needs `Authorization: Bearer`, compared with hmac.compare_digest against
  every token; `serve` refuses a non-loopback host without one;
- an append-only JSON-lines audit log records each /v1 request: time, request id, token name, input SHA-256,
  model hash, outcome, duration. Never a file name or anything read from a DICOM header.

FastAPI, uvicorn and python-multipart are imported through `extras.require` when an app is built, so respiscan
works without the extra and `respiscan serve` without it is one line.
"""

import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from respiscan.errors import ImageReadError, RespiscanError
from respiscan.extras import require
from respiscan.serving import Engine, load
from respiscan.serving.batcher import BatchConfig, Batcher
from respiscan.serving.pipeline import BasePipeline, PreparedCase

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

PAGE = Path(__file__).with_name("static") / "index.html"
MIN_TOKEN_CHARS = 16
MODALITY_FIELDS = ("xray", "ct")
ZIP_MAGIC = b"PK\x03\x04"
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer: logged, never sent
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may cost; over a size limit is 413, over the admission limit 503."""

    max_body_bytes: int = 64 * 2**20
    max_parts: int = 64  # files and fields in one multipart body
    max_field_bytes: int = 1024  # one plain (non-file) form field
    max_pending: int = 16  # requests admitted at once, predicting or waiting for a worker thread
    upload_timeout_s: float = 60.0  # to receive the whole body: a slow client is cut off with 408
    inference_timeout_s: float = 120.0  # to predict once received: 504 (the thread finishes in the background)
    max_zip_members: int = 4096
    max_zip_bytes: int = 2**30  # all members of an archive, uncompressed (zip bombs)
    retry_after_s: int = 1


class ApiError(Exception):
    """An HTTP error answer: its status, a one-line message, extra headers, and the message for the audit log
    when the answer's names something the log must not keep (a member name of a zip)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 logged: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.logged = status, headers or {}, logged


class ClientGone(Exception):
    """The client closed the connection before its body arrived: nobody is left to answer."""


# --- tokens and the audit log ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    name: str
    secret: bytes = field(repr=False)


def read_tokens(path: str | Path) -> list[Token]:
    """Bearer tokens from a file of `NAME TOKEN` lines (blank lines and `#` comments skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RespiscanError(f"{path}: cannot read the token file ({getattr(e, 'strerror', None) or e})") from e
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 2:
            raise RespiscanError(f"{path}:{number}: expected `NAME TOKEN`, got {len(words)} word(s)")
        name, secret = words
        if len(secret) < MIN_TOKEN_CHARS:
            raise RespiscanError(f"{path}:{number}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} "
                                 f"characters (make one with `openssl rand -hex 24`)")
        if any(t.name == name for t in tokens) or any(t.secret == secret.encode() for t in tokens):
            raise RespiscanError(f"{path}:{number}: {name!r} repeats an earlier name or token")
        tokens.append(Token(name, secret.encode()))
    if not tokens:
        raise RespiscanError(f"{path}: no tokens (expected lines of `NAME TOKEN`)")
    return tokens


def authenticate(tokens: list[Token] | None, header: str | None) -> str | None:
    """The name of the token an `Authorization: Bearer` header carries; None when the server has no tokens."""
    if tokens is None:
        return None
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "this server needs a token: send `Authorization: Bearer TOKEN`",
                       {"WWW-Authenticate": "Bearer"})
    offered = given.strip().encode()
    name = None
    for token in tokens:  # every token is compared, each in constant time: the timing says nothing about which
        if hmac.compare_digest(token.secret, offered):
            name = token.name
    if name is None:
        raise ApiError(401, "invalid token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return name


class AuditLog:
    """Append-only JSON lines, one per /v1 request. Inputs appear only as their SHA-256 and size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # opened once, line-buffered: each record reaches the file when written, without an open per request
            self._file = self.path.open("a", encoding="utf-8", buffering=1)
        except OSError as e:
            raise RespiscanError(f"{self.path}: cannot write the audit log ({e.strerror})") from e

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()


# --- uploads -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Upload:
    """One file part, as saved in the request's folder."""

    field: str
    label: str  # how messages name it: the field, numbered from the second file of a field on ("ct#2")
    filename: str  # the client's base name: returned in batch answers, never logged
    path: Path
    sha256: str
    size: int


@dataclass
class Call:
    """One API request as the audit log sees it, and what its messages must hide."""

    request_id: str
    endpoint: str
    started: float
    token: str | None = None
    folder: Path | None = None
    uploads: list[Upload] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # server path -> how a message names it
    result: Any = None
    pending: Future | None = None  # the work being waited for (in a worker thread or the batcher)
    deadline: float | None = None  # time.monotonic() by which the prediction must be done
    inputs: dict[str, Path] = field(default_factory=dict)  # modality -> what the pipeline reads

    def public(self, text: str) -> str:
        """`text` with every server path replaced by the name of the upload it is, on one line."""
        for path in sorted(self.aliases, key=len, reverse=True):
            text = text.replace(path, self.aliases[path])
        if self.folder is not None:
            text = text.replace(str(self.folder), "upload")
        return " ".join(text.split())

    def scrub(self, value: Any) -> Any:
        """A result with `public` applied to every string in it (a CT volume's result names its path)."""
        if isinstance(value, str):
            return self.public(value)
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value


class _Parts:
    """python-multipart callbacks: each file part streams into the request's folder, every limit checked as
    the bytes arrive."""

    def __init__(self, call: Call, limits: Limits, files: tuple[str, ...], values: tuple[str, ...]):
        self.call, self.limits, self.files, self.value_names = call, limits, files, values
        self.values: dict[str, str] = {}
        self.parts = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._name = self._header = b""
        self._value: bytearray | None = None
        self._file: io.BufferedWriter | None = None
        self._upload: dict[str, Any] = {}

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise ApiError(413, f"more than {self.limits.max_parts} parts in one request")
        self._headers, self._name, self._header = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._header.strip()
        self._name, self._header = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise ApiError(400, "a multipart part has no `Content-Disposition: form-data; name=...`")
        filename = options.get(b"filename")
        if filename is None:
            if name not in self.value_names:
                accepted = ", ".join(self.value_names + self.files)
                raise ApiError(400, f"unknown field {name!r}" + (" (send it as a file)" if name in self.files else "")
                               + f"; accepted: {accepted}")
            if name in self.values:
                raise ApiError(400, f"field {name!r} is given twice")
            self._value = bytearray()
            self._upload = {"field": name}
            return
        if name not in self.files:
            raise ApiError(400, f"unknown file field {name!r}; accepted: {', '.join(self.files)}")
        base = re.split(r"[\\/]", filename.decode("utf-8", "replace"))[-1]
        n = sum(u.field == name for u in self.call.uploads) + 1
        label = name if n == 1 else f"{name}#{n}"
        path = self.call.folder / f"{name}{'' if n == 1 else f'_{n}'}{_suffix(base)}"
        self._file = path.open("xb")
        self._upload = {"field": name, "label": label, "filename": base, "path": path, "hash": hashlib.sha256(),
                        "size": 0}

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            self._file.write(chunk)
            self._upload["hash"].update(chunk)
            self._upload["size"] += len(chunk)
        elif self._value is not None:
            self._value += chunk
            if len(self._value) > self.limits.max_field_bytes:
                raise ApiError(413, f"field {self._upload['field']!r} is over {self.limits.max_field_bytes} bytes")

    def _part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            u = self._upload
            if u["size"] == 0 and not u["filename"]:  # a form's empty file input: no file chosen
                u["path"].unlink()
                return
            upload = Upload(u["field"], u["label"], u["filename"], u["path"], u["hash"].hexdigest(), u["size"])
            self.call.uploads.append(upload)
            self.call.aliases[str(upload.path)] = upload.label
        elif self._value is not None:
            self.values[self._upload["field"]] = self._value.decode("utf-8", "replace").strip()
            self._value = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _suffix(filename: str) -> str:
    """The client's suffix, when harmless: NIfTI is recognised by it (everything else by content)."""
    lower = filename.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    match = _SUFFIX.search(lower)
    return match.group(0) if match else ""


async def read_form(request: "Request", call: Call, limits: Limits, files: tuple[str, ...],
                    values: tuple[str, ...] = ()) -> dict[str, str]:
    """Stream a multipart body into `call.folder` (files appended to `call.uploads`); the plain fields."""
    multipart = require("python_multipart", "respiscan serve")

    content_type, options = multipart.multipart.parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(415, f"send multipart/form-data (file fields: {', '.join(files)})")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body of {int(declared)} bytes is over the limit of "
                                f"{limits.max_body_bytes} bytes")
    parts = _Parts(call, limits, files, values)
    try:
        parser = multipart.MultipartParser(boundary, parts.callbacks())
    except multipart.exceptions.FormParserError as e:
        raise ApiError(400, f"bad multipart boundary ({e})") from None

    async def receive() -> None:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {limits.max_body_bytes} bytes")
            parser.write(chunk)

    from starlette.requests import ClientDisconnect

    try:
        await asyncio.wait_for(receive(), limits.upload_timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.upload_timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientGone() from None
    except multipart.exceptions.FormParserError as e:
        raise ApiError(400, f"malformed multipart body ({' '.join(str(e).split())})") from None
    finally:
        parts.close()
    if not parts.ended:
        raise ApiError(400, "the multipart body ends before its closing boundary (a truncated upload?)")
    return parts.values


def flag(values: dict[str, str], request: "Request", name: str) -> bool:
    """A true/false option, from the form or the query string."""
    raw = values.get(name, request.query_params.get(name, "false")).strip().lower()
    if raw not in _TRUE + _FALSE:
        raise ApiError(400, f"{name} must be true or false, got {raw[:20]!r}")
    return raw in _TRUE


def unpack_zip(upload: Upload, call: Call, limits: Limits) -> Path:
    """A zipped DICOM series or study unpacked into a folder beside it, under names chosen here, after every
    member has been checked; the folder holds the members' files side by side (their folders flattened)."""
    target = upload.path.with_name(upload.path.name.split(".")[0] + "_unzipped")
    try:
        with zipfile.ZipFile(upload.path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > limits.max_zip_members:
                raise ApiError(413, f"{upload.label}: {len(members)} files in the archive, over the limit of "
                                    f"{limits.max_zip_members}")
            total = sum(m.file_size for m in members)
            if total > limits.max_zip_bytes:
                raise ApiError(413, f"{upload.label}: the archive unpacks to {total} bytes, over the limit of "
                                    f"{limits.max_zip_bytes} bytes")
            for m in members:
                name = PurePosixPath(m.filename.replace("\\", "/"))
                if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", m.filename):
                    raise ApiError(400, f"{upload.label}: archive member {m.filename!r} points outside the archive",
                                   logged=f"{upload.label}: an archive member points outside the archive")
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise ApiError(400, f"{upload.label}: archive member {m.filename!r} is a symbolic link",
                                   logged=f"{upload.label}: an archive member is a symbolic link")
            target.mkdir()
            call.aliases[str(target)] = f"{upload.label} (zip)"
            for i, m in enumerate(members):
                name = PurePosixPath(m.filename.replace("\\", "/"))
                if name.name.startswith(".") or "__MACOSX" in name.parts:
                    continue
                # zipfile stops at each member's declared size, so `total` bounds what is written
                with archive.open(m) as src, (target / f"{i:05d}_{_UNSAFE.sub('_', name.name)[:80]}").open("xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as e:
        raise ApiError(422, f"{upload.label}: unreadable zip archive ({' '.join(str(e).split())})") from None
    return target


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ZIP_MAGIC


# --- the service -------------------------------------------------------------------------------------------

class Admission:
    """Counts the requests admitted to predict; beyond `capacity` they are turned away before their body."""

    def __init__(self, capacity: int):
        self.capacity, self.admitted = capacity, 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.admitted -= 1


class Service:
    """What the endpoints share: the pipeline, the worker threads, limits, tokens, audit log and temp area."""

    def __init__(self, pipeline: BasePipeline, workers: int, limits: Limits, tokens: list[Token] | None,
                 audit: AuditLog | None, temp_dir: Path, batch: BatchConfig = BatchConfig()):
        from respiscan.serving.onnx_engine import OnnxPipeline

        if workers < 1 or limits.max_pending < 1:
            raise RespiscanError(f"workers ({workers}) and max_pending ({limits.max_pending}) must be at least 1")
        self.pipeline, self.limits, self.tokens, self.audit, self.temp_dir = pipeline, limits, tokens, audit, temp_dir
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="respiscan-predict")
        self.batch = batch
        # the pipeline's method is looked up per batch, so that a test can stand in for it
        self.batcher: Batcher[PreparedCase, dict] = Batcher(lambda cases: self.pipeline.predict_prepared(cases),
                                                            batch)
        self.admission = Admission(limits.max_pending)
        config = pipeline.config
        self.engine = "onnx" if isinstance(pipeline, OnnxPipeline) else "torch"
        self.hashes: dict[str, Any] = {"weights_sha256": config.weights_sha256}
        if self.engine == "onnx":
            self.hashes["onnx_sha256"] = {m: g.sha256 for m, g in config.onnx.graphs.items()}
        self._explainer: BasePipeline | None = None
        self._explain_lock = threading.Lock()

    # the endpoints' frame: token, admission, folder, errors, clean-up, audit

    async def handle(self, request: "Request", endpoint: str, work: Callable[[Call], Awaitable["Response"]],
                     admit: bool = True) -> "Response":
        from starlette.responses import JSONResponse

        call = Call(uuid.uuid4().hex, endpoint, time.perf_counter())
        admitted, error = False, None
        try:
            call.token = authenticate(self.tokens, request.headers.get("authorization"))
            if admit:
                if not self.admission.enter():
                    raise ApiError(503, f"busy: {self.limits.max_pending} requests are already being served; "
                                        f"retry later", {"Retry-After": str(self.limits.retry_after_s)})
                admitted = True
                call.folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.temp_dir))
            response = await work(call)
        except ClientGone:
            response, error = JSONResponse({"error": "client gone"}, CLIENT_GONE), "the client left mid-upload"
        except ApiError as e:
            error = call.public(e.logged or str(e))
            response = self._error(call, e.status, call.public(str(e)), e.headers)
        except ImageReadError as e:  # before RespiscanError: the file came, but is not a readable image
            error = call.public(str(e))
            response = self._error(call, 422, error)
        except RespiscanError as e:
            error = call.public(str(e))
            response = self._error(call, 400, error)
        except Exception:
            log.exception("request %s failed", call.request_id)
            error = "internal error"
            response = self._error(call, 500, f"internal error (request {call.request_id}; see the server log)")
        finally:
            self._release(call, admitted)
        self._audit(call, response.status_code, error)
        return response

    def _error(self, call: Call, status: int, message: str, headers: dict[str, str] | None = None) -> "Response":
        from starlette.responses import JSONResponse

        return JSONResponse({"error": message, "request_id": call.request_id}, status,
                            {"X-Request-ID": call.request_id, **(headers or {})})

    def _release(self, call: Call, admitted: bool) -> None:
        """Free the request's folder and admission; after its worker thread, if a timeout left one running
        (the callback then runs in that thread: the request's event loop may be gone by then)."""
        def release(_: object = None) -> None:
            if call.folder is not None:
                shutil.rmtree(call.folder, ignore_errors=True)
            if admitted:
                self.admission.leave()

        if call.pending is not None and not call.pending.done():
            call.pending.add_done_callback(release)
        else:
            release()

    def _audit(self, call: Call, status: int, error: str | None) -> None:
        if self.audit is None:
            return
        self.audit.write({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": call.request_id,
            "endpoint": call.endpoint, "token": call.token, "status": status,
            "inputs": [{"field": u.field, "sha256": u.sha256, "bytes": u.size} for u in call.uploads],
            "model_sha256": self.hashes["weights_sha256"], "engine": self.engine,
            "result": call.result, "error": error, "duration_s": round(time.perf_counter() - call.started, 4)})

    async def run(self, call: Call, fn: Callable, *args: Any) -> Any:
        """`fn(*args)` in a worker thread, within the inference timeout."""
        return await self.wait(call, self.pool.submit(fn, *args))

    async def wait(self, call: Call, future: Future) -> Any:
        """`future`'s result, within what is left of the inference timeout (counted from the first wait)."""
        if call.deadline is None:
            call.deadline = time.monotonic() + self.limits.inference_timeout_s
        call.pending = future
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, call.deadline - time.monotonic()))
        except TimeoutError:  # a case still queued in the batcher is cancelled with it
            raise ApiError(504, f"the prediction took longer than {self.limits.inference_timeout_s:g} s") from None

    async def predict(self, call: Call, explain: bool) -> dict[str, Any]:
        """One case: read and preprocessed in a worker thread, scored by the batcher together with the cases of
        the other requests waiting, and explained (when asked) in a worker thread."""
        case = await self.run(call, self.prepare_case, call)
        result = await self.wait(call, self.batcher.submit(case))
        if explain:
            images = {m: p for m, p in call.inputs.items() if not (m == "ct" and "ct_volume" in result)}
            result["explanations"] = await self.run(call, self.explain, images, call.folder / "gradcam")
        return result

    def reply(self, call: Call, body: dict[str, Any], received: float, done: float) -> "Response":
        from starlette.responses import JSONResponse

        now = time.perf_counter()
        timings = {"upload_s": round(received - call.started, 4), "inference_s": round(done - received, 4),
                   "total_s": round(now - call.started, 4)}
        return JSONResponse({**body, "request_id": call.request_id, "model_sha256": self.hashes["weights_sha256"],
                             "engine": self.engine, "timings": timings}, headers={"X-Request-ID": call.request_id})

    # the work, in worker threads

    def image_path(self, upload: Upload, call: Call) -> Path:
        """The path to give the pipeline: the file, or the folder a zipped CT series was unpacked into."""
        if not _is_zip(upload.path):
            return upload.path
        if upload.field != "ct":
            raise ApiError(415, f"{upload.label}: a zip archive; only a CT series may come zipped")
        return unpack_zip(upload, call, self.limits)

    def prepare_case(self, call: Call) -> PreparedCase:
        for upload in call.uploads:
            if upload.field in call.inputs:
                raise ApiError(400, f"{upload.field} is given twice; send several cases to /v1/predict/batch")
            call.inputs[upload.field] = self.image_path(upload, call)
        return self.pipeline.prepare_case(**call.inputs)

    def explainer(self) -> BasePipeline:
        """A torch pipeline of its own for Grad-CAM, used under `_explain_lock`: Grad-CAM's hooks must not fire
        in the forward passes that other threads run on the serving pipeline at the same time."""
        from respiscan.serving.torch_engine import Pipeline

        if self._explainer is None:
            self._explainer = Pipeline(self.pipeline.bundle)
        return self._explainer

    def explain(self, images: dict[str, Path], out: Path) -> list[dict[str, str]]:
        """Grad-CAM figures (the input beside its overlay) as base64 PNG."""
        from respiscan.serving.explain import explain as write_gradcam

        with self._explain_lock:
            paths = write_gradcam(self.explainer(), images, out)
        return [{"modality": m, "png_base64": base64.b64encode(p.read_bytes()).decode("ascii")}
                for m, p in zip(images, paths)]

    def predict_batch(self, call: Call) -> list[dict[str, Any]]:
        """Each file prepared here, then all of them scored by the batcher; an error stays with its file."""
        entries, pending = [], []
        for index, upload in enumerate(call.uploads):
            entry: dict[str, Any] = {"index": index, "field": upload.field, "filename": upload.filename}
            try:
                case = self.pipeline.prepare_case(**{upload.field: self.image_path(upload, call)})
                pending.append((entry, self.batcher.submit(case)))
            except (ApiError, RespiscanError) as e:
                _entry_error(entry, call, e)
            entries.append(entry)
        for entry, future in pending:
            try:
                entry["result"] = call.scrub(future.result())
            except RespiscanError as e:
                _entry_error(entry, call, e)
        return entries

    def dicom_report(self, call: Call, explain: bool) -> list[bytes]:
        """The DICOM SR (and Secondary Capture) for the uploaded instances, each as a DICOM file's bytes."""
        try:
            from respiscan.serving.dicom_sr import report_for_files
        except ImportError:
            raise ApiError(501, "this server has no DICOM SR writer (respiscan.serving.dicom_sr)") from None
        import pydicom

        paths: list[Path] = []
        for upload in call.uploads:
            if _is_zip(upload.path):
                paths += sorted(p for p in unpack_zip(upload, call, self.limits).iterdir())
            else:
                paths.append(upload.path)
        if explain:  # the Secondary Capture's Grad-CAM runs on the network it predicts with
            with self._explain_lock:
                datasets = report_for_files(self.explainer(), paths, explain=True)
        else:
            datasets = report_for_files(self.pipeline, paths)
        blobs = []
        for ds in datasets:
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            blobs.append(buffer.getvalue())
        return blobs

    def model(self) -> dict[str, Any]:
        config = self.pipeline.config
        return {**config.to_dict(), "hashes": self.hashes,
                "training_sources": config.data.sources_by_modality(), "transfer_note": config.data.transfer_note(),
                "server": {"engine": self.engine, "workers": self.workers, "auth": self.tokens is not None,
                           "limits": asdict(self.limits), "batch": asdict(self.batch)}}

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.batcher.close()
        if self.audit is not None:
            self.audit.close()


def _entry_error(entry: dict[str, Any], call: Call, error: Exception) -> None:
    """A /v1/predict/batch file's error and its status, as /v1/predict would answer it."""
    status = error.status if isinstance(error, ApiError) else 422 if isinstance(error, ImageReadError) else 400
    entry["error"], entry["status"] = call.public(str(error)), status


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of a prediction."""
    return {k: result.get(k) for k in ("label", "probability", "xray_probability", "ct_probability")}


# --- the app -----------------------------------------------------------------------------------------------

_FILES_SCHEMA = {"type": "string", "format": "binary"}


def _form(properties: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a multipart endpoint (its form is parsed by read_form, not by FastAPI)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": properties}}}}}


def create_app(bundle: str | Path | BasePipeline, *, engine: Engine = "auto", workers: int = 2,
               limits: Limits = Limits(), tokens: list[Token] | None = None, audit_log: str | Path | None = None,
               temp_dir: str | Path | None = None, batch: BatchConfig = BatchConfig()) -> "FastAPI":
    """The FastAPI app serving `bundle` (a bundle folder, loaded once here, or a loaded pipeline).

    `temp_dir` holds the per-request folders (default: a new folder in the system's temp area, removed at
    shutdown); `audit_log` is the JSON-lines file every /v1 request is appended to.
    """
    require("fastapi", "respiscan serve")
    require("python_multipart", "respiscan serve")
    offline = require("fastapi_offline", "respiscan serve")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response

    pipeline = bundle if isinstance(bundle, BasePipeline) else load(bundle, engine)
    own_temp = temp_dir is None
    root = Path(tempfile.mkdtemp(prefix="respiscan-serve-") if own_temp else temp_dir)
    root.mkdir(parents=True, exist_ok=True)
    service = Service(pipeline, workers, limits, tokens, AuditLog(audit_log) if audit_log else None, root, batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()
        if own_temp:
            shutil.rmtree(root, ignore_errors=True)

    from respiscan import __version__

    app = offline.FastAPIOffline(
        title="respiscan", version=__version__, lifespan=lifespan, redoc_url=None, favicon_url="data:,",
        swagger_ui_parameters={"validatorUrl": None},
        description="COVID-19 detection from chest X-ray and CT. Research software, not a medical device.")
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": " ".join(str(exc.detail).split())}, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, 400)

    html = PAGE.read_text(encoding="utf-8")
    # the page loads nothing from anywhere else, and the browser is told so
    csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
           "connect-src 'self'; form-action 'none'; base-uri 'none'")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The bundle is loaded and its hashes were verified when it was")
    async def readyz() -> dict[str, Any]:
        return {"status": "ready", "engine": service.engine, **service.hashes}

    @app.get("/v1/model", summary="What the model is: format, hashes, thresholds, preprocessing, sources, card")
    async def model(request: Request) -> Response:
        async def work(call: Call) -> Response:
            return JSONResponse(service.model(), headers={"X-Request-ID": call.request_id})
        return await service.handle(request, "/v1/model", work, admit=False)

    case = {"xray": {**_FILES_SCHEMA, "description": "chest X-ray: PNG, JPEG, TIFF, BMP or DICOM"},
            "ct": {**_FILES_SCHEMA, "description": "CT: a slice (image or DICOM), a NIfTI volume, a multi-frame "
                                                   "DICOM or a zipped DICOM series"},
            "explain": {"type": "boolean", "description": "add Grad-CAM overlays (base64 PNG)"}}

    @app.post("/v1/predict", summary="One case: an X-ray and/or a CT; the JSON of `respiscan predict --json`",
              openapi_extra=_form(case))
    async def predict(request: Request) -> Response:
        async def work(call: Call) -> Response:
            values = await read_form(request, call, limits, MODALITY_FIELDS, ("explain",))
            explain = flag(values, request, "explain")
            received = time.perf_counter()
            result = call.scrub(await service.predict(call, explain))
            call.result = _summary(result)
            return service.reply(call, result, received, time.perf_counter())
        return await service.handle(request, "/v1/predict", work)

    batch = {"xray": {"type": "array", "items": _FILES_SCHEMA}, "ct": {"type": "array", "items": _FILES_SCHEMA}}

    @app.post("/v1/predict/batch", summary="Many files (fields xray and ct, repeated): one result or error each",
              openapi_extra=_form(batch))
    async def predict_batch(request: Request) -> Response:
        async def work(call: Call) -> Response:
            await read_form(request, call, limits, MODALITY_FIELDS)
            if not call.uploads:
                raise ApiError(400, "no files: send xray and/or ct fields, one file each")
            received = time.perf_counter()
            entries = await service.run(call, service.predict_batch, call)
            call.result = [_summary(e["result"]) if "result" in e else {"error": e["error"]} for e in entries]
            return service.reply(call, {"results": entries}, received, time.perf_counter())
        return await service.handle(request, "/v1/predict/batch", work)

    dicom = {"dicom": {"type": "array", "items": _FILES_SCHEMA,
                       "description": "DICOM instance(s), or a zipped study or series"},
             "explain": {"type": "boolean", "description": "add a Secondary Capture of the Grad-CAM overlay"}}

    @app.post("/v1/dicom", summary="DICOM in, a DICOM Structured Report out (with explain: and a Secondary "
                                   "Capture, as multipart/related)", openapi_extra=_form(dicom))
    async def dicom_sr(request: Request) -> Response:
        async def work(call: Call) -> Response:
            values = await read_form(request, call, limits, ("dicom",), ("explain",))
            explain = flag(values, request, "explain")
            if not call.uploads:
                raise ApiError(400, "no file: send a DICOM instance or a zipped study in the field `dicom`")
            blobs = await service.run(call, service.dicom_report, call, explain)
            call.result = {"datasets": len(blobs)}
            headers = {"X-Request-ID": call.request_id}
            if len(blobs) == 1:
                return Response(blobs[0], media_type="application/dicom", headers=headers)
            boundary = uuid.uuid4().hex
            body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), blob)
                            for blob in blobs) + b"--%s--\r\n" % boundary.encode()
            return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
                            headers=headers)
        return await service.handle(request, "/v1/dicom", work)

    return app


# --- the command -------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token_file: str | Path | None = None,
          workers: int = 2, engine: Engine = "auto", audit_log: str | Path = "respiscan-audit.jsonl",
          limits: Limits = Limits(), batch: BatchConfig = BatchConfig(),
          announce: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM or Ctrl-C, then finish the requests in flight and return.

    The port is bound here before uvicorn starts (port 0 picks a free one, which `announce` names).
    """
    if token_file is None and not is_loopback(host):
        raise RespiscanError(f"--host {host} is reachable from other machines: give --token-file (lines of "
                             f"`NAME TOKEN`), or serve on 127.0.0.1")
    uvicorn = require("uvicorn", "respiscan serve")
    tokens = read_tokens(token_file) if token_file is not None else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # before the bundle loads: a busy port is said at once
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise RespiscanError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    try:
        app = create_app(bundle, engine=engine, workers=workers, limits=limits, tokens=tokens, audit_log=audit_log,
                         batch=batch)
        service: Service = app.state.service
        server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False,
            timeout_graceful_shutdown=int(limits.upload_timeout_s + limits.inference_timeout_s)))
        address = f"[{host}]" if family == socket.AF_INET6 else host
        announce(f"serving {bundle} on http://{address}:{sock.getsockname()[1]} ({service.engine} engine, "
                 f"{workers} worker threads, batches of up to {batch.max_batch}, "
                 f"{'token required' if tokens else 'no token'}; audit log {audit_log}); "
                 f"SIGTERM or Ctrl-C stops")
        # uvicorn re-raises the signal that stopped it once it has shut down gracefully: with these handlers
        # in place that ends the command normally (exit 0) instead of killing it
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
    announce("stopped")
