"""``ood-lens`` command line: replay a run config without a browser.

ood-lens example-config > run.toml     # the bundled default (seed workload + MNIST)
ood-lens run run.toml --out results/   # table in the terminal, files in results/
ood-lens run run.toml --out results/ --force   # replace an earlier run's results/
ood-lens run run.toml --trust-repo     # let a non-bundled hub repo named in run.toml run its code
ood-lens run run.toml --device cuda --amp bf16   # execution settings override [execution]
ood-lens run run.toml --executor ray --workers 2 # forward passes on Ray actors
ood-lens layers --entry tiniest        # a model's layer table with (depth, idx) ids
ood-lens scores                        # every registered score
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ood_core.diagnostics import OodLensWarning


class _Failed(Exception):
    """A user-facing error: printed as one ``error:`` message, exit status ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _warn(message: str) -> None:
    """One ``warning:`` line on stderr (the message is plain text: brackets are not markup)."""
    Console(stderr=True, soft_wrap=True).print(
        Text.assemble(("warning:", "yellow"), " ", message), highlight=False
    )


def _cmd_run(args: argparse.Namespace) -> int:
    """Exit 0: done; 2: bad input (config, --out), found before any computation; 1: the run
    failed; 130: interrupted (nothing written)."""
    args.interrupted = "interrupted; nothing written"
    path = Path(args.config)
    if not path.exists():
        raise _Failed(f"no such config file: {path}", 2)
    if not path.is_file():
        raise _Failed(
            f"{path} is not a file; pass a run config (TOML), e.g. from `ood-lens example-config`",
            2,
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Failed(f"cannot read the config {path}: {exc}", 2) from None
    if args.out is not None:  # before importing torch: a bad --out fails in well under a second
        from ood_core.outdir import OutputDirError, check_out_dir

        try:
            check_out_dir(args.out, force=args.force, protect=[path])
        except OutputDirError as exc:
            raise _Failed(str(exc), 2) from None
    from ood_core.bundle_writer import export
    from ood_core.config import ConfigError, RunConfig
    from ood_core.report import summary_table
    from ood_core.runner import run

    try:
        config = RunConfig.from_toml(text, source=str(path))
    except ConfigError as exc:
        raise _Failed(str(exc), 2) from None
    config = _with_execution_flags(config, args, path)
    from ood_core.hub import is_bundled

    # trust comes from the person at the keyboard (--trust-repo), never from the file
    config.trust_repo = bool(args.trust_repo)
    if config.trust_requested and not args.trust_repo and not is_bundled(config.model_repo):
        raise _Failed(
            f"{path}: [model] trust_repo = true is a request, not consent: a config file cannot "
            f"let the hub repository '{config.model_repo}' run its code (hubconf.py and the "
            "model) on this machine. If you trust it, pass --trust-repo on the command line.",
            2,
        )
    from ood_core.devices import DeviceError
    from ood_core.runner import ExecutionError, check_execution

    try:  # this machine's devices and executors, before anything is loaded
        check_execution(config)
    except (DeviceError, ExecutionError) as exc:
        given = any(getattr(args, k) is not None for k in ("device", "amp", "executor"))
        raise _Failed(str(exc) if given else f"{path}: [execution] {exc}", 2) from None
    quiet = args.quiet or os.environ.get("OOD_LENS_QUIET", "") not in ("", "0")
    from ood_core.hub import UntrustedRepoError

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            disable=quiet,
            transient=True,
        ) as bar:
            task = bar.add_task("Starting", total=1.0)

            def progress(stage: str, frac: float) -> None:
                bar.update(task, description=stage, completed=frac)

            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", OodLensWarning
                )  # printed below, once, with the table
                result = run(config, progress=progress)
    except (ConfigError, UntrustedRepoError) as exc:
        raise _Failed(str(exc), 2) from None
    except (ValueError, RuntimeError, OSError) as exc:  # data / hub / model problems
        raise _Failed(f"the run failed: {exc}", 1) from exc
    summary_table(
        result.evals,
        scores_and_layers=result.scores_and_layers,
        oods_title=result.ood_titles,
        metrics=result.metrics,
        baseline=result.config.baseline,
    )
    Console().print(
        f"Model accuracy on {len(result.ind)} InD test samples: {result.accuracy:.2%}; "
        f"total {result.seconds:.1f} s"
    )
    Console(soft_wrap=True).print(provenance_line(result.execution, result.environment))
    for message in [*result.notes, *result.warnings]:
        _warn(message)
    if args.out is not None:
        from ood_core.outdir import OutputDirError

        try:
            paths = export(result, args.out, force=args.force, config_path=path)
        except OutputDirError as exc:  # the folder changed during the run
            raise _Failed(f"{exc} (nothing written)", 2) from None
        except OSError as exc:
            raise _Failed(f"could not write the results ({exc}); nothing written", 1) from exc
        args.interrupted = f"interrupted; the results were already written to {paths['run'].parent}"
        for kind, p in paths.items():
            Console().print(f"wrote {kind}: {p}")
    return 0


def _with_execution_flags(config: Any, args: argparse.Namespace, path: Path) -> Any:
    """``config`` with the ``--executor / --workers / --device / --amp`` flags given (they
    override ``[execution]`` and the exported config.toml records them), checked as a config."""
    import dataclasses

    from ood_core.config import ConfigError

    flags = {
        k: getattr(args, k)
        for k in ("executor", "workers", "device")
        if getattr(args, k, None) is not None
    }
    if args.amp is not None:
        flags["amp"] = None if args.amp == "off" else args.amp
    if not flags:
        return config
    changed = dataclasses.replace(config, **flags)
    try:
        checked = changed.validate(source=f"{path} with the command-line flags")
    except ConfigError as exc:
        raise _Failed(str(exc), 2) from None
    return dataclasses.replace(changed, baseline=checked.baseline)


def provenance_line(execution: dict[str, Any], environment: dict[str, str]) -> str:
    """One line saying where and how a run was computed (``RunResult.execution`` /
    ``.environment``)."""
    if not execution:
        return "Computed: not recorded"
    workers = execution.get("workers")
    where = f"executor {execution.get('executor')}"
    if execution.get("executor") == "ray":
        where += f" ({workers} worker(s), {execution.get('address') or 'local Ray'})"
    device = execution.get("device")
    name = environment.get("device_name")
    amp = execution.get("amp") or "off"
    versions = ", ".join(f"{k} {environment[k]}" for k in ("torch", "python") if k in environment)
    return (
        f"Computed with {where} on {device}" + (f" ({name})" if name else "") + f", amp {amp}, "
        f"host {execution.get('host')}"
        + (f", {versions}" if versions else "")
        + f"; run id {execution.get('run_id')}"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _cmd_example(args: argparse.Namespace) -> int:
    from ood_core.config import example_config

    sys.stdout.write(example_config().to_toml())
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from ood_core.hub import UntrustedRepoError, load_model, model_info
    from ood_core.recorder import Recorder

    try:
        net = load_model(args.repo, args.entry, trust_repo=args.trust_repo)
    except UntrustedRepoError as exc:
        raise _Failed(str(exc), 2) from None
    shape = model_info(net).input_shape or tuple(args.input_shape)
    print(Recorder(net, input_data=torch.rand(1, *shape)))
    return 0


def _cmd_scores(args: argparse.Namespace) -> int:
    from ood_core.scores import list_scores, scores_markdown

    if args.markdown:
        print(scores_markdown())
        return 0

    table = Table(title="Registered confidence scores (conformity: higher = more in-distribution)")
    for col in (
        "name",
        "family",
        "layers",
        "fit",
        "gradients",
        "parameters (defaults)",
        "reference",
    ):
        table.add_column(col)
    for row in list_scores():
        params = ", ".join(
            f"{p['name']}={p['default']!r}" + ("*" if p["required"] else "") for p in row["params"]
        )
        table.add_row(
            row["name"],
            row["family"],
            row["layers"],
            row["fit_kind"],
            row["gradients"],
            params,
            row["reference"],
        )
    Console(width=200).print(table)
    return 0


class _SigintSeen:
    """Within ``with``: SIGINT raises ``KeyboardInterrupt`` as usual and is remembered.

    A Ctrl-C that lands while an extension module initialises reaches us as another
    exception (e.g. ``ImportError: initialization failed``); ``seen`` tells it apart
    from a bug. Outside the main thread it does nothing.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> _SigintSeen:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def main(argv: list[str] | None = None) -> int:
    """Entry point. Exit status: 0 done, 1 failure, 2 bad input, 130 interrupted."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the traceback of an error",
    )
    parser = argparse.ArgumentParser(
        prog="ood-lens", description=__doc__.split("\n\n")[0], parents=[debug]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an evaluation config (TOML)", parents=[debug])
    p.add_argument("config")
    p.add_argument(
        "--out",
        help="folder for metrics.csv, confidences.parquet, report.html, "
        "config.toml and run.json (written last); must not exist or be empty",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out folder of an earlier run (only once the new "
        "results are complete)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--trust-repo",
        action="store_true",
        help="let a non-bundled hub repository (GitHub or local folder) run its code "
        "on this machine (a config's trust_repo = true is only a request; this flag is consent)",
    )
    run_opts = p.add_argument_group(
        "execution",
        "override the config's [execution] table (the exported config.toml records them)",
    )
    run_opts.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="local: this process; ray: Ray Data actors (pip install 'ood-lens[ray]')",
    )
    run_opts.add_argument(
        "--workers", type=_positive_int, metavar="N", help="Ray actors (with --executor ray)"
    )
    run_opts.add_argument(
        "--device",
        metavar="D",
        help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N",
    )
    run_opts.add_argument(
        "--amp",
        choices=("bf16", "fp16", "off"),
        help="mixed-precision forward passes (fp16: CUDA only); off: full precision",
    )
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser(
        "example-config", help="print a config for the bundled default", parents=[debug]
    )
    p.set_defaults(func=_cmd_example)
    p = sub.add_parser("layers", help="print a hub model's layer table", parents=[debug])
    p.add_argument("--repo", default="bundled")
    p.add_argument("--entry", default="tiniest")
    p.add_argument("--input-shape", type=int, nargs=3, default=(1, 28, 28))
    p.add_argument(
        "--trust-repo",
        action="store_true",
        help="let a non-bundled hub repository (GitHub or local folder) run its code "
        "on this machine",
    )
    p.set_defaults(func=_cmd_layers)
    p = sub.add_parser("scores", help="list the registered scores", parents=[debug])
    p.add_argument("--markdown", action="store_true", help="print README's markdown table")
    p.set_defaults(func=_cmd_scores)
    args = parser.parse_args(argv)
    show_traceback = getattr(args, "debug", False)
    sigint = _SigintSeen()
    try:
        with sigint:
            return args.func(args)
    except KeyboardInterrupt:
        if show_traceback:
            traceback.print_exc()
        print(getattr(args, "interrupted", "interrupted"), file=sys.stderr)
        return 130
    except _Failed as exc:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (ValueError, RuntimeError) as exc:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback behind --debug
        if show_traceback:
            traceback.print_exc()
        if sigint.seen:  # Ctrl-C inside an import or C code surfaces as another error
            print(getattr(args, "interrupted", "interrupted"), file=sys.stderr)
            return 130
        print(
            f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
