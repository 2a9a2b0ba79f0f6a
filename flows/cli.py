"""``fedilora``: the command line the DVC stages and users call.

Every command takes ``--params`` (default ``params.yaml``). Errors print one line naming the
field or file and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import flows  # noqa: F401  (offline/telemetry defaults before the heavy imports)


def _overrides(pairs: list[str]) -> dict:
    """``-S a.b=value`` pairs, values parsed as YAML (numbers, lists, booleans)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"-S {pair!r}: expected KEY=VALUE, e.g. -S aggregation.method=hetlora")
        out[key] = yaml.safe_load(value)
    return out


def cmd_prepare(args, params) -> None:
    from fedilora import stages
    from fedilora.paths import DataPaths

    table = stages.prepare(params)
    print(f"prepared {len(table)} samples -> {DataPaths.of(params).features}")


def cmd_split(args, params) -> None:
    from fedilora import stages
    from fedilora.paths import DataPaths

    splits = stages.split(params)
    print(f"split {len(splits)} assignments over {params.clients.num_clients} clients -> {DataPaths.of(params).splits}")


def cmd_align(args, params) -> None:
    from fedilora import alignment

    done = alignment.run_stage(params)
    print(f"aligned -> {params.data.root}/aligned.safetensors" if done else "align.enabled is off: nothing aligned")


def check_prefect_server() -> None:
    """With PREFECT_API_URL set, fail fast and clearly if no server answers there (instead of
    a long retry loop and a traceback); without it, Prefect starts its ephemeral server."""
    import os
    import urllib.error
    import urllib.request

    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        return
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise RuntimeError(f"PREFECT_API_URL={url}: no Prefect server answers there ({reason}); "
                           "start one with `prefect server start` or unset PREFECT_API_URL") from None


def check_runtime(params) -> None:
    """``runtime.*`` can be had here (device, bfloat16, bitsandbytes) before any flow starts;
    on a remote cluster (``runner.address``) the workers' machines decide, so not checked here."""
    from fedilora import devices

    if params.runner.task_runner in ("threads", "sequential") or params.runner.address is None:
        devices.check(params.runtime)


def cmd_plan(args, params) -> None:
    from fedilora import plan

    result = plan.make_plan(params, num_classes=args.num_classes)
    print(plan.format_plan(result))
    if args.out:
        plan.write(result, args.out)
        print(f"plan -> {args.out}")


def cmd_federate(args, params) -> None:
    from flows.federated import federated_training
    from flows.runners import task_runner

    check_runtime(params)
    check_prefect_server()
    flow = federated_training.with_options(task_runner=task_runner(params))
    metrics = flow(params_path=str(args.params), overrides=args.overrides, out_dir=str(args.out))
    print(json.dumps(metrics, indent=2))


def cmd_compare(args, params) -> None:
    from flows.compare import compare_methods
    from flows.runners import unit_runner

    check_runtime(params)
    check_prefect_server()
    flow = compare_methods.with_options(task_runner=unit_runner(params.compare.runner))
    pairs = flow(params_path=str(args.params), overrides=args.overrides, out_dir=str(args.out))
    print(f"paired differences over compare.seeds={params.compare.seeds} (95 % CI):")
    for pair, d in pairs.items():
        interval = "" if d["ci_low"] is None else f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        print(f"  {pair}: {d['mean']:+.3f}{interval} {d['verdict']}")


def cmd_report(args, params) -> None:
    from fedilora.report import write_report

    path = write_report(Path(args.run), Path(args.compare), Path(args.out))
    print(f"report -> {path}")


def cmd_study(args, params) -> None:
    from flows.study import run_study

    check_prefect_server()
    summary = run_study(str(args.study))
    print(json.dumps(summary, indent=2))


def cmd_serve(args, params) -> None:
    from flows.federated import federated_training

    check_prefect_server()
    print(f"serving deployment 'federated_training/{args.name}'; trigger it from the Prefect UI or "
          f"`prefect deployment run 'federated_training/{args.name}'`")
    federated_training.serve(
        name=args.name,
        parameters={"params_path": str(Path(args.params).resolve())},
        cron=args.cron,
    )


COMMANDS = {
    "prepare": (cmd_prepare, "fetch and build the dataset and its image feature cache"),
    "split": (cmd_split, "clients, partition and missing-modality splits"),
    "align": (cmd_align, "the alignment stage: trained modules on the public slice, per seed"),
    "plan": (cmd_plan, "parameters, bytes and peak memory per worker of the configured run, without loading weights"),
    "federate": (cmd_federate, "run the federated_training Prefect flow"),
    "compare": (cmd_compare, "run compare.variants as sibling MLflow runs"),
    "report": (cmd_report, "tables and plots in reports/"),
    "study": (cmd_study, "the quality study: every method over a grid of settings and seeds"),
    "serve": (cmd_serve, "serve the Prefect deployment (schedule runs from the UI)"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedilora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--params", type=Path, default=Path("params.yaml"))
        s.add_argument("-S", "--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, e.g. -S aggregation.method=hetlora")
        s.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "plan":
            s.add_argument("--num-classes", type=int, default=None, help="classes when no prepared data says (default 10)")
            s.add_argument("--out", type=Path, default=None, help="also write the plan as JSON here")
        if name == "federate":
            s.add_argument("--out", type=Path, default=Path("outputs/federate"))
        if name == "compare":
            s.add_argument("--out", type=Path, default=Path("outputs/compare"))
        if name == "report":
            s.add_argument("--run", type=Path, default=Path("outputs/federate"))
            s.add_argument("--compare", type=Path, default=Path("outputs/compare"))
            s.add_argument("--out", type=Path, default=Path("reports"))
        if name == "study":
            s.add_argument("--study", type=Path, default=Path("study/study.yaml"))
        if name == "serve":
            s.add_argument("--name", default="fedilora")
            s.add_argument("--cron", default=None, help="a schedule, e.g. '0 3 * * *'")
    return p


def _configure_logging(debug: bool) -> None:
    """Our own messages go to stderr; Prefect's run loggers print tracebacks of failed tasks
    and flows, so outside --debug they only report critical events (the UI still shows states)."""
    import logging
    import os

    ours = logging.getLogger("fedilora")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedilora: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    if not debug:
        for logger in ("TASK_RUNS", "FLOW_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{logger}_LEVEL", "CRITICAL")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from fedilora.config import load_params

        _configure_logging(args.debug)
        args.overrides = _overrides(args.set)
        params = load_params(args.params, args.overrides)
        COMMANDS[args.command][0](args, params)
    except KeyboardInterrupt:
        print("fedilora: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for users; --debug for developers
        if args.debug:
            raise
        print(f"fedilora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
