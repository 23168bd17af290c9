"""The hostile-input probes of issue 34 against a real `serve` subprocess (loopback only).

    python benchmarks/probe_hostile_server.py

Starts the server on the embedded default model, runs each probe in turn and
prints one line per probe: what the attacker or careless client sent, the
status the others got and how long they waited, and the server's RSS (VmRSS)
and peak RSS (VmHWM) after the probe.
"""

import base64
import http.client
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_server_load import proc_status, start_server  # noqa: E402


def call(host, port, body=None, path="/v1/chat/completions", timeout=120):
    tic = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST" if body is not None else "GET", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status, time.perf_counter() - tic, data
    except OSError as e:
        return type(e).__name__, time.perf_counter() - tic, b""
    finally:
        conn.close()


def hello(text="hi", **fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4, **fields}).encode()


def memory(pid) -> str:
    return f"RSS {proc_status(pid, 'VmRSS') / 1024:.0f} MB, peak {proc_status(pid, 'VmHWM') / 1024:.0f} MB"


def report(name, pid, **figures):
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()) + f"; {memory(pid)}", flush=True)


def slow_sockets(host, port, data: bytes, n=300):
    sockets = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(data)
        sockets.append(s)
    return sockets


def png_36mp() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def concurrently(n, fn):
    results = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn())) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    proc, host, port = start_server(None, 8)
    pid = proc.pid
    try:
        call(host, port, hello())
        report("baseline", pid, completion=f"{call(host, port, hello())[:2]}")

        stalled_body = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mess"
        for name, data in [("300 slow-header sockets", b"POST /v1/chat/compl"),
                           ("300 sockets with 6 of 1000 body bytes", stalled_body)]:
            sockets = slow_sockets(host, port, data)
            status, seconds, _ = call(host, port, path="/health")
            answer = call(host, port, hello())
            report(name, pid, health=f"{status} in {seconds:.2f} s", completion=f"{answer[0]} in {answer[1]:.2f} s")
            for s in sockets:
                s.close()

        big = hello("a " * 9_500_000)
        results = concurrently(2, lambda: call(host, port, big))
        normal = call(host, port, hello())
        report("19 MB message (x2 at once)", pid, replies=[f"{r[0]} in {r[1]:.2f} s" for r in results],
               then_completion=f"{normal[0]} in {normal[1]:.2f} s")

        junk = b'{"messages": [{"role": "user", "content": "hi"}], "junk": [' + b"{}," * 6_600_000 + b"{}]}"
        results = concurrently(8, lambda: call(host, port, junk))
        report("6.6M empty objects in a 20 MB body (x8 at once)", pid,
               replies=sorted({f"{r[0]}" for r in results}), slowest=f"{max(r[1] for r in results):.2f} s")

        url = png_36mp()
        body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 1}).encode()
        tic = time.perf_counter()
        results = concurrently(64, lambda: call(host, port, body, timeout=600))
        counts = {}
        for r in results:
            counts[r[0]] = counts.get(r[0], 0) + 1
        report(f"64 concurrent 36 MP PNGs ({len(body) // 1000} KB requests)", pid, replies=counts,
               seconds=f"{time.perf_counter() - tic:.1f}")

        status, _, data = call(host, port, b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}')
        report("lone surrogate", pid, reply=f"{status} {json.loads(data)['error']['message'][:70]!r}")

        greedy = json.loads(call(host, port, hello(temperature=0))[2])["choices"][0]["message"]["content"]
        tiny = json.loads(call(host, port, hello(temperature=1e-300))[2])["choices"][0]["message"]["content"]
        report("temperature 1e-300", pid, same_as_greedy=tiny == greedy)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
