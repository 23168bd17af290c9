"""`mlx-vlm-native serve` under concurrent clients, on loopback only.

    python benchmarks/bench_server_load.py --clients 20 --seconds 60

Starts the server as a subprocess (the embedded default model unless --model),
then runs `--clients` threads that each send chat completions with a small
data-URL image back to back for `--seconds`. Reports requests, errors by kind
(HTTP status, connection resets, other socket errors), latency p50/p95/max,
and the server's peak RSS (VmHWM from /proc) and RSS at the end. Bounded: every
request has a 120 s timeout and the run stops at --seconds, then waits at most
for the requests in flight.
"""

import argparse
import base64
import collections
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in kB (Linux)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def image_url(seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(model, max_tokens: int) -> tuple:
    command = [sys.executable, "-m", "mlx_vlm_native.cli", "serve", "--port", "0", "--host", "127.0.0.1",
               "--max-tokens", str(max_tokens)] + (["--model", model] if model else [])
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            sys.exit("the server exited during start-up")
        match = re.search(r"serving .* at http://([\d.]+):(\d+)/v1", line)
        if match:
            # drain the request log so that a full pipe never stalls the server
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, match.group(1), int(match.group(2))
    proc.kill()
    sys.exit("the server did not start within 300 s")


def client(host, port, body: bytes, stop_at: float, results: list, errors: collections.Counter, lock):
    while time.monotonic() < stop_at:
        tic = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=120)
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            conn.close()
            kind = "ok" if response.status == 200 else f"HTTP {response.status}"
        except ConnectionResetError:
            kind = "connection reset"
        except (http.client.RemoteDisconnected, ConnectionAbortedError, BrokenPipeError):
            kind = "connection closed early"
        except OSError as e:
            kind = f"socket error {type(e).__name__}"
        with lock:
            if kind == "ok":
                results.append(time.perf_counter() - tic)
            else:
                errors[kind] += 1


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    args = p.parse_args()
    if not (1 <= args.clients <= 200 and 0 < args.seconds <= 600):
        sys.exit("--clients must be 1..200 and --seconds 0..600")

    proc, host, port = start_server(args.model, args.max_tokens)
    try:
        rss_start = proc_status(proc.pid, "VmRSS")
        body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(0)}},
            {"type": "text", "text": "What colour is the shape?"}]}], "max_tokens": args.max_tokens}).encode()
        results, errors, lock = [], collections.Counter(), threading.Lock()
        stop_at = time.monotonic() + args.seconds
        threads = [threading.Thread(target=client, args=(host, port, body, stop_at, results, errors, lock))
                   for _ in range(args.clients)]
        tic = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 130)
        elapsed = time.monotonic() - tic
        peak, rss_end = proc_status(proc.pid, "VmHWM"), proc_status(proc.pid, "VmRSS")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"{args.clients} clients, {elapsed:.0f} s, {args.max_tokens} tokens per answer, "
          f"model {args.model or 'default'}")
    print(f"requests answered 200: {len(results)} ({len(results) / elapsed:.1f}/s)")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"latency: p50 {percentile(results, 0.5):.2f} s, p95 {percentile(results, 0.95):.2f} s, "
          f"max {max(results, default=float('nan')):.2f} s")
    print(f"server RSS: {rss_start / 1024:.0f} MB after start, peak {peak / 1024:.0f} MB, "
          f"{rss_end / 1024:.0f} MB at the end")


if __name__ == "__main__":
    main()
