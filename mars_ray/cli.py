"""The ``mars-ray`` command. ``main(argv) -> int`` is the testable entry point.

Every command takes ``--config FILE.yaml`` and dotted overrides (``--mars.tau 0.5`` or
``--mars.tau=0.5``) on top of the defaults, validates the result, and exits non-zero with a
one-line reason on stderr when it cannot do its job. Heavy imports happen inside commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mars_ray.config import Config, _locate

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad command line (exit code 2)."""


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """``["--a.b", "1", "--c.d=x", "--flag"]`` -> ``{"a.b": "1", "c.d": "x", "flag": "true"}``.

    A key with no value is allowed only for true/false fields.

    Raises:
        UsageError: a token that is not a ``--dotted.key``, or a missing value.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UsageError(f"unexpected argument {tok!r}; config overrides look like --section.key VALUE")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_") if "." in key or key == "seed" else key
        if not eq:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2 and not _is_number(nxt)):
                if _hint(key) is not bool:
                    raise UsageError(f"--{key} needs a value")
                value = "true"
            else:
                value = nxt
                i += 1
        out[key] = value
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _hint(key: str) -> Any:
    try:
        return _locate(Config(), key)[2]
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_config(args: argparse.Namespace, extra: Sequence[str]) -> Config:
    overrides = parse_overrides(extra)
    if getattr(args, "ray_address", None):
        overrides["resources.ray_address"] = args.ray_address
    try:
        return Config.load(args.config, overrides)
    except ValueError as e:
        raise UsageError(_one_line(e)) from None


# ------------------------------------------------------------------------------ commands


def cmd_config_show(args, extra) -> int:
    cfg = build_config(args, extra)
    print(f"# mars_ray resolved config (hash {cfg.hash()})")
    print(cfg.to_yaml(), end="")
    return EXIT_OK


def cmd_config_validate(args, extra) -> int:
    if extra:
        raise UsageError("config validate takes a file only")
    try:
        cfg = Config.load(args.file)
    except ValueError as e:
        raise UsageError(_one_line(e)) from None
    print(f"{args.file}: valid (hash {cfg.hash()})")
    return EXIT_OK


def cmd_data_prepare(args, extra) -> int:
    from mars_ray.data.prepare import prepare

    cfg = build_config(args, extra)
    report = prepare(cfg, with_lengths=not args.no_lengths)
    _print_counts(report)
    print(f"wrote {report['output']}")
    return EXIT_OK


def cmd_data_inspect(args, extra) -> int:
    from mars_ray.data.prepare import inspect

    cfg = build_config(args, extra)
    info = inspect(args.path, cfg)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        _print_counts(info)
        for col, stats in (info.get("lengths") or {}).items():
            if isinstance(stats, dict) and "p50" in stats:
                print(
                    f"  {col:9s} tokens  p50 {stats['p50']:5d}  p90 {stats['p90']:5d}  p99 {stats['p99']:5d}  max {stats['max']:5d}"
                )
        if info.get("lengths"):
            ln = info["lengths"]
            print(
                f"  over limits: {ln['prompt_left_truncated']} prompts left-truncated, {ln['response_capped']} pairs with a capped response (none dropped)"
            )
        for reason, n in (info.get("quarantine_reasons") or {}).items():
            print(f"  quarantined {n:6d}  {reason}")
    return EXIT_OK


def cmd_models_resolve(args, extra) -> int:
    from mars_ray.models import resolve_model

    cfg = build_config(args, extra)
    for ref in args.refs:
        r = resolve_model(ref, cache_dir=cfg.model.cache_dir, offline=cfg.model.offline)
        print(f"{ref}\t{r.kind}\t{r.path}")
    return EXIT_OK


def cmd_push(args, extra) -> int:
    """Upload a saved model folder (its card and statistics included) to the Hugging Face hub."""
    from mars_ray.model_card import push
    from mars_ray.serve.protocol import resolve_target

    if extra:
        raise UsageError(f"mars-ray push takes no config overrides (got {' '.join(extra)})")
    folder = resolve_target(args.model).load
    token = os.environ.get(args.token_env) if args.token_env else None
    try:
        url = push(folder, args.repo, private=args.private, token=token)
    except ConnectionError as e:
        print(f"mars-ray: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"pushed {folder} -> {url}")
    return EXIT_OK


def cmd_augment(args, extra) -> int:
    import pyarrow.parquet as pq

    from mars_ray.augment import run_epoch, summary_markdown
    from mars_ray.core import schema as S
    from mars_ray.data import read_preferences

    cfg = build_config(args, extra)
    data = read_preferences(cfg.data, seed=cfg.seed)
    train = data.table.filter(pa_equal(data.table, S.SPLIT, "train"))
    print(f"data: {data.report['read']} read, {train.num_rows} training pairs")
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out)
    res = run_epoch(cfg, train, reward_ref=cfg.model.reward, epoch=cfg.augment.epoch)
    from mars_ray.core import atomic

    for table, name in ((res.synthetic, "synthetic.parquet"), (res.per_pair, "allocation.parquet")):
        with atomic.atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    res.summary["data"] = {k: data.report[k] for k in ("read", "kept", "quarantined", "selected")}
    atomic.write_json(out / "augment_summary.json", res.summary, default=float)
    md = summary_markdown(res.summary)
    atomic.write_text(out / "augment_summary.md", md)
    print(md, end="")
    print(f"wrote {out / 'synthetic.parquet'} ({res.synthetic.num_rows} synthetic pairs)")
    return EXIT_OK


def cmd_train(args, extra) -> int:
    from mars_ray.pipeline import end_summary, load_run_config, run_mars

    if args.resume:
        cfg = load_run_config(args.resume)
        overrides = parse_overrides(extra)
        if args.ray_address:
            overrides["resources.ray_address"] = args.ray_address
        bad = [k for k in overrides if not k.startswith("resources.")]
        if bad:
            raise UsageError(
                f"--resume continues a run with its own config; only resources.* may change (got {', '.join(bad)})"
            )
        for k, v in overrides.items():
            cfg.set(k, v, source="command line", from_text=True)
        cfg.output.dir = str(Path(args.resume))
        cfg.validate()
    else:
        cfg = build_config(args, extra)
    summary = run_mars(cfg, resume=bool(args.resume), base_metrics=True)
    print("\n".join(end_summary(summary)), flush=True)
    return EXIT_OK


def cmd_llm_server(args, extra) -> int:
    from mars_ray.serve.llm_server import main as server_main

    return server_main(list(extra))


SERVE_CHILD_ENV = "MARS_RAY_SERVE_CHILD"
# Longest a stopping server takes before it exits regardless (drain 8 s, then the app and Ray).
SERVE_STOP_BUDGET_S = 12.0


def _supervise_serve(argv: Sequence[str]) -> int:
    """Run the server in a child process of its own session, and pass SIGINT and SIGTERM on to it.

    ``ray.init`` puts the driver and every Ray process it starts in one process group, so a
    SIGTERM to that group (``kill -- -PGID``, a supervisor stopping its job) killed Ray's own
    processes under the server while it drained, and the stop took a minute. The child's session
    holds the server and its Ray; this process is alone in the caller's group, turns any stop
    signal into one SIGTERM for the child, and exits with its code. The child gets SIGTERM if this
    process dies (Linux ``PR_SET_PDEATHSIG``).
    """
    import signal
    import subprocess

    env = dict(os.environ, **{SERVE_CHILD_ENV: str(os.getpid())})
    child = subprocess.Popen([sys.executable, "-m", "mars_ray.cli", *argv], env=env, start_new_session=True)

    def forward(signum, _frame) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the supervisor) dies."""
    import ctypes
    import ctypes.util
    import signal

    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(name, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != int(os.environ.get(SERVE_CHILD_ENV, "0") or 0):
            os.kill(os.getpid(), signal.SIGTERM)  # the parent is already gone


def _stop_within(budget_s: float, steps: Callable[[], None]) -> None:
    """Run the shutdown ``steps``; past ``budget_s`` seconds exit the process anyway (Ray's own
    processes may already be gone: their calls would wait for long timeouts)."""
    import threading

    done = threading.Event()

    def run() -> None:
        try:
            steps()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(budget_s):
        print(f"stopping took over {budget_s:.0f} s (Ray's processes were stopped too?); exiting now", flush=True)
        sys.stdout.flush()
        os._exit(EXIT_OK)


def cmd_serve(args, extra) -> int:
    """Serve a reward model on Ray Serve until Ctrl-C / SIGTERM, then delete the app cleanly."""
    import signal
    import threading
    import time

    from mars_ray.serve.protocol import resolve_target

    model = args.model
    if model is not None and args.config is None:
        run_dir = resolve_target(model).run_dir
        if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
            # The run's own settings (token limits, dtype) score exactly as training and evaluation did.
            args.config = str(Path(run_dir) / "config.yaml")
            print(f"config: {args.config} (the run's own; --config FILE to use another)")
    cfg = build_config(args, extra)
    problems = cfg.serve.problems()
    if problems:
        raise UsageError("; ".join(problems))
    model = model or cfg.model.reward
    private_ray = not (os.environ.get("RAY_ADDRESS") or cfg.resources.ray_address)
    if private_ray and os.name == "posix" and not os.environ.get(SERVE_CHILD_ENV) and getattr(args, "argv", None):
        from mars_ray.serve.app import check_app

        check_app(cfg, model)  # config, model, head, statistics and token: errors here, in this process
        return _supervise_serve(args.argv)  # the server runs in a child of its own session
    if os.environ.get(SERVE_CHILD_ENV):
        _die_with_parent()

    import ray

    from mars_ray.runtime import init_ray
    from mars_ray.serve import app as serve_app

    app = serve_app.build_app(cfg, model)  # config, model, statistics and token fail here, before Ray starts
    stop = threading.Event()
    previous: dict = {}
    started = False
    try:
        init_ray(cfg.resources)
        # After ray.init, whose core worker installs a SIGTERM handler of its own (it aborts the process):
        # ours replaces it, so SIGTERM and Ctrl-C both end in the clean shutdown below.
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        _, url = serve_app.start(cfg, app=app)
        started = True
        auth = f", bearer token from ${cfg.serve.auth_token_env}" if cfg.serve.auth_token_env else ""
        print(
            f"serving {model} at {url}  (POST /score /compare /get_reward, GET /health{auth}; "
            f"handle: serve.get_app_handle({cfg.serve.app_name!r}); config hash {cfg.hash()})",
            flush=True,
        )
        print("Ctrl-C or SIGTERM stops it", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        # Our handlers stay while stopping: a second signal (a supervisor forwarding one, a
        # control-group kill) only sets the event again instead of aborting the drain.

        def shutdown() -> None:
            if started:
                # HTTP requests get 503 + Retry-After while those in flight finish, then a moment for
                # their answers to leave the proxy, then the app and Ray go.
                try:
                    d = serve_app.drain(cfg.serve.app_name, timeout_s=8.0)
                    print(f"draining: {d['replicas']} of {d['running']} replica(s), {d['inflight']} request(s) left")
                except Exception as exc:  # stopping anyway: say why the drain did not finish
                    print(f"draining failed ({type(exc).__name__}: {exc}); stopping", flush=True)
                time.sleep(0.5)
                serve_app.stop(cfg.serve.app_name)
            if ray.is_initialized():
                ray.shutdown()

        _stop_within(SERVE_STOP_BUDGET_S, shutdown)
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python (cannot be restored)
                signal.signal(sig, handler)
    print("stopped", flush=True)
    return EXIT_OK


def cmd_bank(args, extra) -> int:
    from mars_ray.bank import build_bank, inspect_bank

    cfg = build_config(args, extra)
    if args.action == "build":
        build_bank(cfg)
    info = inspect_bank(cfg.model.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(
        f"generation bank {info['cache']} ({info.get('backend', 'sqlite')}): {info['entries']} outputs "
        f"({info.get('bytes', 0) / 1e6:.1f} MB)"
    )
    for gen, n in info["by_generator"].items():
        print(f"  {n:8d}  {gen}")
    for b in info["builds"][-5:]:
        para, rew = b.get("paraphrase", {}), b.get("rewrite", {})
        print(
            f"  build {b['finished']}: {b['data']} ({b['pairs']} pairs, {b['texts']} responses x "
            f"{b['paraphrases_per_text']}): paraphrases generated {para.get('generated', 0)}, hits "
            f"{para.get('hits', 0)}; rewrites generated {rew.get('generated', 0)}; {b['seconds']:.0f}s"
        )
    return EXIT_OK


def cmd_eval(args, extra) -> int:
    from mars_ray.evaluate import evaluate

    cfg = build_config(args, extra)
    if not args.model:
        raise UsageError("--model RUN_DIR|PATH|HUB_ID is required")
    from mars_ray.runtime import on_reserved_gpus

    on_reserved_gpus(cfg.resources, evaluate, cfg, args.model)  # on a GPU when resources.gpus_per_actor asks
    return EXIT_OK


def placement_commands() -> tuple[str, ...]:
    from mars_ray.placement import COMMANDS

    return COMMANDS


def cmd_cluster_check(args, extra) -> int:
    import ray

    from mars_ray.placement import check_phases, command_phases, describe
    from mars_ray.runtime import init_ray

    cfg = build_config(args, extra)
    phases = command_phases(args.command, cfg)
    init_ray(cfg.resources)
    rows = check_phases(phases, timeout_s=args.timeout)
    print(describe(rows, ray.cluster_resources()))
    pending = [r["phase"] for r in rows if not r["fits"]]
    if pending:
        print(f"{len(pending)} phase(s) would stay pending: {'; '.join(pending)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_compare(args, extra) -> int:
    from mars_ray.experiments import TrialsFailed, compare

    cfg = _tune_config(args, extra)
    try:
        compare(cfg, restore=bool(args.resume))
    except TrialsFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"report: {cfg.output.dir}/compare.md (and .html, .json)")
    return EXIT_OK


def cmd_sweep(args, extra) -> int:
    from mars_ray.experiments import sweep

    cfg = _tune_config(args, extra)
    sweep(cfg, restore=bool(args.resume))
    print(f"report: {cfg.output.dir}/sweep.md (and .html, .json); best config {cfg.output.dir}/best_config.yaml")
    return EXIT_OK


def _tune_config(args, extra) -> Config:
    """The experiment's config; with --resume, the one saved beside the interrupted experiment."""
    if args.resume:
        path = Path(args.resume) / "experiment_config.yaml"
        if not path.exists():
            raise UsageError(f"{args.resume}: no experiment_config.yaml (not a compare/sweep directory)")
        cfg = Config.load(path)
        cfg.output.dir = str(Path(args.resume))
        return cfg
    from mars_ray.experiments import check_trainable_in_tune

    cfg = build_config(args, extra)
    check_trainable_in_tune(cfg, args.command)  # before anything is written
    out = Path(cfg.output.dir)
    if (out / "experiment_config.yaml").exists() and not cfg.output.overwrite:
        raise UsageError(
            f"{out} holds an experiment already: --resume {out} continues it, or choose another --output.dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    from mars_ray.core.atomic import write_text

    write_text(out / "experiment_config.yaml", cfg.to_yaml())
    return cfg


def cmd_align(args, extra) -> int:
    from mars_ray.rl.align import align

    if args.resume:
        path = Path(args.resume) / "config.yaml"
        if not path.exists():
            raise UsageError(f"{args.resume}: no config.yaml (not a mars-ray align directory)")
        overrides = parse_overrides(extra)
        if args.ray_address:
            overrides["resources.ray_address"] = args.ray_address
        bad = [k for k in overrides if not k.startswith(("resources.", "rl.reward_url", "rl.reward_deploy"))]
        if bad:
            raise UsageError(
                f"--resume continues a run with its own config; only resources.* and rl.reward_* may change "
                f"(got {', '.join(bad)})"
            )
        cfg = Config.load(path, overrides)
        cfg.output.dir = str(Path(args.resume))
    else:
        cfg = build_config(args, extra)
    summary = align(cfg, resume=bool(args.resume))
    print(f"done: policy {summary['policy']}; metrics {Path(cfg.output.dir) / 'metrics.jsonl'}")
    return EXIT_OK


def cmd_winrate(args, extra) -> int:
    from mars_ray.rl.winrate import winrate

    cfg = build_config(args, extra)
    if not args.policy_a or not args.policy_b:
        raise UsageError("--policy-a and --policy-b are required (align directories, model folders or hub ids)")
    names = tuple(args.names.split(",")) if args.names else None
    if names is not None and len(names) != 2:
        raise UsageError("--names takes two comma-separated names, e.g. --names mars,uniform")
    from mars_ray.runtime import on_reserved_gpus

    on_reserved_gpus(cfg.resources, winrate, cfg, args.policy_a, args.policy_b, names=names)
    return EXIT_OK


def cmd_align_compare(args, extra) -> int:
    from mars_ray.rl.align_compare import align_compare

    cfg = build_config(args, extra)
    align_compare(cfg)
    print(f"report: {cfg.output.dir}/align_compare.md (and .json)")
    return EXIT_OK


def pa_equal(table, column: str, value: str):
    import pyarrow.compute as pc

    return pc.equal(table.column(column), value)


def _print_counts(r: dict[str, Any]) -> None:
    print(
        f"read {r['read']} = kept {r['kept']} + quarantined {r['quarantined']}; "
        f"selected {r['selected']} (train {r['splits']['train']}, val {r['splits']['val']}, test {r['splits']['test']})"
    )


# ------------------------------------------------------------------------------ parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML config over the defaults")
    common.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    common.add_argument(
        "--verbose",
        action="store_true",
        default=None,
        help="also show Ray's, Ray Data's and transformers' own output (worker logs, load reports); "
        "without it they stay in the Ray session's log files",
    )
    p = argparse.ArgumentParser(
        prog="mars-ray",
        description="MARS: margin- and semantic-aware data augmentation for reward modeling, on Ray. "
        "Any config key can be set as --section.key VALUE (see `mars-ray config show`).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cfgp = sub.add_parser("config", help="show or validate configuration")
    cfg_sub = cfgp.add_subparsers(dest="action", required=True)
    s = cfg_sub.add_parser("show", parents=[common], help="print the resolved config as YAML")
    s.set_defaults(func=cmd_config_show)
    s = cfg_sub.add_parser("validate", help="check a config file without running anything")
    s.add_argument("file")
    s.set_defaults(func=cmd_config_validate)

    datap = sub.add_parser("data", help="prepare or inspect preference data")
    data_sub = datap.add_subparsers(dest="action", required=True)
    s = data_sub.add_parser("prepare", parents=[common], help="read, validate, split; write parquet + report")
    s.add_argument("--no-lengths", action="store_true", help="skip token-length statistics (no tokenizer load)")
    s.set_defaults(func=cmd_data_prepare)
    s = data_sub.add_parser("inspect", parents=[common], help="counts, length percentiles, quarantine reasons")
    s.add_argument("path", nargs="?", default=None, help="a prepared directory or a data file (default: data.path)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_data_inspect)

    s = sub.add_parser("augment", parents=[common], help="one MARS epoch of data work: synthetic pairs + summary")
    s.set_defaults(func=cmd_augment)

    bankp = sub.add_parser("bank", help="the generation bank: build it for a data file, or inspect it")
    bank_sub = bankp.add_subparsers(dest="action", required=True)
    for action, text in (
        ("build", "generate paraphrase candidates and rewrite attempts for the training pairs (Ray Data)"),
        ("inspect", "what model.cache_dir holds: outputs per generator, build manifests"),
    ):
        s = bank_sub.add_parser(action, parents=[common], help=text)
        s.add_argument("--json", action="store_true", help="print JSON")
        s.set_defaults(func=cmd_bank)

    s = sub.add_parser(
        "train",
        parents=[common],
        help="the T-epoch MARS loop (or a baseline): augment, train, evaluate; writes a run directory",
    )
    s.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue a killed run from its last finished epoch (and Ray Train checkpoint)",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "eval",
        parents=[common],
        help="score a reward model on preference data: accuracy, SNR, RewardBench sections, curvature",
    )
    s.add_argument(
        "--model",
        metavar="RUN_DIR|PATH|HUB_ID",
        default=None,
        help="a training run directory (its model/), a Hugging Face folder, a hub id or builtin:minilm",
    )
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser(
        "cluster-check",
        parents=[common],
        help="will COMMAND's job fit the running cluster? reserve each phase's resources, report what stays pending",
    )
    s.add_argument("command", choices=placement_commands(), help="the mars-ray command the config is for")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each phase (default 30)")
    s.set_defaults(func=cmd_cluster_check)

    s = sub.add_parser(
        "compare",
        parents=[common],
        help="strategies x seeds (compare.*), each a full train run as a Ray Tune trial; paired statistics",
    )
    s.add_argument("--resume", metavar="DIR", default=None, help="continue an interrupted compare in DIR")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser(
        "sweep",
        parents=[common],
        help="Ray Tune search over tune.space (e.g. mars.tau, mars.budget) with ASHA; writes best_config.yaml",
    )
    s.add_argument("--resume", metavar="DIR", default=None, help="restore an interrupted sweep in DIR (Tuner.restore)")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser(
        "align",
        parents=[common],
        help="policy optimisation (TRL GRPO/RLOO on Ray Train) against the reward model served by Ray Serve",
    )
    s.add_argument(
        "--resume", metavar="DIR", default=None, help="continue a killed align run in DIR from its last checkpoint"
    )
    s.set_defaults(func=cmd_align)

    s = sub.add_parser(
        "winrate",
        parents=[common],
        help="two policies' responses to the same prompts judged pairwise by an LLM (both orders)",
    )
    s.add_argument(
        "--policy-a", default=None, metavar="DIR|PATH|HUB_ID", help="an align directory, a model folder or a hub id"
    )
    s.add_argument("--policy-b", default=None, metavar="DIR|PATH|HUB_ID", help="the policy it is compared with")
    s.add_argument("--names", default=None, metavar="A,B", help="names for the report (default: folder names)")
    s.set_defaults(func=cmd_winrate)

    s = sub.add_parser(
        "align-compare",
        parents=[common],
        help="one policy per reward model (rl.reward_models), identical settings, then pairwise win-rates",
    )
    s.set_defaults(func=cmd_align_compare)

    s = sub.add_parser(
        "llm-server", add_help=False, help="serve a local chat model over an OpenAI-compatible HTTP API (see --help)"
    )
    s.set_defaults(func=cmd_llm_server)

    s = sub.add_parser(
        "serve",
        parents=[common],
        help="serve a reward model over HTTP and DeploymentHandle with Ray Serve (blocks; Ctrl-C stops)",
    )
    s.add_argument(
        "--model",
        metavar="RUN_DIR|PATH|HUB_ID",
        default=None,
        help="a training run directory (serves RUN_DIR/model with the run's config), a model "
        "folder, a hub id or builtin:minilm (default: model.reward)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("push", help="upload a trained model folder (model card, statistics) to the Hugging Face hub")
    s.add_argument("--model", metavar="RUN_DIR|MODEL_DIR", required=True, help="a training run directory or its model/")
    s.add_argument("--repo", metavar="ORG/NAME", required=True, help="the hub repository (created if missing)")
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument(
        "--token-env", default="HF_TOKEN", help="environment variable holding the hub token (default HF_TOKEN)"
    )
    s.set_defaults(func=cmd_push)

    modelsp = sub.add_parser("models", help="resolve model references (hub id, path, builtin:NAME)")
    models_sub = modelsp.add_subparsers(dest="action", required=True)
    s = models_sub.add_parser("resolve", parents=[common], help="print where each model loads from")
    s.add_argument("refs", nargs="+")
    s.set_defaults(func=cmd_models_resolve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mars-ray`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    args.argv = argv
    func: Callable[..., int] = args.func
    from mars_ray import console

    if getattr(args, "verbose", None):
        console.set_verbose(True)
    console.quiet_libraries()
    from mars_ray.generation.base import GenerationFailed

    try:
        return func(args, extra)
    except UsageError as e:
        print(f"mars-ray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, PermissionError, GenerationFailed) as e:
        # Config, data and model-resolution errors are ValueErrors with fix-it messages.
        print(f"mars-ray: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("mars-ray: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
