"""Batched torch EM against a loop of scikit-learn GaussianMixture fits.

Both fit a spherical GMM with the true K to every set of one batch: ``--sets`` sets of
``--points`` points drawn from a data preset (default ``simple``: K 2-4, 12-17 dB, 2-D), one
restart each, the same ``max_iter`` and ``tol`` (EMConfig defaults: 100, 1e-6), k-means++
seeding on both sides (scikit-learn's ``init_params="k-means++"``). Reported:

* ``torch_s``: wall time of one :func:`gmmt.evaluation.baselines.fit_em` call on the whole
  batch (best of ``--repeats``, after a warm-up call), ``--threads`` torch threads;
* ``sklearn_s``: wall time of the loop of per-set ``GaussianMixture(...).fit`` calls (best of
  ``--sklearn-repeats``), BLAS and OpenMP held to one thread (threadpoolctl when installed,
  else OMP_NUM_THREADS=1 set before numpy loads);
* ``speedup`` = sklearn_s / torch_s (goal >= 20 at 1 torch thread);
* the centre MSE per coordinate of each one's posterior-mean prediction, with the oracle's
  for reference, so the speed is not bought with worse fits.

Usage: ``python benchmarks/bench_em.py [--json] [--sets 512] [--points 200] [--threads 1]``
"""

import argparse
import json
import os
import time
import warnings
from contextlib import nullcontext
from datetime import date

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy / sklearn load (fallback)

import numpy as np
import sklearn
import torch
from common import DefaultsHelpFormatter, machine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from gmmt.config.data import DistributionSpec
from gmmt.config.presets import resolve_config
from gmmt.config.validation import EMConfig
from gmmt.data.gmm import validation_bank
from gmmt.evaluation.baselines import fit_em, oracle_posterior_mean
from gmmt.evaluation.metrics import centre_mse_per_set

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
    threadpool_limits = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--data", default="simple", help="data preset (default simple)")
    parser.add_argument("--sets", type=int, default=512)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device for the batched EM")
    parser.add_argument("--repeats", type=int, default=5, help="timed torch calls")
    parser.add_argument("--sklearn-repeats", type=int, default=2, help="timed sklearn loops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = resolve_config("quick_test", data=args.data).config.data
    data.sample_count_distribution = DistributionSpec(type="fixed", value=args.points)
    data.ragged = False
    batch = validation_bank(data, args.seed, args.sets, args.sets, dtype=torch.float64)[0]
    em = EMConfig(n_init=1)

    # --- torch: one batched call ---------------------------------------------------------
    on_device = batch.to(device)

    def run_torch() -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        fit = fit_em(on_device.points, on_device.k, None, n_init=em.n_init,
                     max_iter=em.max_iter, tol=em.tol, generator=generator)
        return fit.result().centres

    run_torch()  # warm-up: allocator, kernels
    torch_times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        pred_torch = run_torch()
        _sync(device)
        torch_times.append(time.perf_counter() - start)

    # --- scikit-learn: a loop of fits ----------------------------------------------------
    points = batch.points.numpy()
    ks = batch.k.tolist()

    def run_sklearn() -> np.ndarray:
        out = np.empty_like(points)
        for i, (x, k) in enumerate(zip(points, ks)):
            gm = GaussianMixture(k, covariance_type="spherical", n_init=em.n_init,
                                 max_iter=em.max_iter, tol=em.tol, init_params="k-means++",
                                 random_state=args.seed + i)
            gm.fit(x)
            out[i] = gm.predict_proba(x) @ gm.means_
        return out

    limit = threadpool_limits(1) if threadpool_limits is not None else nullcontext()
    sklearn_times = []
    with limit, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(args.sklearn_repeats):
            start = time.perf_counter()
            pred_sklearn = run_sklearn()
            sklearn_times.append(time.perf_counter() - start)

    target = batch.target
    oracle = oracle_posterior_mean(batch.points, batch.centres, batch.weights, batch.sigma)
    report = {
        "benchmark": "em", "data": args.data, "sets": args.sets, "points": args.points,
        "k": list(map(round, data.cluster_params.support())),
        "n_init": em.n_init, "max_iter": em.max_iter, "tol": em.tol,
        "torch_s": min(torch_times), "torch_s_all": torch_times,
        "sklearn_s": min(sklearn_times), "sklearn_s_all": sklearn_times,
        "speedup": min(sklearn_times) / min(torch_times),
        "mse_torch": float(centre_mse_per_set(pred_torch.cpu(), target).mean()),
        "mse_sklearn": float(centre_mse_per_set(torch.from_numpy(pred_sklearn), target).mean()),
        "mse_oracle": float(centre_mse_per_set(oracle.centres, target).mean()),
        "torch_threads": args.threads, "sklearn_threads": 1, "device": str(device),
        "machine": machine() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "sklearn": sklearn.__version__,
        "threadpoolctl": threadpool_limits is not None, "date": date.today().isoformat(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.sets} sets x {args.points} points, K {report['k'][0]}-{report['k'][1]}, "
          f"n_init {em.n_init}, max_iter {em.max_iter}, tol {em.tol:g}")
    print(f"torch EM   ({device}, {args.threads} thread(s)): {report['torch_s']:.3f} s  "
          f"MSE {report['mse_torch']:.6f}")
    print(f"sklearn GM (loop, 1 thread):          {report['sklearn_s']:.3f} s  "
          f"MSE {report['mse_sklearn']:.6f}")
    print(f"speedup {report['speedup']:.1f}x (goal >= 20x); oracle MSE {report['mse_oracle']:.6f}")


if __name__ == "__main__":
    main()
