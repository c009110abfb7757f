"""Load benchmark for `fastsd serve`: N concurrent clients, a fixed number of requests,
with dynamic batching off (--max-batch 1) and on, in one run on one machine.

For each setting a fresh `fastsd serve` process is started on the model, warmed up, and
driven by CLIENTS threads (one keep-alive HTTP connection each) until REQUESTS requests
have been answered. Reported per setting: throughput (requests/s and images/s), latency
p50 / p90 / p99 (seconds, client side), the server's mean images per UNet batch, and how
many requests were lost (anything but a 200 with the images asked for). Writes
OUT/serve_load.json and OUT/serve_load.md; exits 1 if any request was lost.

    python benchmarks/serve_load.py --model synthetic:tiny --clients 16 --requests 192 --out DIR
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    conn.request("POST", "/v1/images/generations", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def scrape(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def start(args, port: int, max_batch: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastsd", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(max_batch), "--batch-window-ms", str(args.window_ms),
           "--max-queue", str(max(64, args.clients * 2))]
    if args.device:
        cmd += ["--device", args.device]
    if args.backend:
        cmd += ["--backend", args.backend]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fastsd serve exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("fastsd serve did not become healthy within 600 s")


def drive(args, port: int) -> dict:
    """CLIENTS threads share a counter of REQUESTS; each sends until it runs out."""
    body = {"prompt": "a lighthouse on a cliff at dusk", "num_inference_steps": args.steps, "n": 1}
    if args.size:
        body["size"] = args.size
    left = {"n": args.requests}
    lock = threading.Lock()
    latencies: list[float] = []
    lost: list[str] = []

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if left["n"] == 0:
                    return
                left["n"] -= 1
                i = left["n"]
            t = time.perf_counter()
            try:
                status, out = request(conn, dict(body, seed=i))
                ok = status == 200 and len(out.get("data", [])) == 1 and base64.b64decode(out["data"][0]["b64_json"])
            except (OSError, ValueError, http.client.HTTPException) as e:
                status, ok = repr(e), False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    lost.append(str(status))

    for _ in range(args.warmup):  # untimed: first calls allocate, load lazily, fill caches
        request(http.client.HTTPConnection("127.0.0.1", port, timeout=600), dict(body, seed=0))
    batches0, images0 = scrape(port, "fastsd_batch_size_count"), scrape(port, "fastsd_batch_size_sum")
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    batches = scrape(port, "fastsd_batch_size_count") - batches0
    images = scrape(port, "fastsd_batch_size_sum") - images0
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    return {"requests": args.requests, "answered": len(lat), "lost": len(lost), "lost_statuses": lost[:10],
            "wall_s": wall, "requests_per_s": len(lat) / wall, "images_per_s": len(lat) / wall,
            "p50_s": pct(50), "p90_s": pct(90), "p99_s": pct(99), "mean_s": statistics.fmean(lat) if lat else None,
            "mean_batch": images / batches if batches else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic:tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default=None, help="WxH (default: the model's)")
    p.add_argument("--max-batch", type=int, default=8, help="batching on: images per UNet batch")
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="serve-load")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, max_batch in (("batching off", 1), (f"batching on (max {args.max_batch})", args.max_batch)):
        port = free_port()
        proc = start(args, port, max_batch, out / f"server-batch{max_batch}.log")
        try:
            row = {"setting": label, "max_batch": max_batch, **drive(args, port)}
        finally:
            proc.terminate()
            proc.wait(120)
        rows.append(row)
        print(f"{label}: {row['requests_per_s']:.2f} req/s, p50 {row['p50_s']:.3f} s, p99 {row['p99_s']:.3f} s, "
              f"mean batch {row['mean_batch'] or 0:.2f}, lost {row['lost']}", file=sys.stderr)
    import torch

    meta = {"date": date.today().isoformat(), "model": args.model, "clients": args.clients,
            "requests": args.requests, "steps": args.steps, "size": args.size, "window_ms": args.window_ms,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": " ".join(["python", "benchmarks/serve_load.py", *(argv or sys.argv[1:])])}
    (out / "serve_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    base = rows[0]["requests_per_s"]
    where = meta["gpu"] or f"CPU ({meta['cores']} cores)"
    lines = [f"{meta['date']}, {where}, {args.model}, {args.clients} "
             f"clients, {args.requests} requests, {args.steps} steps: `{meta['command']}`", "",
             "| setting | req/s | vs off | p50 s | p90 s | p99 s | mean batch | lost |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['requests_per_s']:.2f} | {r['requests_per_s'] / base:.2f}x | "
                     f"{r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['p99_s']:.3f} | {r['mean_batch'] or 0:.2f} | "
                     f"{r['lost']} |")
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
