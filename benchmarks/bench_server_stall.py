"""Does a running stream stall while the server admits a request with a large image?

    python benchmarks/bench_server_stall.py [--model FOLDER] [--prefill-step-size 512]

Starts `serve` in this process on 127.0.0.1 (by default on a random Qwen2-VL
written here: a 12-block NaViT tower of width 64 before a 4-layer decoder of
width 128, the processor's pixel budget 28*28*1024, so a 1400x1400 image is
1024 vision tokens). Client A streams a long answer; once it has 20 tokens,
client B sends one 1400x1400 image and streams its answer. Reported: B's time
to first token, A's longest gap between two chunks while B was admitted (from
B's send to B's first token), A's median gap before B came, and the ratio
gap / TTFT (the target is at most 0.35; a server that encodes and prefills a
newcomer in one go gives about 1.0).
"""

import argparse
import base64
import http.client
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_model(folder: Path) -> Path:
    from convert import write_hf_release as rc

    rc.PRESETS["qwen2-vl-stall"] = dict(
        family="qwen2_vl",
        vision=dict(depth=12, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu"),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        mrope_section=[4, 6, 6], tie_word_embeddings=False,
    )
    path = rc.write_checkpoint(folder, "qwen2-vl-stall")
    config = rc.qwen2_vl_preprocessor_config(max_pixels=28 * 28 * 1024)
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    return path


def png_url(side: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stream(address, content, max_tokens: int, times: list, stop: threading.Event = None) -> None:
    """Stream a chat completion; the arrival time of each content chunk goes to `times`."""
    conn = http.client.HTTPConnection(*address, timeout=600)
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    for line in response:
        if stop is not None and stop.is_set():
            break
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: the random Qwen2-VL above)")
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--side", type=int, default=1400, help="the newcomer's image side in pixels")
    args = p.parse_args()

    from mlx_vlm_native.server import Limits, make_server
    from mlx_vlm_native.utils import load

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load(args.model or str(write_model(Path(tmp))))
    import inspect

    chunked = "prefill_step_size" in inspect.signature(make_server).parameters  # not in older servers
    server = make_server(model, processor, "bench", "127.0.0.1", 0, Limits(max_image_pixels=4_000_000),
                         **({"prefill_step_size": args.prefill_step_size} if chunked else {}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.server_address[:2]
    warm_up = png_url(args.side, 1)  # another image: B must not find its features or KV cache kept
    stream(address, [{"type": "image_url", "image_url": {"url": warm_up}}, {"type": "text", "text": "Warm up."}],
           2, [])
    image = png_url(args.side, 0)

    a_times, b_times, stop = [], [], threading.Event()
    a = threading.Thread(target=stream, args=(address, "Tell me a long story.", 4000, a_times, stop))
    a.start()
    while len(a_times) < 20:
        time.sleep(0.005)
    b_sent = time.perf_counter()
    stream(address, [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}],
           4, b_times)
    time.sleep(0.2)
    stop.set()
    a.join(60)
    server.shutdown()
    server.server_close()

    ttft = b_times[0] - b_sent
    before = [t1 - t0 for t0, t1 in zip(a_times, a_times[1:]) if t1 <= b_sent]
    window = [t for t in a_times if b_sent - 1.0 <= t <= b_times[0] + 0.5]
    during = [t1 - t0 for t0, t1 in zip(window, window[1:]) if t1 > b_sent and t0 < b_times[0]]
    if not during:
        sys.exit("stream A ended before B's first token; no gap measured")
    gap = max(during)
    print(f"newcomer: {args.side}x{args.side} image, prefill step {args.prefill_step_size}")
    print(f"B time to first token: {ttft:.3f} s")
    print(f"A median gap before B: {statistics.median(before) * 1000:.1f} ms; "
          f"A tokens while B was admitted: {len(during)}")
    print(f"A longest gap while B was admitted: {gap:.3f} s")
    print(f"ratio longest gap / TTFT: {gap / ttft:.3f} (target <= 0.35)")


if __name__ == "__main__":
    from mlx_vlm_native.cli import ensure_fast_blas

    ensure_fast_blas()
    main()
