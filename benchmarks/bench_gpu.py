"""GPU smoke test and throughput of the ``standard`` preset in bf16 (run by bench_gpu.sh).

Trains ``standard`` (medium model) for a few hundred steps with bf16 autocast through gmmt's
own loop, then reports steps/s, points/s, the model FLOP/s estimated from the architecture,
the bf16 matmul peak measured on the same GPU, and MFU = achieved / peak. Validation, the
final checkpoint and the exported model are part of the run (so the smoke test covers them).

Usage: ``python benchmarks/bench_gpu.py [--steps 300] [--batch 64] [--json]``
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.presets import resolve_config
from gmmt.data.distributions import sample
from gmmt.training.experiment import ExperimentManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import flops_per_point


def bf16_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def set_sizes(config: ExperimentConfig, draws: int = 100_000) -> tuple[float, float]:
    """Mean N of a set, and mean N seen by a point (E[N^2] / E[N]: a point's attention cost
    grows with the size of its own set, and big sets hold more of the points)."""
    n = sample(config.data.sample_count_distribution, (draws,),
               torch.Generator().manual_seed(0), "cpu", integer=True).double()
    return float(n.mean()), float(n.square().mean() / n.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="sets per step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: needs a CUDA GPU (none is visible)")
    log_every = 25
    if args.steps < 2 * log_every:
        sys.exit(f"bench_gpu: --steps must be >= {2 * log_every} (rates are logged every "
                 f"{log_every} steps and the first window, with warm-up, is dropped)")
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve_config("standard", overrides=[
            "device.device=cuda", "device.mixed_precision=bf16", f"paths.base_dir={tmp}",
            "metadata.exp_name=gpu-bench", "training.num_epochs=1",
            f"training.steps_per_epoch={args.steps}", f"training.batch_size={args.batch}",
            "training.scheduler.warmup_steps=50", "validation.every_n_steps=0",
            "validation.num_sets=256", "training.checkpointing.every_n_steps=0",
            f"logging.log_every_n_steps={log_every}", "logging.wandb.enabled=false",
            "logging.progress_bar=false"]).config
        start = time.time()
        summary = ExperimentManager(config).run()
        wall = time.time() - start
        rows = [json.loads(line) for line in
                (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/points_per_s"] for r in rows if "train/points_per_s" in r][1:]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    points_per_s = statistics.median(rates)
    mean_n, n_per_point = set_sizes(config)
    achieved = points_per_s * flops_per_point(config, round(n_per_point))
    peak = bf16_matmul_peak()
    report = {
        "benchmark": "gpu", "date": date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "preset": "standard", "precision": "bf16", "steps": summary["steps"],
        "batch": args.batch, "points_per_s": round(points_per_s),
        "steps_per_s_derived": round(points_per_s / (args.batch * mean_n), 2),
        "model_tflops_per_s": round(achieved / 1e12, 2),
        "bf16_matmul_peak_tflops_per_s": round(peak / 1e12, 1),
        "mfu": round(achieved / peak, 4),
        "first_loss": losses[0], "last_loss": losses[-1],
        "val_mse_over_noise": summary["model"]["mse_over_noise"],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(report, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
