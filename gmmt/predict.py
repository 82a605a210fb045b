"""Command line: ``python -m gmmt.predict RUN_DIR points.csv|points.npy`` applies a model.

The argparse front of :func:`gmmt.inference.predict`: reads the points (CSV, one point per row,
an optional header row of names; or a 2-D ``.npy`` array), writes one CSV row per point (its
coordinates x0.., its predicted centre c0.., its group label) to ``--out`` or stdout,
optionally a PNG of the groups (``--plot``), and prints the number of groups to stderr. Bad
inputs print one line and exit with code 2, before anything is written; each output file is
written under a temporary name and renamed when complete.

The module is also callable: ``gmmt.predict(model_or_run_dir, points)`` is
:func:`gmmt.inference.predict` (see :class:`_CallableModule`).
"""

import argparse
import csv
import io
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gmmt.config.fields import ConfigError
from gmmt.inference import Prediction
from gmmt.inference import predict as predict_points

EXIT_USAGE = 2
PROG = "gmmt.predict"

EPILOG = """\
examples:
  python -m gmmt.predict runs/quick_test-20250101-120000 points.csv
  python -m gmmt.predict runs/my_run/best points.npy --out groups.csv --plot groups.png
  python -m gmmt.predict runs/my_run points.csv --refine 20
"""


class InputError(Exception):
    """A bad input file, reported as one line with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gmmt.predict", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Apply a trained gmmt model to your points: every point's predicted "
                    "centre and the group it belongs to (K is not needed).")
    p.add_argument("model", metavar="RUN_DIR",
                   help="a run folder (its final/ is used) or a final/ or best/ folder")
    p.add_argument("points", metavar="POINTS",
                   help="a .csv file (one point per row, comma-separated numbers, an optional "
                        "header row) or a .npy file holding a 2-D float array")
    p.add_argument("--out", metavar="FILE",
                   help="CSV to write: x0.., c0.. (predicted centre), label per point "
                        "(default: stdout)")
    p.add_argument("--plot", metavar="FILE", help="PNG of the points coloured by group, with "
                                                  "each group's centre marked")
    p.add_argument("--bandwidth", type=float, default=0.5, metavar="B",
                   help="grouping kernel width in units of the estimated noise (default: 0.5)")
    p.add_argument("--refine", type=int, metavar="ITERATIONS",
                   help="refine the centres by at most ITERATIONS tied-variance EM iterations "
                        "started from the model's clusters and K; 0: the model's raw "
                        "predictions (default: as the run's model.refinement says)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, cuda:N or auto")
    return p


def _read_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text CSV file") from None
    rows = [(i, row) for i, row in enumerate(csv.reader(io.StringIO(text)), start=1)
            if any(cell.strip() for cell in row)]
    values = []
    for position, (line, row) in enumerate(rows):
        try:
            values.append([float(cell) for cell in row])
        except ValueError:
            # a first row of names only is a header; a number among them is a mistake
            if position == 0 and not any(_is_number(cell) for cell in row):
                continue
            bad = next(cell for cell in row if not _is_number(cell))
            raise InputError(f"{path} line {line}: {bad.strip()!r} is not a number") from None
        if len(values[-1]) != len(values[0]):
            raise InputError(f"{path} line {line}: {len(values[-1])} values, but the first "
                             f"point has {len(values[0])}")
    if not values:
        raise InputError(f"{path} holds no points")
    return np.asarray(values, dtype=np.float64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:  # a pickled object array, or a file that is not .npy
        raise InputError(f"{path} is not a plain .npy array ({err})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", None)
        raise InputError(f"{path} must hold a 2-D array [points, dims], got shape {shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{path} holds {array.dtype} values, not numbers")
    if array.shape[0] == 0:
        raise InputError(f"{path} holds no points")
    return array.astype(np.float64)


def read_points(path: str | Path) -> np.ndarray:
    """The points of a ``.csv`` or ``.npy`` file, [n, d] float64; InputError otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npy"):
        raise InputError(f"{path}: unknown extension {path.suffix or '(none)'!r}; expected "
                         f".csv or .npy")
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    try:
        return _read_csv(path) if suffix == ".csv" else _read_npy(path)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None


def csv_text(points: np.ndarray, result: Prediction) -> str:
    """The output CSV: a header, then x0.., c0.., label for every point."""
    d = points.shape[1]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f"x{i}" for i in range(d)] + [f"c{i}" for i in range(d)] + ["label"])
    centres, labels = result.centres.tolist(), result.labels.tolist()
    for x, c, label in zip(points.tolist(), centres, labels):
        # the input as read (shortest round trip); centres are float32: 9 digits are exact
        writer.writerow([repr(v) for v in x] + [f"{v:.9g}" for v in c] + [label])
    return out.getvalue()


def plot_groups(points: np.ndarray, result: Prediction, path: Path) -> None:
    """PNG of the points coloured by group and each group's centre (first two coordinates)."""
    k = int(result.k_hat)
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    fig = Figure(figsize=(6, 5.5))
    FigureCanvasAgg(fig)  # Agg whatever the process-wide backend is; no pyplot state
    ax = fig.add_subplot()
    xs = points[:, 0]
    ys = points[:, 1] if points.shape[1] > 1 else np.zeros_like(xs)
    labels = result.labels.numpy()
    assert result.group_centres is not None
    means = result.group_centres.numpy()
    for g in range(k):
        members = labels == g
        colour = cmap(g % cmap.N)
        ax.scatter(xs[members], ys[members], s=10, color=colour, alpha=0.7,
                   label=f"group {g} ({int(members.sum())})")
        centre = means[members][0]
        ax.scatter([centre[0]], [centre[1] if len(centre) > 1 else 0.0], marker="X", s=140,
                   color=colour, edgecolors="black", linewidths=1.2, zorder=3)
    dims = "" if points.shape[1] <= 2 else f" (first 2 of {points.shape[1]} coordinates)"
    ax.set_title(f"{len(points)} points, {k} group(s); X = group centre{dims}")
    ax.set_xlabel("x0")
    ax.set_ylabel("x1" if points.shape[1] > 1 else "")
    if k <= 20:
        ax.legend(loc="best", fontsize=8, markerscale=1.5)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight", facecolor="white")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_outputs(points: np.ndarray, result: Prediction, out: str | None,
                  plot: str | None) -> None:
    """Write the CSV (or print it) and the plot; the files appear complete or not at all."""
    jobs = [(Path(out), lambda p: p.write_text(csv_text(points, result)))] if out else []
    if plot:
        jobs.append((Path(plot), lambda p: plot_groups(points, result, p)))
    written: list[tuple[Path, Path]] = []
    try:
        for final, write in jobs:
            tmp = _temporary(final)
            written.append((tmp, final))  # removed below if anything fails
            try:
                write(tmp)
            except OSError as err:  # named by the file asked for, not its temporary name
                raise InputError(f"cannot write {final}: {err.strerror or err}") from None
        for tmp, final in written:
            os.replace(tmp, final)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    if not out:
        sys.stdout.write(csv_text(points, result))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        points = read_points(args.points)
        result = predict_points(args.model, points, device=args.device,
                                bandwidth=args.bandwidth, refine=args.refine)
        write_outputs(points, result, args.out, args.plot)
    except (InputError, ValueError, FileNotFoundError, ConfigError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    how = (f", refined by up to {result.refine_iterations} EM iterations"
           if result.refine_iterations else "")
    print(f"{PROG}: {result.k_hat} group(s) (K-hat) among {len(points)} points{how}",
          file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`gmmt.inference.predict`.

    ``gmmt.predict`` names both the command-line module (``python -m gmmt.predict``) and the
    function the public API promises (``gmmt.predict(model, points)``). A package attribute
    cannot be both, and once this submodule is imported Python binds ``gmmt.predict`` to the
    module whatever ``gmmt/__init__`` exports; making the module itself callable keeps both
    spellings working.
    """

    def __call__(self, model_or_run_dir: Any, points: Any, mask: Any = None,
                 **kwargs: Any) -> Prediction:
        return predict_points(model_or_run_dir, points, mask, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
