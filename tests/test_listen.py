"""`respiscan listen`: a pynetdicom client sends a CT series and an X-ray over loopback; the SR of each lands in
--out, is forwarded to a test receiver, says what `predict` says, and the log names no patient."""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)

from respiscan.errors import RespiscanError
from respiscan.serving.listen import ListenConfig, Listener, Peer, listen, uid_key
from respiscan.serving.torch_engine import Pipeline
from test_cli import run
from test_dicom_sr import PATIENT, ct_series, finding, save, xray_instance

pynetdicom = pytest.importorskip("pynetdicom")
WAIT_S = 60  # the longest any step may take on a loaded CPU before the test fails


@pytest.fixture(scope="module")
def pipe(bundle) -> Pipeline:
    return Pipeline(bundle)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The listener's spool goes under tmp_path, so the tests can see that it is removed."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def receiver():
    """A C-STORE SCP for SRs and Secondary Captures on a free loopback port: (port, the data sets it received)."""
    received: list[pydicom.Dataset] = []
    ae = pynetdicom.AE(ae_title="RECEIVER")
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)

    def store(event) -> int:
        received.append(event.dataset)
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(pynetdicom.evt.EVT_C_STORE, store)])
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


@contextmanager
def association(port: int):
    ae = pynetdicom.AE(ae_title="MODALITY")
    for sop_class in (CTImageStorage, DigitalXRayImageStorageForPresentation, pynetdicom.sop_class.Verification):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESPISCAN")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def send(assoc, datasets) -> None:
    for ds in datasets:
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000


def expected_probability(pipe, datasets, folder: Path) -> float:
    paths = save(datasets, folder)
    result = pipe.predict(xray=paths[0]) if len(paths) == 1 else pipe.predict(ct=folder)
    return result["probability"]


def test_ct_series_on_release_and_xray_at_once_are_answered_and_forwarded(pipe, tmp_path, private_tmp, caplog):
    series, xray = ct_series(4, seed=11), xray_instance(seed=12)
    out = tmp_path / "out"
    with receiver() as (receiver_port, received), caplog.at_level(logging.INFO):
        config = ListenConfig(out=out, port=0, forward=Peer("127.0.0.1", receiver_port, "RECEIVER"),
                              series_timeout=600)
        with Listener(pipe, config) as listener:
            with association(listener.port) as assoc:
                send(assoc, series + [xray])
                wait_for(lambda: len(listener.processed) == 1, "the X-ray's SR")
                assert listener.processed[0].modality == "xray"  # the CT series waits for the release
            wait_for(lambda: len(listener.processed) == 2, "the CT series' SR after the release")
            wait_for(lambda: len(received) == 2, "the forwarded SRs")
    assert [p.error for p in listener.processed] == [None, None]
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 2 and {f.parent.name for f in files} == {uid_key(xray.StudyInstanceUID),
                                                                   uid_key(series[0].StudyInstanceUID)}
    assert {f.stem for f in files} == {str(ds.SOPInstanceUID) for ds in received}
    for path in files:
        sr = pydicom.dcmread(path)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        inputs = [xray] if evidence.SeriesInstanceUID == xray.SeriesInstanceUID else series
        assert sorted(i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence) == \
            sorted(ds.SOPInstanceUID for ds in inputs)
        assert finding(sr)[1] == pytest.approx(expected_probability(pipe, inputs, tmp_path / path.stem), abs=1e-6)
    assert all(p.forwarded for p in listener.processed)
    logged = caplog.text
    assert uid_key(series[0].StudyInstanceUID) in logged and "forwarded to RECEIVER@127.0.0.1" in logged
    identifiers = [PATIENT[k] for k in ("PatientName", "PatientID", "PatientBirthDate")]
    uids = [ds.get(k) for ds in [*series, xray] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    for secret in [*identifiers, "Doe", *uids]:
        assert secret not in logged
    assert not list(private_tmp.iterdir())  # the spooled instances are gone


def test_explain_writes_and_forwards_a_gradcam_secondary_capture_beside_the_sr(pipe, tmp_path, private_tmp):
    xray = xray_instance(seed=14)
    out = tmp_path / "out"
    with receiver() as (receiver_port, received):
        config = ListenConfig(out=out, port=0, forward=Peer("127.0.0.1", receiver_port, "RECEIVER"), explain=True)
        with Listener(pipe, config) as listener:
            with association(listener.port) as assoc:
                send(assoc, [xray])
            wait_for(lambda: listener.processed, "the X-ray's SR and Secondary Capture")
            wait_for(lambda: len(received) == 2, "the forwarded SR and Secondary Capture")
    (done,) = listener.processed
    assert done.error is None and done.forwarded and done.sc_path.parent == done.sr_path.parent
    sr, sc = pydicom.dcmread(done.sr_path), pydicom.dcmread(done.sc_path)
    assert sr.SOPClassUID == ComprehensiveSRStorage and sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == xray.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == xray.SOPInstanceUID
    assert sc.pixel_array.ndim == 3 and sc.PhotometricInterpretation == "RGB"
    assert sorted(f.name for f in out.rglob("*.dcm")) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in (sr, sc))
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(str(ds.SOPInstanceUID) for ds in (sr, sc))
    assert finding(sr)[1] == pytest.approx(expected_probability(pipe, [xray], tmp_path / "alone"), abs=1e-6)
    assert not list(private_tmp.iterdir())


def test_ct_series_is_complete_after_the_timeout_without_a_release(pipe, tmp_path, private_tmp):
    with Listener(pipe, ListenConfig(out=tmp_path / "out", port=0, series_timeout=0.5)) as listener:
        with association(listener.port) as assoc:
            send(assoc, ct_series(3, seed=21))
            wait_for(lambda: listener.processed, "the SR after the series timeout")
        assert listener.processed[0].instances == 3 and listener.processed[0].sr_path.is_file()
    assert not list(private_tmp.iterdir())


def test_unreadable_series_is_logged_and_the_receiver_goes_on(pipe, tmp_path):
    empty = ct_series(2, seed=31)
    for ds in empty:  # air only: no slice contains lung
        ds.PixelData = bytes(len(ds.PixelData))
    other = xray_instance(seed=33)
    other.Modality = "MR"  # acknowledged, not answered
    with Listener(pipe, ListenConfig(out=tmp_path / "out", port=0, series_timeout=600)) as listener:
        with association(listener.port) as assoc:
            send(assoc, [other, *empty])
        wait_for(lambda: listener.processed, "the refusal")
        assert "contains lung" in listener.processed[0].error
        with association(listener.port) as assoc:
            send(assoc, [xray_instance(seed=32)])
        wait_for(lambda: len(listener.processed) == 2, "the next SR")
    assert listener.processed[1].error is None and listener.processed[1].modality == "xray"
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_sigterm_stops_listen_after_answering_what_it_received(pipe, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sent = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            ae = pynetdicom.AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", port, ae_title="RESPISCAN")
            if assoc.is_established:
                send(assoc, ct_series(3, seed=41))
                assoc.release()
                sent.set()
                os.kill(os.getpid(), signal.SIGTERM)  # only once listen() is up, its handler installed
                return
            time.sleep(0.1)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    listen(pipe, ListenConfig(out=tmp_path / "out", port=port, series_timeout=600))
    thread.join(WAIT_S)
    assert sent.is_set()
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_bad_settings_are_one_line_errors(bundle, capsys, monkeypatch):
    for text in ("pacs.local:104", "pacs:port:AET", ":104:AET", "pacs:104:" + "A" * 17):
        with pytest.raises(RespiscanError, match="--forward"):
            Peer.parse(text)
    assert Peer.parse("::1:104:PACS") == Peer("::1", 104, "PACS")
    with pytest.raises(RespiscanError, match="--series-timeout"):
        ListenConfig(out=Path("x"), series_timeout=0)
    code, _, err = run(["listen", bundle, "--forward", "nowhere"], capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --forward 'nowhere'")
