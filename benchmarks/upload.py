#!/usr/bin/env python3
"""
Audio uploads: the time to send a multipart transcription request and get
its answer, through dynllm and directly to the same backend (the OVMS fake,
which reads the whole upload and hashes it), for several sizes. Uploads
alternate between the two paths; medians are compared.

    PYTHONPATH=. .venv/bin/python benchmarks/upload.py [-n 15] [--sizes 1,16]

dynllm receives the body (twisted.web spools it to a temporary file past
100 KB), finds the ``model`` field by reading it once in blocks, and streams
it to the backend: the ratio shows what that costs against the backend's
own work on the same bytes.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import BenchDaemon, header, median, summary, terminateOnSignals  # noqa: E402
from tests import fakeovms  # noqa: E402

BOUNDARY = "dynllmbenchboundary"


def multipart(model: str, audio: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + audio + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> float:
    """
    @param headers: More headers (the backend's key, for a direct upload).
    @return: seconds from the first byte sent to the last byte of the answer.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request(
        "POST", path, body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}
    )
    response = connection.getresponse()
    answer = response.read()
    elapsed = time.perf_counter() - started
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"upload failed: {response.status} {answer[:200]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=15, help="uploads per size and path")
    parser.add_argument("--sizes", default="1,16", help="upload sizes in MB, comma-separated")
    args = parser.parse_args()
    terminateOnSignals()
    directory = tempfile.mkdtemp(prefix="dynllm-bench-ovms-")
    modelDir = os.path.join(directory, "whisper")
    os.makedirs(modelDir)
    config = {
        "total_vram_mb": 100,
        "enabled_backends": ["openvino"],
        "max_request_body_mb": 100,
        "backend": {"ovms_binary": fakeovms.launcher(directory)},
        "models": [
            {"name": "whisper", "path": modelDir, "backend": "openvino", "model_type": "transcription",
             "vram_mb": 10, "unload_time": -1}
        ],
    }
    with BenchDaemon(config) as bench:
        status, _, body = bench.daemon.post("/admin/models/load", {"model": "whisper"})
        if status != 200:
            raise RuntimeError(f"load failed: {body!r}")
        backendPort = bench.models()["whisper"]["port"]
        key = bench.backendHeaders("whisper")
        header("Multipart upload to a transcription model (OVMS fake), whole request to whole answer")
        for size in (float(s) for s in args.sizes.split(",")):
            body = multipart("whisper", os.urandom(int(size * 1024 * 1024)))
            upload(backendPort, "/v3/audio/transcriptions", body, key)
            upload(bench.port, "/v1/audio/transcriptions", body)
            direct, proxied = [], []
            for _ in range(args.n):
                direct.append(upload(backendPort, "/v3/audio/transcriptions", body, key))
                proxied.append(upload(bench.port, "/v1/audio/transcriptions", body))
            print(f"{size:g} MB direct   {summary(direct)}")
            print(f"{size:g} MB dynllm   {summary(proxied)}")
            ratio = median(proxied) / median(direct)
            rate = len(body) / median(proxied) / 1e6
            print(f"{size:g} MB: dynllm takes {ratio:.2f}x the direct time"
                  f" (+{(median(proxied) - median(direct)) * 1000:.1f} ms); {rate:.0f} MB/s through dynllm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
