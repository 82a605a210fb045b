"""Training throughput: gmmt's Accelerate loop against a plain PyTorch loop, side by side.

For each case (model preset, batch, N) both loops train the same model on the same batches
with the same optimizer and loss, alternating in one process (the machine is shared and noisy):

* ``gmmt``: ``ExperimentManager(...).run()`` with validation, checkpoints and trackers only at
  the end; throughput is read from its logged ``train/points_per_s`` windows (the first window,
  which holds warm-up, is dropped);
* ``plain``: a hand-written loop: sample -> forward -> loss -> backward -> clip -> AdamW step.

Reports steps/s and points/s of each, ``overhead_ratio`` = gmmt / plain (goal >= 0.95), the
model FLOP/s estimated from the architecture, and the matmul peak FLOP/s measured in the same
run (so ``mfu`` = achieved / peak).

Usage: ``python benchmarks/bench_train.py [--json] [--cases tiny small] [--threads 2]``
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from common import DefaultsHelpFormatter, machine

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.presets import resolve_config
from gmmt.data.gmm import GMMSampler
from gmmt.model.build import build_model, count_parameters
from gmmt.training.experiment import ExperimentManager
from gmmt.training.losses import compute_loss
from gmmt.training.optim import build_optimizer

# name -> (experiment preset, model preset, sets per step, points per set, timed steps)
CASES: dict[str, tuple[str, str, int, int, int]] = {
    "tiny": ("quick_test", "tiny", 16, 300, 60),
    "small": ("quick_test", "small", 32, 300, 30),
    "medium": ("standard", "medium", 8, 500, 8),
    # cpu_reference's own steps: its curriculum's small sets, where fixed costs weigh most
    "reference_n100": ("cpu_reference", "small", 32, 100, 100),
}
LOG_EVERY = 5


def case_config(name: str, base_dir: Path) -> ExperimentConfig:
    experiment, model, batch, points, steps = CASES[name]
    return resolve_config(experiment, model=model, overrides=[
        "device.device=cpu", "device.mixed_precision=no", f"paths.base_dir={base_dir}",
        f"metadata.exp_name=bench-{name}", "training.num_epochs=1",
        f"training.steps_per_epoch={steps + LOG_EVERY}", f"training.batch_size={batch}",
        "training.gradient_accumulation_steps=1", "training.scheduler.warmup_steps=0",
        "training.curriculum.steps=0",
        f'data.sample_count_distribution={{"type": "fixed", "value": {points}}}',
        "validation.every_n_steps=0", "validation.num_sets=8", "validation.batch_size=8",
        "validation.baselines=[]", "validation.metrics=[\"mse\"]",
        "validation.visualization.enabled=false",
        "training.checkpointing.every_n_steps=0", "training.ema.enabled=false",
        f"logging.log_every_n_steps={LOG_EVERY}", "logging.progress_bar=false",
        "logging.wandb.enabled=false", "logging.console_level=warning"]).config


def gmmt_points_per_s(config: ExperimentConfig) -> float:
    summary = ExperimentManager(config).run()
    rows = [json.loads(line) for line in
            (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/points_per_s"] for r in rows if "train/points_per_s" in r]
    return statistics.median(rates[1:])  # the first window holds warm-up


def plain_points_per_s(config: ExperimentConfig) -> float:
    torch.manual_seed(config.device.seed)
    model = build_model(config.model, config.data.dim, config.data.max_clusters)
    optimizer = build_optimizer(model, config.training.optimizer)
    sampler = GMMSampler(config.data, config.device.seed)
    t = config.training
    points, start = 0, 0.0
    for step in range(t.total_steps):
        if step == LOG_EVERY:  # same warm-up exclusion as the gmmt side
            points, start = 0, time.perf_counter()
        batch = sampler.batch(step, t.batch_size)
        pred = model(batch.points, batch.mask, batch.snr_db)
        loss = compute_loss(t.loss, pred, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        points += batch.points.shape[0] * batch.points.shape[1]
    return points / (time.perf_counter() - start)


def flops_per_point(config: ExperimentConfig, n: int) -> float:
    """Training FLOPs per point per step: 3x the forward's matmul FLOPs (backward ~ 2x)."""
    tr = config.model.transformer
    width = tr.hidden_dim
    per_block = 2 * (4 * width * width + 2 * tr.ff_multiplier * width * width) + 4 * n * width
    return 3.0 * per_block * tr.effective_depth


def matmul_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per case")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS",
                                                                          "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            config = case_config(name, Path(tmp))
            gmmt_rates, plain_rates = [], []
            for _ in range(args.repeats):
                gmmt_rates.append(gmmt_points_per_s(config))
                plain_rates.append(plain_points_per_s(config))
            gmmt_rate, plain_rate = statistics.median(gmmt_rates), statistics.median(plain_rates)
            _, model_name, batch, n, _ = CASES[name]
            achieved = gmmt_rate * flops_per_point(config, n)
            results.append({
                "case": name, "model": model_name, "batch": batch, "points_per_set": n,
                "parameters": count_parameters(build_model(config.model, config.data.dim,
                                                           config.data.max_clusters)),
                "gmmt_points_per_s": round(gmmt_rate), "plain_points_per_s": round(plain_rate),
                "gmmt_steps_per_s": round(gmmt_rate / (batch * n), 3),
                "plain_steps_per_s": round(plain_rate / (batch * n), 3),
                "overhead_ratio": round(gmmt_rate / plain_rate, 3),
                "model_gflops_per_s": round(achieved / 1e9, 2),
                "mfu": round(achieved / peak, 3),
                "rounds": {"gmmt": [round(r) for r in gmmt_rates],
                           "plain": [round(r) for r in plain_rates]},
            })
    report = {"benchmark": "train", "date": date.today().isoformat(),
              "machine": machine(),
              "torch": torch.__version__, "threads": args.threads,
              "matmul_peak_gflops_per_s": round(peak / 1e9, 2), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"matmul peak: {report['matmul_peak_gflops_per_s']} GFLOP/s ({args.threads} threads)")
    for r in results:
        print(f"{r['case']:>7}: gmmt {r['gmmt_points_per_s']:>9,} pts/s  plain "
              f"{r['plain_points_per_s']:>9,} pts/s  ratio {r['overhead_ratio']:.3f}  "
              f"{r['model_gflops_per_s']} GFLOP/s  MFU {r['mfu']:.1%}")


if __name__ == "__main__":
    main()
