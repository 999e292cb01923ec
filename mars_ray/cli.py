"""The ``mars-ray`` command. ``main(argv) -> int`` is the testable entry point.

Every command takes ``--config FILE.yaml`` and dotted overrides (``--mars.tau 0.5`` or
``--mars.tau=0.5``) on top of the defaults, validates the result, and exits non-zero with a
one-line reason on stderr when it cannot do its job. Heavy imports happen inside commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

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
                print(f"  {col:9s} tokens  p50 {stats['p50']:5d}  p90 {stats['p90']:5d}  p99 {stats['p99']:5d}  max {stats['max']:5d}")
        if info.get("lengths"):
            ln = info["lengths"]
            print(f"  over limits: {ln['prompt_left_truncated']} prompts left-truncated, {ln['response_capped']} pairs with a capped response (none dropped)")
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
    pq.write_table(res.synthetic, out / "synthetic.parquet")
    pq.write_table(res.per_pair, out / "allocation.parquet")
    res.summary["data"] = {k: data.report[k] for k in ("read", "kept", "quarantined", "selected")}
    (out / "augment_summary.json").write_text(json.dumps(res.summary, indent=2, default=float) + "\n", encoding="utf-8")
    md = summary_markdown(res.summary)
    (out / "augment_summary.md").write_text(md, encoding="utf-8")
    print(md, end="")
    print(f"wrote {out / 'synthetic.parquet'} ({res.synthetic.num_rows} synthetic pairs)")
    return EXIT_OK


def cmd_train(args, extra) -> int:
    from mars_ray.pipeline import load_run_config, run_mars

    if args.resume:
        cfg = load_run_config(args.resume)
        overrides = parse_overrides(extra)
        if args.ray_address:
            overrides["resources.ray_address"] = args.ray_address
        bad = [k for k in overrides if not k.startswith("resources.")]
        if bad:
            raise UsageError(f"--resume continues a run with its own config; only resources.* may change (got {', '.join(bad)})")
        for k, v in overrides.items():
            cfg.set(k, v, source="command line", from_text=True)
        cfg.output.dir = str(Path(args.resume))
        cfg.validate()
    else:
        cfg = build_config(args, extra)
    summary = run_mars(cfg, resume=bool(args.resume))
    final = summary.get("final", {})
    print(f"done: {summary['strategy']}, {summary['epochs']} epoch(s), val_accuracy {final.get('val_accuracy')}, "
          f"test_accuracy {final.get('test_accuracy')}; model {summary['model']}; metrics {summary['run_dir']}/metrics.jsonl")
    return EXIT_OK


def cmd_llm_server(args, extra) -> int:
    from mars_ray.models.openai_server import main as server_main

    return server_main(list(extra))


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

    s = sub.add_parser("train", parents=[common],
                       help="the T-epoch MARS loop (or a baseline): augment, train, evaluate; writes a run directory")
    s.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a killed run from its last finished epoch (and Ray Train checkpoint)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("llm-server", add_help=False,
                       help="serve a local chat model over an OpenAI-compatible HTTP API (see --help)")
    s.set_defaults(func=cmd_llm_server)

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
    func: Callable[..., int] = args.func
    try:
        return func(args, extra)
    except UsageError as e:
        print(f"mars-ray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, PermissionError) as e:
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
