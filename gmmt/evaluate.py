"""Command line: ``python -m gmmt.evaluate RUN_DIR_OR_MODEL`` scores a saved model.

The argparse front of :func:`gmmt.evaluation.held_out.evaluate_saved_model`, which says what is
scored and written. Mistakes (a missing path, an unknown preset) print one line and exit with
code 2.
"""

import argparse
import json
import sys
from collections.abc import Sequence

from gmmt.config.fields import ConfigError
from gmmt.evaluation.held_out import (
    ALL_BASELINES,
    DEFAULT_BASELINES,
    EvaluationError,
    evaluate_saved_model,
    markdown_report,
)

EXIT_USAGE = 2

EPILOG = """\
examples:
  python -m gmmt.evaluate runs/quick_test-20250101-120000
  python -m gmmt.evaluate runs/my_run/best --data-preset complex --num-sets 4096
  python -m gmmt.evaluate runs/my_run --baselines oracle kmeans --json > scores.json
  python -m gmmt.evaluate runs/my_run --refine 20 --baselines bayes em_tied em_bic
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gmmt.evaluate", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a saved gmmt model against the classical baselines on a held-out "
                    "bank (its own data stream, never the training or validation sets).")
    p.add_argument("path", metavar="RUN_DIR_OR_MODEL",
                   help="a run folder (its final/ is used) or a final/ or best/ folder")
    p.add_argument("--data-preset", metavar="NAME",
                   help="data preset to evaluate on (default: the run's own data config)")
    p.add_argument("--num-sets", type=int, default=1024, metavar="N",
                   help="sets in the held-out bank (default: 1024)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="sets per batch; lower it for large N (the energy metric holds "
                        "B*(N+K)^2 distances) (default: 32)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="seed of the held-out bank and of the baselines (default: the run's)")
    p.add_argument("--baselines", nargs="*", choices=ALL_BASELINES,
                   default=list(DEFAULT_BASELINES), metavar="NAME",
                   help=f"baselines to score, from {', '.join(ALL_BASELINES)} (default: all but "
                        f"bayes_unknown_k, the floor not told K, which costs one Gibbs run per "
                        f"K the prior can draw)")
    p.add_argument("--refine", type=int, metavar="ITERATIONS",
                   help="also score the model refined by at most ITERATIONS tied-variance EM "
                        "iterations from its own clusters, with its own K ('refined') and told "
                        "the true K ('refined_told_k'); 0: the raw model only (default: as the "
                        "run's model.refinement says)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... or auto (cuda when available; default)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: RUN_DIR/evaluation/<data preset>/, with "
                        "'-best' appended for a best/ model)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON result instead of the markdown table")
    p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="extra preset folder (as in gmmt.run; repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, out = evaluate_saved_model(
            args.path, data_preset=args.data_preset, num_sets=args.num_sets,
            batch_size=args.batch_size, seed=args.seed, baselines=args.baselines,
            device=args.device, out=args.out, config_dirs=args.config_dir,
            refine_iterations=args.refine)
    except (EvaluationError, ConfigError, FileNotFoundError) as err:
        print(f"gmmt.evaluate: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gmmt.evaluate: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown_report(result), end="")
        print(f"\nwrote evaluation.json, evaluation.md and {len(result['plots'])} plot(s) "
              f"to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
