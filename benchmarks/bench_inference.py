"""Inference: a trained model's forward pass against the classical answers, per set.

On one batch of held-out sets (``--sets`` sets of ``--points`` points from the model's own data
preset) it times, side by side in one process:

* ``model``: the trained GMM transformer, batched forward (no grad, fp32);
* ``oracle``: the posterior mean with the true parameters (unattainable from the points);
* ``em_torch`` / ``kmeans_torch``: gmmt's batched torch EM / k-means with the true K;
* ``em_sklearn``: scikit-learn ``GaussianMixture(covariance_type="spherical")`` run the way a
  user would: a Python loop of fits, one per set, BLAS held to one thread.

For each: sets/s, points/s, its centre MSE per coordinate and MSE/σ², and
``speedup_vs_sklearn``. Restart counts follow the run's EM config (``--n-init`` overrides).

Usage: ``python benchmarks/bench_inference.py RUN_DIR [--sets 512] [--points 300] [--json]``
(RUN_DIR: a finished run, e.g. of the cpu_reference preset)
"""

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # sklearn's BLAS (before numpy loads)

import numpy as np
import torch
from common import machine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from gmmt import load_model
from gmmt.config.data import DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.data.gmm import GMMSampler
from gmmt.evaluation.baselines import fit_em, fit_kmeans, oracle_posterior_mean
from gmmt.evaluation.metrics import centre_mse_per_set

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - ships with scikit-learn
    threadpool_limits = None


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (its final/ model is used)")
    parser.add_argument("--sets", type=int, default=512)
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--n-init", type=int, help="EM / k-means restarts (default: run's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = args.run / "final" if (args.run / "final").is_dir() else args.run
    config = ExperimentConfig.load(folder / "config.json")
    model = load_model(folder)
    data = config.data
    data.sample_count_distribution = DistributionSpec(type="fixed", value=args.points)
    data.ragged = False
    batch = GMMSampler(data, config.device.seed + 7).batch(0, args.sets, stream="inference")
    n_init = args.n_init or config.validation.em.n_init
    em = config.validation.em

    def model_forward() -> torch.Tensor:
        with torch.no_grad():
            return model(batch.points, batch.mask, batch.snr_db)

    def em_torch() -> torch.Tensor:
        fit = fit_em(batch.points, batch.k, n_init=n_init, max_iter=em.max_iter, tol=em.tol,
                     generator=torch.Generator().manual_seed(0))
        return fit.result().centres

    def kmeans_torch() -> torch.Tensor:
        fit = fit_kmeans(batch.points, batch.k, n_init=n_init, max_iter=em.max_iter,
                         generator=torch.Generator().manual_seed(0))
        return fit.result().centres

    def oracle() -> torch.Tensor:
        return oracle_posterior_mean(batch.points, batch.centres, batch.weights,
                                     batch.sigma).centres

    points_np = batch.points.double().numpy()
    ks = batch.k.tolist()

    def em_sklearn() -> torch.Tensor:
        out = np.empty_like(points_np)
        for i, (x, k) in enumerate(zip(points_np, ks)):
            gm = GaussianMixture(k, covariance_type="spherical", n_init=n_init,
                                 max_iter=em.max_iter, tol=em.tol, init_params="k-means++",
                                 random_state=i).fit(x)
            out[i] = gm.predict_proba(x) @ gm.means_
        return torch.from_numpy(out)

    methods = {"model": model_forward, "oracle": oracle, "em_torch": em_torch,
               "kmeans_torch": kmeans_torch, "em_sklearn": em_sklearn}
    sigma2 = batch.sigma.double().square()
    rows = {}
    for name, fn in methods.items():
        sklearn = name == "em_sklearn"
        limit = threadpool_limits(1) if sklearn and threadpool_limits else nullcontext()
        with limit, warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            seconds, pred = best_time(fn, 1 if sklearn else args.repeats)
        mse = centre_mse_per_set(pred, batch.target)
        rows[name] = {"seconds": round(seconds, 4), "sets_per_s": round(args.sets / seconds, 1),
                      "points_per_s": round(args.sets * args.points / seconds),
                      "mse": float(mse.mean()), "mse_over_noise": float((mse / sigma2).mean())}
    for row in rows.values():
        row["speedup_vs_sklearn"] = round(rows["em_sklearn"]["seconds"] / row["seconds"], 2)
    report = {"benchmark": "inference", "date": date.today().isoformat(),
              "machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "run": str(args.run),
              "sets": args.sets, "points": args.points, "n_init": n_init, "methods": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.sets} sets x {args.points} points, torch {args.threads} thread(s), "
          f"EM/k-means n_init={n_init}")
    for name, r in rows.items():
        print(f"{name:>13}: {r['sets_per_s']:>9.1f} sets/s  {r['points_per_s']:>11,} pts/s  "
              f"MSE/σ² {r['mse_over_noise']:.4f}  x{r['speedup_vs_sklearn']} vs sklearn")


if __name__ == "__main__":
    main()
