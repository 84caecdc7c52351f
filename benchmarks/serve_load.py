"""Load test of `respiscan serve` on loopback: concurrent clients posting X-ray + CT pairs, against the engine's
own batch rate measured in the same run, and the server's memory growth.

    python benchmarks/serve_load.py --bundle BUNDLE [--clients 8] [--duration 60] [--workers 2]

Pairs are real test images from ../shared/data/realdev when it is there (else synthetic phantoms). The engine's
batch rate is `predict_samples` on the same files in this process (reading, preprocessing and batched
inference, no HTTP), measured before the server starts and again after it stopped, so that the two never
share the CPU and a change in the machine's load between them shows. Resident memory
(VmRSS) of the server process is read after a warm-up (as many clients as the load, so that the engine has seen
the batch sizes it will see) and again once at least 1,000 more requests (--memory-requests) were answered.
Every loop is bounded in time; the server is stopped with SIGTERM at the end. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle
from respiscan.data.samples import Sample, discover
from respiscan.serving import load

REALDEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "realdev"
BOUNDARY = "respiscan-load"
WARM_REQUESTS = 200
MAX_EXTRA_S = 900  # the longest the memory phase may run on a slow machine


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def pairs_from(data: Path | None, n: int, tmp: Path) -> tuple[list[tuple[Path, Path]], str]:
    if data is not None and data.is_dir():
        samples, source = [s for s in discover(data) if s.split == "test"], f"real test images of {data.name}"
    else:
        from respiscan.data.synth import generate

        samples = [s for s in discover(generate(tmp / "synth", n_per_class=n, size=224, progress=False))
                   if s.split == "test"]
        source = "synthetic phantoms (224 px)"
    xrays = [s.path for s in samples if s.modality == "xray"][:n]
    cts = [s.path for s in samples if s.modality == "ct"][:n]
    return list(zip(xrays, cts)), source


def body(xray: Path, ct: Path) -> bytes:
    out = b""
    for name, path in (("xray", xray), ("ct", ct)):
        out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n\r\n'
                .encode() + path.read_bytes() + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


def engine_rate(bundle: Path, engine: str, pairs: list[tuple[Path, Path]], seconds: float) -> tuple[float, str]:
    """Pairs per second through the engine's own batch path, and which engine it is."""
    pipe = load(bundle, engine)
    samples = [Sample(f"{m}{i}", path, m, 0, "test") for i, pair in enumerate(pairs)
               for m, path in zip(("xray", "ct"), pair)]
    pipe.predict_samples(samples)  # warm-up: first-call allocations, page cache
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pipe.predict_samples(samples)
        done += len(pairs)
    return done / (time.perf_counter() - start), type(pipe).__name__


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(bundle: Path, engine: str, workers: int, tmp: Path) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "respiscan", "serve", str(bundle), "--port", "0", "--engine",
                             engine, "--workers", str(workers), "--audit-log", str(tmp / "audit.jsonl")],
                            stdout=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not line or " on http://" not in line[0]:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}")
    host, port = line[0].split(" on http://")[1].split()[0].split(":")
    return proc, host, int(port)


def clients(host: str, port: int, bodies: list[bytes], n: int, until: float, stop_after: int | None,
            tally: Tally) -> None:
    """`n` threads, each on its own keep-alive connection, posting pairs until `until` (or `stop_after`)."""
    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        i = offset
        while time.monotonic() < until and (stop_after is None or len(tally.latencies) < stop_after):
            started = time.perf_counter()
            try:
                connection.request("POST", "/v1/predict", bodies[i % len(bodies)],
                                   {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                response = connection.getresponse()
                response.read()
                error = None if response.status == 200 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=120)
            with tally.lock:
                if error:
                    tally.errors.append(error)
                else:
                    tally.latencies.append(time.perf_counter() - started)
            i += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(k * 7,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="the server's inference threads")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--data", type=Path, default=REALDEV)
    parser.add_argument("--memory-requests", type=int, default=1000,
                        help="requests after the warm-up over which the server's memory growth is measured")
    args = parser.parse_args()

    config = Bundle.open(args.bundle).config
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        pairs, source = pairs_from(args.data, args.pairs, Path(tmp))
        bodies = [body(x, c) for x, c in pairs]
        seconds = min(20.0, args.duration / 3)
        rate_before, engine = engine_rate(args.bundle, args.engine, pairs, seconds)
        proc, host, port = start_server(args.bundle, args.engine, args.workers, Path(tmp))
        try:
            warm = Tally()
            clients(host, port, bodies, args.clients, time.monotonic() + 120, WARM_REQUESTS, warm)
            rss_start = rss_mb(proc.pid)
            load_tally = Tally()
            started = time.perf_counter()
            clients(host, port, bodies, args.clients, time.monotonic() + args.duration, None, load_tally)
            elapsed = time.perf_counter() - started
            extra = Tally()
            if len(load_tally.latencies) < args.memory_requests:  # the memory phase needs that many in all
                clients(host, port, bodies, args.clients, time.monotonic() + MAX_EXTRA_S,
                        args.memory_requests - len(load_tally.latencies), extra)
            rss_end = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            stopped = proc.wait(timeout=120)
        rate_after, _ = engine_rate(args.bundle, args.engine, pairs, seconds)
    batch_rate = (rate_before + rate_after) / 2
    answered = len(load_tally.latencies)
    latencies = np.array(load_tally.latencies) * 1000
    throughput = answered / elapsed
    after_warmup = answered + len(extra.latencies) + len(extra.errors) + len(load_tally.errors)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rows = [
        ("machine", f"{cpu}, {os.cpu_count()} cores; {datetime.now(timezone.utc):%Y-%m-%d}"),
        ("bundle", f"{', '.join(sorted(set(config.model.task_backbones.values())))} at {config.preprocess.size} px "
                   f"({config.training.get('preset', '?')} preset), {engine}"),
        ("inputs", f"{len(pairs)} X-ray + CT pairs: {source}"),
        ("load", f"{args.clients} clients for {elapsed:.0f} s, server with {args.workers} worker threads"),
        ("requests answered / errors", f"{answered} / {len(load_tally.errors)}"
                                       + (f" ({load_tally.errors[0]})" if load_tally.errors else "")),
        ("latency p50 / p99", f"{np.percentile(latencies, 50):.0f} ms / {np.percentile(latencies, 99):.0f} ms"
                              if answered else "n/a"),
        ("throughput", f"{throughput:.2f} pairs/s"),
        ("engine's own batch rate (same run)", f"{rate_before:.2f} pairs/s before the load, {rate_after:.2f} after"),
        ("throughput / batch rate", f"{throughput / batch_rate:.2f} of their mean (target >= 0.8)"),
        ("server RSS growth", f"{rss_end - rss_start:+.1f} MB over {after_warmup} requests "
                              f"({rss_start:.0f} -> {rss_end:.0f} MB; target < 50 MB per 1,000)"),
        ("SIGTERM", f"exit code {stopped}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
