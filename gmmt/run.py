"""Command line: ``python -m gmmt.run`` (also ``gmmt`` and ``accelerate launch -m gmmt.run``).

Arguments become config layers (see ``gmmt.config.presets``); the resolved config goes to the
trainer. Configuration mistakes print every problem with its JSON path and exit with code 2.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from attrs import evolve

from gmmt.config.data import DISTRIBUTION_FIELDS, DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.overrides import diff, format_diff
from gmmt.config.presets import COMPONENTS, PresetStore, Resolved, preset_dirs, resolve_config
from gmmt.training.preflight import RefusedHere, preflight, print_lines

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3
EXIT_REFUSED = 4  # too little memory, or too slow on this CPU (see gmmt.training.preflight)

EPILOG = """\
layers (later wins): code defaults < component presets < experiment preset < user preset
folders (GMMT_CONFIG_PATH, --config-dir) < --config FILE < DEVICE env < --device/--exp-name/
--seed < --set.  VALUE in --set is JSON (3, 0.1, true, null, [1,2], {"a":1}), else a string.

examples:
  python -m gmmt.run --preset quick_test
  python -m gmmt.run --preset standard --set training.optimizer.lr=2e-4 --print-config
  python -m gmmt.run --model-preset small_flow --data-preset complex --device cuda
  accelerate launch --config_file launch/multi_gpu.yaml -m gmmt.run --preset high_performance
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gmmt", description="Train a GMM set transformer from layered presets.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("presets")
    g.add_argument("--preset", "--experiment-preset", dest="preset", metavar="NAME",
                   help="experiment preset (default: quick_test; with --resume alone: the "
                        "run's own saved config); see --list-presets")
    for component in COMPONENTS:
        g.add_argument(f"--{component}-preset", dest=component, metavar="NAME",
                       help=f"{component} component preset (replaces the experiment's)")
    g.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="extra preset folder layered over the packaged ones (repeatable)")
    o = p.add_argument_group("overrides")
    o.add_argument("--config", dest="config_file", metavar="FILE",
                   help="JSON config layered over the presets (e.g. a saved config.json)")
    o.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. training.optimizer.lr=3e-4 (repeatable)")
    o.add_argument("--device", help="auto, cpu, cuda, mps or tpu (beats the DEVICE env var)")
    o.add_argument("--exp-name", help="experiment name (names the run folder)")
    o.add_argument("--seed", type=int, help="seed of data streams and initialisation")
    r = p.add_argument_group("running")
    r.add_argument("--resume", metavar="latest|PATH",
                   help="continue a run: 'latest' checkpoint of the newest matching run, or a "
                        "run/checkpoint folder")
    r.add_argument("--stop-after-steps", type=int, metavar="N",
                   help="stop with a checkpoint after N optimizer steps (schedule unchanged)")
    r.add_argument("--allow-inexact-resume", action="store_true",
                   help="resume a checkpoint written by another number of processes (refused "
                        "otherwise: the continuation is no longer bit-exact)")
    r.add_argument("--dry-run", action="store_true",
                   help="resolve the config and check it against this machine (device, "
                        "precision, memory per step) in seconds, then exit")
    r.add_argument("--allow-slow", action="store_true",
                   help="run even when one step needs more memory than is available or a CPU "
                        "run projects beyond training.max_cpu_hours (else: stop with advice, "
                        "exit 4)")
    i = p.add_argument_group("information (print and exit)")
    i.add_argument("--list-presets", action="store_true", help="list every preset")
    i.add_argument("--describe-preset", metavar="NAME",
                   help="show an experiment preset, or a component preset as COMPONENT:NAME")
    i.add_argument("--print-config", action="store_true",
                   help="print the resolved config and its diff against the bare preset")
    i.add_argument("--schema", action="store_true", help="print the JSON Schema of the config")
    i.add_argument("--print-launch-config", metavar="NAME", nargs="?", const="",
                   help="print a packaged accelerate launch config (e.g. multi_gpu; without "
                        "NAME: list them), to save and pass to accelerate launch --config_file")
    return p


LAUNCH_DIR = Path(__file__).resolve().parent / "launch"


def launch_config(name: str) -> str:
    """A packaged launch recipe (``launch/NAME.yaml``, or the SLURM script), or the list."""
    files = {p.stem: p for p in sorted(LAUNCH_DIR.glob("*")) if p.suffix in (".yaml", ".sbatch")}
    if not name:
        return "".join(f"{stem}\n" for stem in files)
    stem = name.removesuffix(".yaml").removesuffix(".sbatch")
    if stem not in files:
        raise ConfigError([f"unknown launch config {name!r}; packaged: {', '.join(files)}"],
                          "unknown launch config")
    return files[stem].read_text()


def list_presets(store: PresetStore) -> str:
    lines = ["experiment presets:"]
    for name in store.names("experiments"):
        body = store.experiment(name)
        parts = ", ".join(f"{c}={body[c]}" for c in COMPONENTS)
        lines.append(f"  {name:<20} {store.description('experiments', name)}")
        lines.append(f"  {'':<20} ({parts})")
    for kind in (*COMPONENTS, *(f"data_params/{field}" for field in DISTRIBUTION_FIELDS)):
        lines.append(f"\n{kind.replace('data_params/', 'data.')} presets:")
        for name in store.names(kind):
            lines.append(f"  {name:<20} {store.description(kind, name)}")
    return "\n".join(lines)


def describe_preset(store: PresetStore, name: str) -> str:
    if ":" in name:
        kind, _, preset = name.partition(":")
        if kind not in COMPONENTS:
            raise ConfigError([f"unknown component {kind!r} in {name!r}; use one of "
                               f"{', '.join(COMPONENTS)} (e.g. model:medium)"], "bad preset name")
        body = store.resolve_data_params({kind: store.resolve(kind, preset)})[kind]
        return (f"{kind} preset {preset!r}: {store.description(kind, preset)}\n"
                + json.dumps(body, indent=2))
    body = store.experiment(name)
    lines = [f"experiment preset {name!r}: {store.description('experiments', name)}"]
    for c in COMPONENTS:
        lines.append(f"  {c:<11} {body[c]:<16} {store.description(c, body[c])}")
    if body.get("overrides"):
        lines.append("  overrides: " + json.dumps(body["overrides"]))
    return "\n".join(lines)


def describe_resolution(res: Resolved) -> str:
    """Preset names, overrides and the diff against the bare experiment preset."""
    lines = [f"preset: {res.preset or '(none: config file over code defaults)'}"]
    if res.components:
        lines.append("components: " + ", ".join(f"{k}={v}" for k, v in res.components.items()))
    lines.append("overrides: " + (", ".join(res.overrides) if res.overrides else "(none)"))
    changes = [c for c in diff(res.bare, res.config.to_dict())
               if not c[0].startswith("metadata.")]
    lines.append(f"diff against the bare preset {res.preset!r}:" if res.preset
                 else "diff against code defaults:")
    lines.append(format_diff(changes))
    return "\n".join(lines)


class _NotRaised(Exception):
    """Stands in for TrainingDiverged until the (heavy) trainer is imported: an except clause
    naming an unbound local would hide the real error behind an UnboundLocalError."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    TrainingDiverged: type[Exception] = _NotRaised  # noqa: N806  (rebound by the import below)
    try:
        if args.print_launch_config is not None:
            print(launch_config(args.print_launch_config), end="")
            return 0
        if args.schema:
            from gmmt.config.schema import json_schema

            print(json.dumps(json_schema(), indent=2))
            return 0
        store = PresetStore(preset_dirs(args.config_dir))
        if args.list_presets:
            print(list_presets(store))
            return 0
        if args.describe_preset:
            print(describe_preset(store, args.describe_preset))
            return 0
        resolved = resolve_args(args)
        if args.print_config:
            print(json.dumps(resolved.config.to_dict(), indent=2))  # stdout: pure JSON
            print(describe_resolution(resolved), file=sys.stderr)
            return 0
        if args.dry_run:
            print(describe_resolution(resolved))
            print("\n".join(dry_run(resolved.config, args.allow_slow)))
            return 0
        # A resumed run is not timed: its checkpoint, not the config, says how much is left
        # (possibly nothing: a finished run).
        print_lines(preflight(resolved.config, allow_slow=args.allow_slow,
                              time_it=args.resume is None))
        from gmmt.training.experiment import ExperimentManager, TrainingDiverged

        manager = ExperimentManager(resolved.config, resume=args.resume,
                                    stop_after_steps=args.stop_after_steps,
                                    allow_inexact_resume=args.allow_inexact_resume)
        summary = manager.run()
    except ConfigError as err:
        print(f"gmmt: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RefusedHere as err:
        print(f"gmmt: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except TrainingDiverged as err:
        print(f"gmmt: training diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("gmmt: interrupted; the last checkpoint can be resumed with --resume latest",
              file=sys.stderr)
        return 130
    if ("stopped_by" in summary and summary.get("steps", 0) < summary.get("total_steps", 0)
            and os.environ.get("RANK", "0") == "0"):  # one line, not one per process
        print(f"gmmt: stopped at step {summary['steps']} ({summary['stopped_by']}); "
              f"resume with --resume latest", file=sys.stderr)
    return 0


def resolve_args(args: argparse.Namespace) -> Resolved:
    """The config the arguments describe.

    ``--resume`` without a preset, component preset or ``--config`` continues the run with its
    own saved config.json (plus any flags and ``--set``), not with the default preset's.
    """
    def resolve(config_file: str | None) -> Resolved:
        return resolve_config(
            args.preset, model=args.model, training=args.training, data=args.data,
            validation=args.validation, config_file=config_file,
            config_dirs=args.config_dir, overrides=args.overrides, device=args.device,
            exp_name=args.exp_name, seed=args.seed)

    chose = args.preset or args.config_file or any(getattr(args, c) for c in COMPONENTS)
    if args.resume is None or chose:
        return resolve(args.config_file)
    from gmmt.training.setup import find_resume_checkpoint

    # The default preset only serves to find the run (its exp_name and base_dir, as changed
    # by --exp-name / --set); the run's own config is then the base.
    checkpoint = find_resume_checkpoint(args.resume, resolve(None).config)
    return resolve(str(checkpoint.parent.parent / "config.json"))


def dry_run(config: ExperimentConfig, allow_slow: bool = False) -> list[str]:
    """What the run would check before starting, in seconds: the device and precision, and
    the memory of a step against this machine's (RefusedHere / ConfigError as the run would).

    The model is built on the meta device and run on two small sets of meta tensors: shapes
    are checked without allocating or initialising 38M parameters, nor timing steps, nor
    drawing the validation bank (what made a dry run of high_performance take 44 s).
    """
    import torch

    from gmmt.data.gmm import GMMSampler
    from gmmt.model.build import build_model

    lines = preflight(config, allow_slow=allow_slow, time_it=False)
    batch = GMMSampler(evolve(config.data, sample_count_distribution=DistributionSpec(
        type="fixed", value=8)), config.device.seed).batch(0, 2)
    def forward(device: str) -> torch.Tensor:
        with torch.device(device), torch.no_grad():
            model = build_model(config.model, config.data.dim, config.data.max_clusters)
            return model(batch.points.to(device), None if batch.mask is None else
                         batch.mask.to(device), batch.snr_db.to(device))

    try:
        out = forward("meta")  # shapes only: no memory, no arithmetic
    except (RuntimeError, NotImplementedError):
        # Some ops have no meta kernel; two sets of 8 points are cheap enough to run for real.
        out = forward("cpu")
    return [*lines, f"dry run: config valid; a batch of 2 sets of 8 points -> output "
                    f"{tuple(out.shape)}; the step time is measured when the run starts."]


if __name__ == "__main__":
    sys.exit(main())
