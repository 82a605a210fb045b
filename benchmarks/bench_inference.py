"""Inference: a trained model's forward pass against every yardstick, per set.

On one batch of held-out sets (``--sets`` sets of ``--points`` points from the model's own data
preset) it times, side by side in one process:

* ``model``: the trained GMM transformer, batched forward (no grad, fp32), and
  ``model_grouped``: the same plus the grouping of its predictions (its own clustering and K);
* ``refined`` and ``refined_told_k``: the forward pass plus at most ``--refine`` tied-EM
  iterations from its clusters (:mod:`gmmt.evaluation.refine`), not told K (its count head's K,
  else its grouping's) and told the true K: the cost per set of amortized + refined inference;
* the torch baselines of ``gmmt.evaluation.baselines``, each with what it is told: ``oracle``
  (true parameters: unattainable), ``bayes`` (K, sigma and the prior: the floor),
  ``bayes_unknown_k`` (sigma and the prior: the floor not told K), ``em_tied``, ``em``,
  ``kmeans`` (the true K), ``em_bic`` (K_max; chooses K by BIC), ``identity``;
* ``em_sklearn``: scikit-learn ``GaussianMixture(covariance_type="spherical")`` with the true K,
  and ``dpgmm_sklearn``: ``BayesianGaussianMixture`` with a Dirichlet-process prior over up to
  K_max components (it chooses K: the components that own points), each run the way a user
  would: a Python loop of fits, one per set, BLAS held to one thread.

For each: sets/s, points/s, its centre MSE per coordinate, MSE/σ², MSE over the Bayes floor's,
K accuracy where the method chooses K, and ``speedup_vs_sklearn``. Restart counts follow the
run's EM config (``--n-init`` overrides).

Usage: ``python benchmarks/bench_inference.py RUN_DIR [--sets 512] [--points 300] [--refine 20]
[--json]``
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
from common import DefaultsHelpFormatter, machine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

from gmmt import load_model
from gmmt.config.data import DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.data.gmm import GMMSampler
from gmmt.evaluation.baselines import run_baseline
from gmmt.evaluation.grouping import group_predictions
from gmmt.evaluation.metrics import centre_mse_per_set
from gmmt.evaluation.refine import refine, refine_unknown_k, run_model

# Methods too slow to repeat: timed once.
ONCE = ("bayes", "bayes_unknown_k", "em_sklearn", "dpgmm_sklearn")
TORCH_BASELINES = ("oracle", "bayes", "bayes_unknown_k", "em_tied", "em", "em_bic", "kmeans",
                   "identity")
Answer = tuple[torch.Tensor, torch.Tensor | None]  # centres [b, n, d], K chosen [b] or None

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - ships with scikit-learn
    threadpool_limits = None


def best_time(fn: Callable[[], Answer], repeats: int) -> tuple[float, Answer]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (its final/ model is used)")
    parser.add_argument("--sets", type=int, default=512)
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--n-init", type=int, help="EM / k-means restarts (default: run's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refine", type=int, default=20, metavar="ITERATIONS",
                        help="EM iterations at most of the refined model")
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
    if args.n_init:
        em.n_init = args.n_init

    def model_forward() -> Answer:
        with torch.no_grad():
            return model(batch.points, batch.mask, batch.snr_db), None

    def model_grouped() -> Answer:
        centres = model_forward()[0]
        return centres, group_predictions(centres, batch.points, batch.mask).k_hat

    def refined(told_k: bool) -> Callable[[], Answer]:
        def fit() -> Answer:
            with torch.no_grad():
                pred, probs = run_model(model, batch.points, batch.mask, batch.snr_db)
            generator = torch.Generator().manual_seed(0)
            if told_k:
                return refine(batch.points, pred, batch.k, batch.mask, iterations=args.refine,
                              generator=generator).centres, None
            result = refine_unknown_k(batch.points, pred, probs, batch.mask,
                                      iterations=args.refine, generator=generator)
            return result.centres, result.k_hat

        return fit

    def torch_baseline(name: str) -> Callable[[], Answer]:
        def fit() -> Answer:
            result = run_baseline(name, batch, em, torch.Generator().manual_seed(0),
                                  config.validation.bayes)
            return result.centres, result.k_hat

        return fit

    points_np = batch.points.double().numpy()
    ks = batch.k.tolist()
    k_max = batch.centres.shape[1]

    def em_sklearn() -> Answer:
        out = np.empty_like(points_np)
        for i, (x, k) in enumerate(zip(points_np, ks)):
            gm = GaussianMixture(k, covariance_type="spherical", n_init=n_init,
                                 max_iter=em.max_iter, tol=em.tol, init_params="k-means++",
                                 random_state=i).fit(x)
            out[i] = gm.predict_proba(x) @ gm.means_
        return torch.from_numpy(out), None

    def dpgmm_sklearn() -> Answer:
        out, chosen = np.empty_like(points_np), []
        for i, x in enumerate(points_np):
            gm = BayesianGaussianMixture(
                n_components=k_max, covariance_type="spherical",
                weight_concentration_prior_type="dirichlet_process", n_init=n_init,
                max_iter=em.max_iter, tol=em.tol, init_params="k-means++", random_state=i).fit(x)
            out[i] = gm.predict_proba(x) @ gm.means_
            chosen.append(len(np.unique(gm.predict(x))))
        return torch.from_numpy(out), torch.tensor(chosen)

    methods: dict[str, Callable[[], Answer]] = {"model": model_forward,
                                                "model_grouped": model_grouped,
                                                "refined": refined(False),
                                                "refined_told_k": refined(True)}
    methods |= {name: torch_baseline(name) for name in TORCH_BASELINES}
    methods |= {"em_sklearn": em_sklearn, "dpgmm_sklearn": dpgmm_sklearn}
    sigma2 = batch.sigma.double().square()
    rows = {}
    for name, fn in methods.items():
        sklearn = name.endswith("_sklearn")
        limit = threadpool_limits(1) if sklearn and threadpool_limits else nullcontext()
        with limit, warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            seconds, (pred, k_hat) = best_time(fn, 1 if name in ONCE else args.repeats)
        mse = centre_mse_per_set(pred, batch.target)
        rows[name] = {"seconds": round(seconds, 4), "sets_per_s": round(args.sets / seconds, 1),
                      "points_per_s": round(args.sets * args.points / seconds),
                      "mse": float(mse.mean()), "mse_over_noise": float((mse / sigma2).mean()),
                      "k_accuracy": None if k_hat is None else
                      float((k_hat.cpu() == batch.k.cpu()).double().mean())}
    for row in rows.values():
        row["speedup_vs_sklearn"] = round(rows["em_sklearn"]["seconds"] / row["seconds"], 2)
        row["excess_over_bayes"] = row["mse"] / rows["bayes"]["mse"] - 1
    report = {"benchmark": "inference", "date": date.today().isoformat(),
              "machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "run": str(args.run),
              "sets": args.sets, "points": args.points, "n_init": n_init,
              "refine_iterations": args.refine, "methods": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.sets} sets x {args.points} points, torch {args.threads} thread(s), "
          f"EM/k-means n_init={n_init}")
    for name, r in rows.items():
        k = "" if r["k_accuracy"] is None else f"  K right {r['k_accuracy']:.3f}"
        print(f"{name:>13}: {r['sets_per_s']:>9.1f} sets/s  {r['points_per_s']:>11,} pts/s  "
              f"MSE/σ² {r['mse_over_noise']:.4f}  {100 * r['excess_over_bayes']:+6.1f} % over "
              f"the floor  x{r['speedup_vs_sklearn']} vs sklearn{k}")


if __name__ == "__main__":
    main()
