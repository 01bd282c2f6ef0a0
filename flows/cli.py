"""``latentlab`` command line: parse, validate parameters, call a flow, report.

User errors (bad parameters, bad data, a missing run) end in one message and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from components.errors import UserError
from components.params import Params, load_params
from components.tracking import DEFAULT_EXPERIMENT

console = Console(stderr=True)
PACKAGED_PARAMS = Path(__file__).resolve().parents[1] / "params" / "default.yaml"


def _default_params() -> Path:
    local = Path("params/default.yaml")
    return local if local.exists() else PACKAGED_PARAMS


def cmd_data(params: Params, args: argparse.Namespace) -> None:
    from flows.data import data_flow

    result = data_flow(params, experiment=args.experiment)
    counts = result.manifest["counts"]
    console.print(
        f"[bold green]Data version {result.version}[/]: {counts['total']} images "
        f"({counts['train']} train, {counts['val']} val) in {len(result.manifest['classes'])} "
        f"classes, {counts['skipped']} skipped; MLflow run {result.run_id}"
    )
    for skipped in result.manifest["skipped"]:
        console.print(f"  skipped [yellow]{skipped['file']}[/]: {skipped['reason']}")
    print(result.version)


def cmd_train_ae(params: Params, args: argparse.Namespace) -> None:
    import mlflow

    from flows.autoencoder import autoencoder_flow

    result = autoencoder_flow(params, experiment=args.experiment)
    if not result.run_id:
        console.print("f=1 is pixel space: there is no autoencoder to train.")
        return
    metrics = mlflow.get_run(result.run_id).data.metrics
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("psnr", "ssim", "rfid") if k in metrics)
    verb = "Reused" if result.reused else "Trained"
    console.print(f"[bold green]{verb} autoencoder f={result.factor} ({result.regularizer})[/]: {shown}")
    print(result.run_id)


def cmd_train_ldm(params: Params, args: argparse.Namespace) -> None:
    from flows.ldm import ldm_flow

    result = ldm_flow(params, experiment=args.experiment)
    verb = "Reused" if result.reused else "Trained"
    console.print(
        f"[bold green]{verb} latent diffusion model f={result.factor}[/] (autoencoder run {result.ae_run_id or 'none'})"
    )
    print(result.run_id)


COMMANDS: dict[str, tuple[str, Callable[[Params, argparse.Namespace], None]]] = {
    "data": ("Prepare, version (DVC) and record the dataset.", cmd_data),
    "train-ae": ("Train (or reuse) the first-stage autoencoder for ae.factor.", cmd_train_ae),
    "train-ldm": ("Train (or reuse) the latent diffusion model for ae.factor.", cmd_train_ldm),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, handler) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--params", type=Path, default=None, help="YAML preset (default params/default.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. ae.factor=8")
        sub.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
        sub.set_defaults(handler=handler)
    return parser


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for a user error the CLI's message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def _quiet_user_errors() -> None:
    drop = _DropUserErrorTracebacks()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(drop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params or _default_params(), args.set)
        _quiet_user_errors()
        args.handler(params, args)
    except UserError as exc:
        console.print(f"[bold red]latentlab {args.command}:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print(f"latentlab {args.command}: interrupted; finished work is kept, rerun to resume.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
