"""`respiscan listen`: a DICOM C-STORE receiver (pynetdicom) that answers each X-ray instance and CT series
with a Structured Report (and, with `explain`, a Grad-CAM Secondary Capture), written under the output folder
and, when asked, sent on by C-STORE.

A CT series has no "last slice" marker, so it counts as complete when its sender releases the association
or after `series_timeout` seconds without a new instance of it; an X-ray instance is complete on arrival.
One worker thread predicts, in arrival order, so the pipeline is never used by two threads at once.
Received files are spooled in a private temporary folder and deleted once their series is processed.

The log never holds patient identifiers (names, ids, birth dates): a study and a series are named by the
first 12 hex digits of the SHA-256 of their UID. pynetdicom's and highdicom's loggers are held at WARNING
unless the caller configured them, as their INFO and DEBUG lines show UIDs and patient attributes.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from respiscan.errors import RespiscanError
from respiscan.extras import require
from respiscan.serving.dicom_sr import XRAY_MODALITIES, report
from respiscan.utils import atomic_write

log = logging.getLogger("respiscan.listen")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
STOP_GRACE_S = 10.0  # at stop, how long open associations may go on before they are aborted
NETWORK_TIMEOUT_S = 30.0  # for forwarding: connect, association and C-STORE answers
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
RECENT = 1000  # results kept in Listener.processed


def uid_key(uid: str) -> str:
    """A study's or series' name in logs and file names: not its UID, which links to the patient's records."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]


def _check_ae_title(title: str, what: str) -> str:
    if not (0 < len(title.strip()) and len(title) <= 16 and title.isascii() and title.isprintable()
            and "\\" not in title):
        raise RespiscanError(f"{what} {title!r}: an AE title is 1 to 16 printable ASCII characters, no backslash")
    return title


@dataclass(frozen=True)
class Peer:
    """A DICOM node to send SRs to."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Peer:
        """HOST:PORT:AET (the host may itself contain colons, as an IPv6 address does)."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
            raise RespiscanError(f"--forward {text!r}: expected HOST:PORT:AET, e.g. pacs.local:104:PACS")
        return cls(parts[0], int(parts[1]), _check_ae_title(parts[2], "--forward AE title"))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ListenConfig:
    out: Path
    port: int = 11112  # 0: any free port (Listener.port says which)
    host: str = "127.0.0.1"
    ae_title: str = "RESPISCAN"
    forward: Peer | None = None
    series_timeout: float = 10.0  # seconds without a new instance after which a CT series is complete
    explain: bool = False  # add a Secondary Capture of the Grad-CAM overlay beside each SR

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise RespiscanError(f"--port {self.port}: expected 0 to 65535")
        if not self.series_timeout > 0:
            raise RespiscanError(f"--series-timeout {self.series_timeout}: expected a positive number of seconds")
        _check_ae_title(self.ae_title, "--ae-title")


@dataclass(frozen=True)
class Processed:
    """One series answered (or refused): what the log line says, for callers and tests."""

    study: str  # uid_key of the study
    series: str  # uid_key of the series
    modality: str
    instances: int
    seconds: float
    probability: float | None = None
    label: str | None = None
    sr_path: Path | None = None
    sc_path: Path | None = None  # the Grad-CAM Secondary Capture, with `explain`
    forwarded: bool = False
    error: str | None = None


@dataclass
class _Series:
    """Instances received for one series, not yet processed."""

    study_uid: str
    series_uid: str
    modality: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # SOP instance key -> spooled file
    last: float = 0.0  # time.monotonic() of the latest instance
    associations: set[int] = field(default_factory=set)


class Listener:
    """The C-STORE receiver. `start()` listens in background threads; `stop()` (or leaving the `with`
    block) stops accepting, lets open associations finish, processes what was received, then returns."""

    def __init__(self, pipeline, config: ListenConfig):
        self.pipeline, self.config = pipeline, config
        self.processed: deque[Processed] = deque(maxlen=RECENT)  # the latest, for callers and tests
        self._last_ignored: tuple[str, str] | None = None
        self._pending: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Series | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spool: Path | None = None
        self._ae = self._server = None
        self._explainer = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> Listener:
        pynetdicom = require("pynetdicom", "respiscan listen")
        require("highdicom", "respiscan listen")
        for name in ("pynetdicom", "highdicom"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        ae = pynetdicom.AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        for context in pynetdicom.AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, pynetdicom.ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(pynetdicom.sop_class.Verification)
        handlers = [(pynetdicom.evt.EVT_C_STORE, self._on_store), (pynetdicom.evt.EVT_RELEASED, self._on_release)]
        self._spool = Path(tempfile.mkdtemp(prefix="respiscan-listen-"))
        try:
            self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            shutil.rmtree(self._spool, ignore_errors=True)
            raise RespiscanError(f"cannot listen on {self.config.host}:{self.config.port}: "
                                 f"{exc.strerror or exc}") from exc
        self._ae = ae
        self._threads = [threading.Thread(target=target, name=f"respiscan-listen-{name}", daemon=True)
                         for name, target in (("worker", self._work), ("timer", self._watch))]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # no new associations
        deadline = time.monotonic() + STOP_GRACE_S
        while self._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self._ae.shutdown()  # aborts what is still open
        self._stopping.set()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for series in pending:  # received is received: answer it before exiting
            self._jobs.put(series)
        self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        shutil.rmtree(self._spool, ignore_errors=True)
        self._server = None

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- receiving (pynetdicom's association threads) -------------------------------------------------------

    def _on_store(self, event) -> int:
        ds = event.dataset
        modality = str(ds.get("Modality", "")).strip().upper()
        kind = "ct" if modality == "CT" else "xray" if modality in XRAY_MODALITIES else None
        study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        if not (study and series and sop):
            log.warning("refused an instance without Study, Series or SOP Instance UID")
            return _CANNOT_UNDERSTAND
        if kind is None or kind not in self.pipeline.modalities:
            if self._last_ignored != (study, series):  # one line per series, not per instance
                self._last_ignored = (study, series)
                log.info("study %s series %s: ignoring its instances of modality %s", uid_key(study),
                         uid_key(series), modality or "(none)")
            return _SUCCESS
        with self._lock:
            key = (study, series) if kind == "ct" else (study, sop)  # each X-ray instance is its own job
            pending = self._pending.get(key)
            if pending is None:
                folder = Path(tempfile.mkdtemp(dir=self._spool))
                pending = self._pending[key] = _Series(study, series, kind, folder)
            path = pending.folder / f"{uid_key(sop)}.dcm"
            try:
                path.write_bytes(event.encoded_dataset())
            except OSError as exc:
                log.error("study %s series %s: cannot spool an instance: %s", uid_key(study), uid_key(series),
                          exc.strerror or exc)
                return _OUT_OF_RESOURCES
            pending.files[sop] = path
            pending.last = time.monotonic()
            pending.associations.add(id(event.assoc))
            if kind == "xray":
                self._jobs.put(self._pending.pop(key))
        return _SUCCESS

    def _on_release(self, event) -> None:
        """The sender is done: its CT series are complete."""
        with self._lock:
            done = [key for key, s in self._pending.items() if id(event.assoc) in s.associations]
            for key in done:
                self._jobs.put(self._pending.pop(key))

    def _watch(self) -> None:
        """CT series without a new instance for series_timeout seconds are complete."""
        tick = min(0.5, self.config.series_timeout / 4)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._lock:
                done = [key for key, s in self._pending.items() if now - s.last >= self.config.series_timeout]
                for key in done:
                    self._jobs.put(self._pending.pop(key))

    # --- processing (the worker thread) ---------------------------------------------------------------------

    def _work(self) -> None:
        while (series := self._jobs.get()) is not None:
            try:
                self.processed.append(self._process(series))
            finally:
                shutil.rmtree(series.folder, ignore_errors=True)

    def _process(self, series: _Series) -> Processed:
        start = time.perf_counter()
        names = {"study": uid_key(series.study_uid), "series": uid_key(series.series_uid),
                 "modality": series.modality, "instances": len(series.files)}
        where = f"study {names['study']} series {names['series']} ({series.modality}, {len(series.files)} " \
                f"instance(s))"
        try:
            result = report(self.explainer() if self.config.explain else self.pipeline, sorted(series.files.values()),
                            explain=self.config.explain)
            paths = [self.config.out / names["study"] / f"{ds.SOPInstanceUID}.dcm" for ds in result.datasets]
            for ds, path in zip(result.datasets, paths):
                with atomic_write(path, "wb") as f:
                    ds.save_as(f, enforce_file_format=True)
            forwarded = False
            if self.config.forward is not None:
                try:
                    self._forward(result.datasets)
                    forwarded = True
                except RespiscanError as exc:
                    log.error("%s: SR written but not forwarded: %s", where, exc)
        except Exception as exc:  # one bad series must not stop the receiver: log it and go on
            message = str(exc) if isinstance(exc, RespiscanError) else f"{type(exc).__name__}: {exc}"
            message = " ".join(message.split())
            log.error("%s: not processed: %s", where, message)
            return Processed(**names, seconds=time.perf_counter() - start, error=message)
        p, threshold = result.result["probability"], result.result["threshold"]
        seconds = time.perf_counter() - start
        sc_path = paths[1] if len(paths) > 1 else None
        log.info("%s: %s, p(COVID) = %.4f (threshold %.3f); SR %s%s%s; %.2f s", where, result.result["label"], p,
                 threshold, paths[0], f", Grad-CAM {sc_path}" if sc_path else "",
                 f", forwarded to {self.config.forward}" if forwarded else "", seconds)
        return Processed(**names, seconds=seconds, probability=p, label=result.result["label"], sr_path=paths[0],
                         sc_path=sc_path, forwarded=forwarded)

    def explainer(self):
        """With `explain`, the torch pipeline that predicts and runs Grad-CAM (loaded once, on first use), so
        that the SR and the Secondary Capture come from the same network."""
        from respiscan.serving.torch_engine import Pipeline

        if self._explainer is None:
            has_net = getattr(self.pipeline, "net", None) is not None
            self._explainer = self.pipeline if has_net else Pipeline(self.pipeline.bundle)
        return self._explainer

    def _forward(self, datasets) -> None:
        """The SR (and the Secondary Capture) by C-STORE, in one association."""
        pynetdicom = require("pynetdicom", "respiscan listen --forward")
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        peer = self.config.forward
        ae = pynetdicom.AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NETWORK_TIMEOUT_S
        ae.connection_timeout = NETWORK_TIMEOUT_S
        for sop_class in dict.fromkeys(ds.SOPClassUID for ds in datasets):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not assoc.is_established:
            raise RespiscanError(f"{peer}: association rejected, aborted or not answered")
        try:
            codes = []
            for ds in datasets:
                status = assoc.send_c_store(ds)
                codes.append(status.get("Status") if status else None)
        finally:
            assoc.release()
        for ds, code in zip(datasets, codes):
            if code != _SUCCESS:
                raise RespiscanError(f"{peer}: C-STORE of the {ds.SOPClassUID.name} "
                                     + ("not answered" if code is None else f"status 0x{code:04X}"))


def listen(pipeline, config: ListenConfig) -> None:
    """Receive until SIGTERM or Ctrl-C, then stop cleanly (see Listener.stop). Call it from the main thread:
    it installs the SIGTERM handler."""
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        with Listener(pipeline, config) as listener:
            if config.host not in LOOPBACK:
                log.warning("listening on %s: DICOM has no authentication; any host that reaches this port can "
                            "send images (restrict it with a firewall)", config.host)
            log.info("listening as %s on %s:%d; SRs under %s%s; a CT series is complete on release or after "
                     "%g s without a new instance", config.ae_title, config.host, listener.port, config.out,
                     f", forwarded to {config.forward}" if config.forward else "", config.series_timeout)
            try:
                stopped.wait()
            except KeyboardInterrupt:
                pass
            log.info("stopping: finishing the series received")
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("stopped")
