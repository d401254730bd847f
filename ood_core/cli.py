"""``ood-lens`` command line: replay a run config without a browser.

    ood-lens example-config > run.toml     # the bundled default (seed workload + MNIST)
    ood-lens run run.toml --out results/   # table in the terminal, files in results/
    ood-lens layers --entry tiniest        # a model's layer table with (depth, idx) ids
    ood-lens scores                        # every registered score
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ood_core.diagnostics import OodLensWarning


def _cmd_run(args: argparse.Namespace) -> int:
    from ood_core.pipeline import RunConfig, export, run
    from ood_core.report import summary_table

    path = Path(args.config)
    if not path.exists():
        print(f"error: no such config file: {path}", file=sys.stderr)
        return 2
    config = RunConfig.from_toml(path.read_text())
    quiet = args.quiet or os.environ.get("OOD_LENS_QUIET", "") not in ("", "0")
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  disable=quiet, transient=True) as bar:  # fmt: skip
        task = bar.add_task("Starting", total=1.0)

        def progress(stage: str, frac: float) -> None:
            bar.update(task, description=stage, completed=frac)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OodLensWarning)  # printed below, once, with the table
            result = run(config, progress=progress)
    summary_table(result.evals, scores_and_layers=result.scores_and_layers,
                  oods_title=result.ood_titles, metrics=result.metrics, baseline=config.baseline)  # fmt: skip
    Console().print(f"Model accuracy on {len(result.ind)} InD test samples: {result.accuracy:.2%}; "
                    f"total {result.seconds:.1f} s")  # fmt: skip
    for message in result.warnings:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)
    if args.out:
        paths = export(result, args.out)
        for kind, p in paths.items():
            Console().print(f"wrote {kind}: {p}")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from ood_core.pipeline import example_config

    sys.stdout.write(example_config().to_toml())
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from ood_core.hub import load_model, model_info
    from ood_core.recorder import Recorder

    net = load_model(args.repo, args.entry)
    shape = model_info(net).input_shape or tuple(args.input_shape)
    print(Recorder(net, input_data=torch.rand(1, *shape)))
    return 0


def _cmd_scores(args: argparse.Namespace) -> int:
    from ood_core.scores import list_scores

    table = Table(title="Registered confidence scores (conformity: higher = more in-distribution)")
    for col in ("name", "family", "layers", "fit", "gradients", "parameters (defaults)", "reference"):
        table.add_column(col)
    for row in list_scores():
        params = ", ".join(f"{p['name']}={p['default']!r}" + ("*" if p["required"] else "")
                           for p in row["params"])  # fmt: skip
        table.add_row(row["name"], row["family"], row["layers"], "yes" if row["needs_fit"] else "no",
                      row["gradients"], params, row["reference"])  # fmt: skip
    Console(width=200).print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ood-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an evaluation config (TOML)")
    p.add_argument("config")
    p.add_argument("--out", help="folder for metrics.csv, confidences.parquet, report.html, config.toml")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("example-config", help="print a config for the bundled default")
    p.set_defaults(func=_cmd_example)
    p = sub.add_parser("layers", help="print a hub model's layer table")
    p.add_argument("--repo", default="bundled")
    p.add_argument("--entry", default="tiniest")
    p.add_argument("--input-shape", type=int, nargs=3, default=(1, 28, 28))
    p.set_defaults(func=_cmd_layers)
    p = sub.add_parser("scores", help="list the registered scores")
    p.set_defaults(func=_cmd_scores)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
