"""Time and peak memory of one training step versus the number of points N, for softmax and
random-feature attention, with the fitted growth exponent (time ~ N^alpha).

Each (attention, N) point runs in a fresh subprocess so its peak resident memory is its own:
the child reports ru_maxrss after the timed steps minus its resident size before the first
step. Softmax attention is O(N^2) in compute; on CPU, torch's SDPA kernel is memory-efficient
(it never materialises the N x N matrix), so its memory can grow far more slowly than N^2.

Usage: ``python benchmarks/bench_scaling.py [--json] [--model small] [--sizes 100 300 ...]``
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from datetime import date

from common import DefaultsHelpFormatter, machine

CHILD = r"""
import json, resource, sys, time
import torch
from gmmt.config.presets import resolve_config
from gmmt.data.gmm import GMMSampler
from gmmt.model.build import build_model
from gmmt.training.losses import compute_loss
from gmmt.training.optim import build_optimizer

model_name, attention, n, batch, repeats, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
cfg = resolve_config("quick_test", model=model_name, overrides=[
    f"model.transformer.attention.type={attention}",
    f'data.sample_count_distribution={{"type": "fixed", "value": {n}}}']).config
model = build_model(cfg.model, cfg.data.dim, cfg.data.max_clusters)
opt = build_optimizer(model, cfg.training.optimizer)
batch = GMMSampler(cfg.data, 0).batch(0, int(batch))

def step():
    loss = compute_loss(cfg.training.loss, model(batch.points, batch.mask, batch.snr_db), batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

before = rss_kib()
step()  # warm-up (allocates optimizer state)
times = []
for _ in range(int(repeats)):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"times": times, "peak_mib": (peak - before) / 1024}))
"""


def measure(model: str, attention: str, n: int, batch: int, repeats: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, attention, str(n), str(batch),
                          str(repeats), str(threads)], capture_output=True, text=True,
                         check=True, timeout=1800)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"n": n, "step_s": statistics.median(result["times"]),
            "peak_step_mib": round(result["peak_mib"], 1)}


def growth_exponent(rows: list[dict], key: str) -> float:
    """Least-squares slope of log(key) against log(N)."""
    xs = [math.log(r["n"]) for r in rows]
    ys = [math.log(max(r[key], 1e-9)) for r in rows]
    if len(rows) < 2:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default="small", help="model preset (default: small)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 2000, 5000])
    parser.add_argument("--batch", type=int, default=4, help="sets per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS",
                                                                          "2")))
    args = parser.parse_args()
    report = {"benchmark": "scaling", "date": date.today().isoformat(),
              "machine": machine(),
              "model": args.model, "batch": args.batch, "threads": args.threads,
              "attention": {}}
    for attention in ("softmax", "random_feature"):
        rows = [measure(args.model, attention, n, args.batch, args.repeats, args.threads)
                for n in args.sizes]
        report["attention"][attention] = {
            "rows": rows,
            "time_exponent": round(growth_exponent(rows, "step_s"), 2),
            # The large-N end, where attention's quadratic term should dominate.
            "time_exponent_upper_half": round(growth_exponent(rows[(len(rows) - 1) // 2:],
                                                              "step_s"), 2),
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for attention, part in report["attention"].items():
        print(f"{attention}: time ~ N^{part['time_exponent']} "
              f"(upper half N^{part['time_exponent_upper_half']})")
        for r in part["rows"]:
            print(f"  N={r['n']:>6}: {r['step_s'] * 1000:9.1f} ms/step, "
                  f"+{r['peak_step_mib']} MiB peak")


if __name__ == "__main__":
    main()
