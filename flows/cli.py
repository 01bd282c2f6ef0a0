"""``latentlab`` command line: parse, validate parameters, call a flow, report.

User errors (bad parameters, bad data, a missing run) end in one message and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

from components import progress, workspace
from components.errors import Reported, UserError, store_failure
from components.params import Params
from components.presets import load_params
from components.store import DEFAULT_EXPERIMENT

console = Console(stderr=True)


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

    from flows.pipeline import autoencoder_flow

    result = autoencoder_flow(params, experiment=args.experiment)
    if result.autoencoder_run is None:
        console.print("f=1 is pixel space: there is no autoencoder to train.")
        return
    metrics = mlflow.get_run(result.autoencoder_run).data.metrics
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("psnr", "ssim", "rfid") if k in metrics)
    verb = "Reused" if result.reused else "Trained"
    console.print(f"[bold green]{verb} autoencoder f={result.factor} ({params.ae.regularizer})[/]: {shown}")
    print(result.autoencoder_run)


def cmd_train_ldm(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import ldm_flow

    result = ldm_flow(params, experiment=args.experiment)
    verb = "Reused" if result.reused else "Trained"
    console.print(
        f"[bold green]{verb} latent diffusion model f={result.tags['latentlab.factor']}[/] "
        f"(first stage {result.tags['latentlab.first_stage']})"
    )
    print(result.run_id)


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import evaluate_flow

    result = evaluate_flow(params, args.run, experiment=args.experiment)
    m = result.metrics
    verb = "Reused evaluation" if result.reused else "Evaluated"
    console.print(
        f"[bold green]{verb} f={result.tags['latentlab.factor']}[/]: FID {m['fid']:.4g}{_interval(m, 'fid')}, "
        f"KID {m['kid_mean']:.4g}{_interval(m, 'kid')}, "
        f"precision {m['precision']:.3g}, recall {m['recall']:.3g}, {m['sample_img_per_s']:.3g} samples/s"
    )
    print(result.run_id)


def _interval(metrics: dict, name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return "" if low is None or high is None else f" [{low:.4g}, {high:.4g}]"


def cmd_sweep(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import sweep_flow

    # A sweep with a factor that did not finish ends Failed in Prefect and holds the sweep.
    state = sweep_flow(
        params, experiment=args.experiment, fail_on_regression=args.fail_on_regression, return_state=True
    )
    result = state.result(raise_on_failure=False)
    verb = "Reused finished sweep" if result.reused else "Sweep"
    console.print(f"[bold green]{verb} {result.run_id}[/]: report {result.report}")
    for name, entry in result.failed.items():
        console.print(f"  [red]{name}[/]: {entry.status} (rerun the sweep to retry it)")
    for regression in result.regressions:
        console.print(f"  [yellow]worse than the previous sweep[/] {regression}")
    print(result.run_id)
    if state.is_failed():
        raise SystemExit(1)


def cmd_report(params: Params, args: argparse.Namespace) -> None:
    from flows.report import report_flow

    path = report_flow(args.run, experiment=args.experiment)
    console.print(f"[bold green]Report[/] {path}")
    print(path)


def cmd_reproduce(params: Params, args: argparse.Namespace) -> None:
    from flows.reproduce import reproduce_flow

    result = reproduce_flow(params, args.run_id, experiment=args.experiment, allow_code_change=args.allow_code_change)
    table = Table(title=f"Reproduction of {result.original_run_id} (run {result.run_id})")
    for column in ("metric", "original", "reproduced", "relative difference"):
        table.add_column(column)
    for c in result.comparisons:
        mark = "[green]ok[/]" if c.relative <= result.tolerance else "[red]out of tolerance[/]"
        table.add_row(c.metric, f"{c.original:.5g}", f"{c.reproduced:.5g}", f"{c.relative:.2%} {mark}")
    console.print(table)
    verdict = "within" if result.within_tolerance else "NOT within"
    console.print(f"Metrics {verdict} tolerance {result.tolerance:.0%} (reproduce.tolerance).")
    print(result.run_id)
    if not result.within_tolerance:
        raise SystemExit(1)


def cmd_ui(params: Params | None, args: argparse.Namespace) -> None:
    import signal
    import socket
    import subprocess

    from components.store import tracking_uri
    from components.tracking import close_all_orphans

    uri = tracking_uri()
    if not uri.startswith("sqlite:") and "://" in uri and not uri.startswith("file:"):
        raise UserError(f"MLFLOW_TRACKING_URI is the server {uri}: open it in a browser; `ui` serves local stores.")
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"Cannot serve on {args.host}:{args.port} ({exc.strerror}): pass another --port.") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[bold yellow]Warning:[/] the MLflow UI has no authentication; on {args.host} anyone who can "
            "reach this machine can read, change and delete your runs."
        )
    close_all_orphans()  # so RUNNING in the UI means running
    console.print(f"MLflow UI for {uri} (Ctrl-C to stop); the runs of experiment {args.experiment!r}:")
    print(runs_page(f"http://{args.host}:{args.port}", args.experiment), flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    # Its own process group, so that stopping `ui` (Ctrl-C or SIGTERM) stops the server's workers too.
    server = subprocess.Popen(command, start_new_session=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        raise SystemExit(server.wait())
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        raise SystemExit(0) from None


def runs_page(base: str, experiment: str) -> str:
    """The UI page of ``experiment``'s runs table. MLflow 3.17's UI opens every experiment on its
    GenAI overview (a "GenAI / Model training" switch kept in the browser, which ignores the
    experiment's ``mlflow.experimentKind`` tag); ``workflowType=machine_learning`` in the
    address sets that switch to "Model training"."""
    import mlflow

    found = mlflow.MlflowClient().get_experiment_by_name(experiment)
    if found is None:  # nothing run yet: the experiments list
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning"


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def _require_prefect_server(command: str) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            f"{command} needs a Prefect server: start one (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api."
        )


def cmd_deploy(params: Params, args: argparse.Namespace) -> None:
    _require_prefect_server("deploy")
    from flows.deployments import SWEEP_QUEUE, WORK_QUEUE, deploy

    names = deploy(
        params,
        args.experiment,
        name=args.name,
        pool=args.pool,
        cron=args.cron,
        fail_on_regression=args.fail_on_regression,
    )
    console.print(f"[bold green]Deployed[/] on work pool '{args.pool}': {', '.join(names)}")
    console.print(f"Schedule: {args.cron or 'none (run on demand)'}. Next, each in a checkout of this project:")
    console.print(f"  prefect worker start --pool {args.pool} --work-queue {SWEEP_QUEUE}   (one, anywhere)")
    console.print(f"  prefect worker start --pool {args.pool} --work-queue {WORK_QUEUE} --limit 1   (per machine)")
    console.print(f"  prefect deployment run sweep/{args.name}")


def cmd_serve(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import sweep_flow

    _require_prefect_server("serve")
    console.print(f"Serving the sweep deployment 'latentlab-sweep' (cron: {args.cron or 'none, run on demand'})")
    sweep_flow.serve(
        name="latentlab-sweep",
        cron=args.cron,
        parameters={"params": params.model_dump(mode="json"), "experiment": args.experiment},
    )


PARAMETERS_HEADER = """# Parameters

Every key of `params/default.yaml` (the main job), its value there (or the schema's default) and
what it means. A preset of your own layers on these (`extends:` names another base); print the
resolved set with `latentlab params --params FILE [--set KEY=VALUE]`. Generated by
`latentlab params --markdown > docs/parameters.md`; a test keeps it current.
"""


def cmd_params(params: Params, args: argparse.Namespace) -> None:
    from components.params import field_descriptions
    from components.presets import resolve

    origin = resolve(args.params or workspace.default_params(), args.set).origin
    meaning = field_descriptions()
    values = {key: json.dumps(value) for key, value in params.flat().items()}
    if args.markdown:  # docs/parameters.md is this, for the default preset
        rows = [f"| `{k}` | `{v}` | {origin[k]} | {meaning.get(k, '')} |" for k, v in values.items()]
        print("\n".join([PARAMETERS_HEADER, "| key | value | from | meaning |", "|---|---|---|---|", *rows]))
        return
    width = max(map(len, values)), 16, max(map(len, origin.values()))  # (a longer value pushes its line on)
    lines = [
        f"{k:<{width[0]}}  {v:<{width[1]}}  {origin[k]:<{width[2]}}  {meaning.get(k, '')}" for k, v in values.items()
    ]
    with contextlib.suppress(BrokenPipeError):  # (| head)
        sys.stdout.write("\n".join(lines) + "\n")


COMMANDS: dict[str, tuple[str, Callable[[Params, argparse.Namespace], None]]] = {
    "data": ("Prepare, version (DVC) and record the dataset.", cmd_data),
    "train-ae": ("Train (or reuse) the first-stage autoencoder for ae.factor.", cmd_train_ae),
    "train-ldm": ("Train (or reuse) the latent diffusion model for ae.factor.", cmd_train_ldm),
    "evaluate": ("FID, KID, precision/recall of a finished LDM run (--run).", cmd_evaluate),
    "sweep": ("The main job: every factor in sweep.factors, compared in a report.", cmd_sweep),
    "report": ("Regenerate a sweep's report from MLflow (--run).", cmd_report),
    "reproduce": ("Retrain a recorded run from its data version and compare metrics.", cmd_reproduce),
    "ui": ("The MLflow UI on 127.0.0.1 for this project's tracking store.", cmd_ui),
    "deploy": ("Deploy the sweep, its factors and the stages to a Prefect work pool.", cmd_deploy),
    "serve": ("Serve the sweep as a Prefect deployment (optionally on a cron schedule).", cmd_serve),
    "params": ("Print the resolved parameters: each key, its value, where it came from, what it means.", cmd_params),
}


REGRESSION_FLAG = {
    "action": "store_true",
    "help": "fail (exit 1) when a factor got worse than in the previous sweep on the same data and params",
}
EXTRA_ARGUMENTS: dict[str, list[tuple[tuple[str, ...], dict]]] = {
    "evaluate": [(("--run",), {"required": True, "metavar": "RUN_ID", "help": "a finished train-ldm run"})],
    "report": [(("--run",), {"required": True, "metavar": "SWEEP_RUN_ID", "help": "a sweep run"})],
    "reproduce": [
        (("run_id",), {"metavar": "RUN_ID", "help": "an autoencoder or ldm run"}),
        (("--allow-code-change",), {"action": "store_true", "help": "proceed when the code differs from the run's"}),
    ],
    "ui": [
        (("--host",), {"default": "127.0.0.1", "help": "bind address (default loopback only)"}),
        (("--port",), {"type": int, "default": 5000}),
    ],
    "serve": [(("--cron",), {"default": None, "help": "schedule, e.g. '0 3 * * *'"})],
    "sweep": [(("--fail-on-regression",), REGRESSION_FLAG)],
    "params": [(("--markdown",), {"action": "store_true", "help": "a Markdown table (docs/parameters.md)"})],
    "deploy": [
        (("--fail-on-regression",), REGRESSION_FLAG),
        (("--cron",), {"default": None, "help": "schedule the sweep, e.g. '0 3 * * *' (nightly)"}),
        (("--pool",), {"default": "latentlab", "help": "Prefect process work pool (created if missing)"}),
        (("--name",), {"default": "latentlab", "help": "deployment name: sweep/NAME, factor/NAME, ..."}),
    ],
}


WITHOUT_PARAMS = ("ui",)  # commands no parameter acts on: a broken preset must not stop them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"latentlab {version('latentlab')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, handler) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name not in WITHOUT_PARAMS:
            sub.add_argument("--params", type=Path, default=None, help=f"YAML preset (default {workspace.PARAMS_FILE})")
            sub.add_argument(
                "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. ae.factor=8"
            )
        sub.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
        loudness = sub.add_mutually_exclusive_group()
        loudness.add_argument("-v", "--verbose", action="store_true", help="also Prefect's task lines and library logs")
        loudness.add_argument("-q", "--quiet", action="store_true", help="only results, warnings and errors")
        for flags, options in EXTRA_ARGUMENTS.get(name, []):
            sub.add_argument(*flags, **options)
        sub.set_defaults(handler=handler)
    return parser


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for a user error or a store that did not answer the
    CLI's message says it all, and a failure already reported was logged in a line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, (UserError, Reported)) or (error is not None and store_failure(error)))


def _quiet_user_errors() -> None:
    drop = _DropUserErrorTracebacks()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(drop)


# The stage of the run each command names (``--run`` or the positional run id).
RUN_STAGES = {"evaluate": ("ldm",), "report": ("sweep",), "reproduce": ("autoencoder", "ldm")}


def _check_before_prefect(params: Params, args: argparse.Namespace) -> None:
    """What can be checked without Prefect, whose server takes seconds to start: the tracking
    store, an image folder, and the run a command names. A user error then ends in seconds."""
    from components.sources import require_folder
    from components.store import check_run, check_store, glance

    check_store()
    if params.data.source == "folder" and args.command not in ("report", "reproduce"):  # (these build no data)
        require_folder(params.data.path)
    run_id = getattr(args, "run", None) or getattr(args, "run_id", None)
    if args.command in RUN_STAGES and run_id:
        command = f"latentlab {args.command}"
        seen = glance(run_id)
        if seen is not None:
            check_run(run_id, seen, RUN_STAGES[args.command], command)
        else:  # a store only MLflow can read (the flow checks the run's tags too)
            import mlflow

            from components.runs import run_of_stage
            from components.store import tracking_uri

            mlflow.set_tracking_uri(tracking_uri())
            run_of_stage(run_id, RUN_STAGES[args.command], command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = (
            None if args.command in WITHOUT_PARAMS else load_params(args.params or workspace.default_params(), args.set)
        )
        if args.command not in ("ui", "serve", "deploy", "params"):
            _check_before_prefect(params, args)
        _quiet_user_errors()
        if args.command != "ui":  # (the one command without Prefect, whose logging this adjusts)
            progress.configure(1 if args.verbose else -1 if args.quiet else 0)
        args.handler(params, args)
    except UserError as exc:
        console.print(f"[bold red]latentlab {args.command}:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print(f"latentlab {args.command}: interrupted; finished work is kept, rerun to resume.")
        return 130
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:
            raise
        console.print(
            f"[bold red]latentlab {args.command}:[/] the tracking server or its artifact store failed: {failure}. "
            "The run is marked FAILED and nothing unfinished is registered; rerun when it answers and the run resumes.",
            highlight=False,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
