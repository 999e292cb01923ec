"""Readable reports: PNG plots (matplotlib, headless), a markdown file and a self-contained HTML
file (plots embedded as data URIs) that a person can open without the terminal."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.core.atomic import atomic_path, write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    _plt().close(fig)
    return path


def margin_histogram(margins_by_label: dict[str, np.ndarray], path: Path, title: str = "reward margins") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    allm = (
        np.concatenate([np.asarray(m, dtype=float) for m in margins_by_label.values()])
        if margins_by_label
        else np.zeros(1)
    )
    edges = np.histogram_bin_edges(allm, bins=40)
    for label, m in margins_by_label.items():
        ax.hist(np.asarray(m, dtype=float), bins=edges, alpha=0.55, label=label)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("margin r(x,y+) - r(x,y-)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    if len(margins_by_label) > 1:
        ax.legend()
    return _save(fig, path)


def curvature_plot(bins: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    fig, ax1 = plt.subplots(figsize=(6, 3.6))
    x = [f"{b['abs_margin_lo']:.2f}-{b['abs_margin_hi']:.2f}" for b in bins]
    ax1.plot(x, [b["mean_c"] for b in bins], "o-", color="tab:blue", label="mean c(Δ)")
    ax1.set_xlabel("|margin| bin")
    ax1.set_ylabel("mean c(Δ) = σ(1-σ)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [max(b["min_eig"], 1e-30) for b in bins], "s--", color="tab:red", label="λ_min(Fisher)")
    ax2.set_yscale("log")
    ax2.set_ylabel("λ_min of bin Fisher", color="tab:red")
    ax1.set_title("curvature by |margin| bin")
    ax1.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def sections_plot(sections: dict[str, float], path: Path, title: str = "RewardBench sections") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(sections), list(sections.values()), color="tab:green")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    return _save(fig, path)


def grouped_bars(
    groups: dict[str, dict[str, float]],
    path: Path,
    ylabel: str,
    title: str,
    errors: dict[str, dict[str, float]] | None = None,
) -> Path:
    """``groups[series][category] = value``: one bar per series in each category."""
    plt = _plt()
    series = list(groups)
    cats = sorted({c for g in groups.values() for c in g})
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(cats) + 2), 3.6))
    w = 0.8 / max(1, len(series))
    for k, s in enumerate(series):
        xs = np.arange(len(cats)) + k * w
        ys = [groups[s].get(c, np.nan) for c in cats]
        err = [errors[s].get(c, 0.0) for c in cats] if errors else None
        ax.bar(xs, ys, width=w, label=s, yerr=err, capsize=3 if err else 0)
    ax.set_xticks(np.arange(len(cats)) + 0.4 - w / 2)
    ax.set_xticklabels(cats)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def lines_per_epoch(series: dict[str, dict[int, float]], path: Path, ylabel: str, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, pts in series.items():
        ep = sorted(pts)
        ax.plot(ep, [pts[e] for e in ep], "o-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def allocation_plot(margins: np.ndarray, q: np.ndarray, budget: np.ndarray, path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter(margins, q, s=8, alpha=0.6, label="q (allocation weight)")
    ax.set_xlabel("margin under the previous model")
    ax.set_ylabel("q")
    ax2 = ax.twinx()
    ax2.scatter(margins, budget, s=6, alpha=0.3, color="tab:orange", label="b (synthetic pairs)")
    ax2.set_ylabel("budget b", color="tab:orange")
    ax.set_title(title)
    return _save(fig, path)


def fmt(x: Any, nd: int = 4) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}f}"
    return str(x)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out


def write_markdown_and_html(
    lines: list[str], images: Sequence[Path], out_dir: Path, stem: str, title: str
) -> tuple[Path, Path]:
    """``stem.md`` (images linked by file name) and ``stem.html`` (images embedded)."""
    md = list(lines) + [""] + [f"![{p.stem}]({p.name})" for p in images]
    md_path = out_dir / f"{stem}.md"
    write_text(md_path, "\n".join(md) + "\n")
    body: list[str] = []
    table: list[str] = []

    def flush():
        if table:
            rows = [r.strip().strip("|").split("|") for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            body.append(
                "<table>"
                + "".join(
                    "<tr>"
                    + "".join(
                        f"<{'th' if k == 0 else 'td'}>{html.escape(c.strip())}</{'th' if k == 0 else 'td'}>" for c in r
                    )
                    + "</tr>"
                    for k, r in enumerate(rows)
                )
                + "</table>"
            )
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    for p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}"></figure>')
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;}table{border-collapse:collapse;}"
        "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right;}img{max-width:100%;}"
        "</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    html_path = out_dir / f"{stem}.html"
    write_text(html_path, page)
    return md_path, html_path


def eval_report(result: dict[str, Any], margins: np.ndarray, out_dir: Path) -> tuple[Path, Path]:
    m = result["metrics"]
    lines = [
        f"# Evaluation of {result['model']}",
        "",
        f"- data: {result['data']} ({result['n']} pairs scored, {result['quarantined']} quarantined; "
        f"{result['prompts_cut']} prompts cut from the left, {result['responses_cut']} responses capped)",
        f"- pairwise accuracy (strict >): {fmt(result['accuracy'])}; margin mean {fmt(m['margin_mean'])}, "
        f"std {fmt(m['margin_std'])}, SNR {fmt(result['snr'])}",
        f"- rewards: chosen {fmt(m['chosen_mean'])} ± {fmt(m['chosen_std'])}, rejected {fmt(m['rejected_mean'])} ± {fmt(m['rejected_std'])}",
        "",
        "## Accuracy by length (tokens of the longer sequence)",
        "",
    ]
    lines += md_table(
        ["tokens", "pairs", "accuracy"], [[b["tokens"], b["n"], b["accuracy"]] for b in result["by_length"]]
    )
    images = [margin_histogram({"margins": margins}, out_dir / "margins.png")]
    if result.get("sections"):
        lines += [
            "",
            "## RewardBench",
            "",
            f"- sections covered: {', '.join(result['sections_covered'])}; "
            f"mean of the covered sections {fmt(result['sections_average'])}",
        ]
        lines += md_table(
            ["section", "accuracy", "all its subsets present"],
            [[k, v, result["sections_complete"][k]] for k, v in result["sections"].items()],
        )
        lines += ["", "### Subsets", ""] + md_table(
            ["subset", "pairs", "accuracy"], [[k, v["n"], v["accuracy"]] for k, v in result["subsets"].items()]
        )
        images.append(sections_plot(result["sections"], out_dir / "sections.png"))
    lines += ["", "## Curvature by |margin| bin", ""]
    lines += md_table(
        ["bin", "pairs", "|Δ| range", "mean c(Δ)", "λ_min(Fisher)", "λ_max(Fisher)"],
        [
            [
                b["bin"],
                b["n"],
                f"{b['abs_margin_lo']:.3f}-{b['abs_margin_hi']:.3f}",
                b["mean_c"],
                f"{b['min_eig']:.3e}",
                f"{b['max_eig']:.3e}",
            ]
            for b in result["curvature"]
        ],
    )
    images.append(curvature_plot(result["curvature"], out_dir / "curvature.png"))
    return write_markdown_and_html(lines, images, out_dir, "eval", f"eval {result['model']}")


def compare_report(result: dict[str, Any], trials: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """Plots and the markdown/HTML report of `mars-ray compare`."""
    lines = [
        f"# MARS compare: {', '.join(result['strategies'])}",
        "",
        f"- data {result['data']}; budget {result['budget']} per epoch; {result['epochs']} epoch(s); "
        f"seeds {result['seeds']}; {result['trials']} runs",
        "- mean ± std over seeds (sample std); test = the held-out split of the same data",
        "",
        result["table_md"],
        "",
        "## Paired differences across seeds",
        "",
        "Positive = the strategy is ahead. p: two-sided paired t-test over seeds; CI: its 95% t-interval "
        "(excludes 0 exactly when p < 0.05).",
        "",
    ]
    rows = [
        [
            v["strategy"],
            v["reference"],
            v["metric"],
            v["mean_diff"],
            v["std_diff"],
            v["p_value"],
            f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
            v["n"],
        ]
        for v in result["paired"].values()
    ]
    lines += md_table(["strategy", "vs", "metric", "mean diff", "std", "p", "95% CI", "seeds"], rows)
    if result.get("paired_pairs"):
        lines += [
            "",
            "## Secondary: pair-level paired bootstrap on the held-out files",
            "",
            "Held-out pairs resampled with replacement (the same pairs for both arms), accuracy difference "
            "averaged over seeds; 95% percentile interval.",
            "",
        ]
        lines += md_table(
            ["strategy", "vs", "held-out", "mean diff", "95% CI", "pairs", "seeds"],
            [
                [
                    v["strategy"],
                    v["reference"],
                    v["heldout"],
                    v["mean_diff"],
                    f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
                    v["n_pairs"],
                    v["n_seeds"],
                ]
                for v in result["paired_pairs"].values()
            ],
        )
    images = []
    for metric, label in (("val_accuracy", "validation accuracy"), ("val_snr", "validation margin SNR")):
        series: dict[str, dict[int, float]] = {}
        for s in result["strategies"]:
            per_epoch: dict[int, list[float]] = {}
            for t in trials:
                if t["strategy"] != s:
                    continue
                for r in t["epochs"]:
                    if r.get(metric) is not None:
                        per_epoch.setdefault(int(r["epoch"]), []).append(float(r[metric]))
            series[s] = {e: float(np.mean(v)) for e, v in per_epoch.items()}
        images.append(
            lines_per_epoch(series, out_dir / f"{metric}_per_epoch.png", label, f"{label} per epoch (mean over seeds)")
        )
    groups = {
        s: {m: result["table"][s][m]["mean"] for m in result["metrics"] if m.endswith("accuracy")}
        for s in result["strategies"]
    }
    errs = {
        s: {
            m: (result["table"][s][m]["std"] if np.isfinite(result["table"][s][m]["std"]) else 0.0)
            for m in result["metrics"]
            if m.endswith("accuracy")
        }
        for s in result["strategies"]
    }
    images.append(
        grouped_bars(
            groups, out_dir / "accuracy_by_strategy.png", "accuracy", "final accuracy (± std over seeds)", errs
        )
    )
    sections: dict[str, dict[str, float]] = {}
    for t in trials:
        for name, res in t["heldout"].items():
            for sec, v in (res.get("sections") or {}).items():
                sections.setdefault(t["strategy"], {}).setdefault(f"{name}:{sec}", []).append(v)  # type: ignore[arg-type]
    if sections:
        images.append(
            grouped_bars(
                {s: {k: float(np.mean(v)) for k, v in d.items()} for s, d in sections.items()},
                out_dir / "heldout_sections.png",
                "accuracy",
                "RewardBench sections of the held-out files",
            )
        )
    return write_markdown_and_html(lines, images, out_dir, "compare", "MARS compare")


def run_report(run_dir: Path) -> tuple[Path, Path]:
    """The report of one `mars-ray train` run: metrics per epoch, the allocation (q and budget vs
    margin) and the margin distribution under each epoch's scoring model."""
    import json

    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    strategy = rows[0]["strategy"] if rows else "?"
    lines = [f"# MARS run: {strategy}", "", f"- run directory: {run_dir}", ""]
    cols = [
        c
        for c in (
            "epoch",
            "train_pairs",
            "synthetic",
            "budget_unspent",
            "val_accuracy",
            "val_snr",
            "test_accuracy",
            "test_snr",
            "augment_s",
            "train_s",
        )
        if rows and c in rows[0]
    ]
    lines += md_table(cols, [[r.get(c) for c in cols] for r in rows])
    diag_rows = []
    for f in sorted(run_dir.glob("epochs/*/augment_summary.json")):
        d = json.loads(f.read_text()).get("diagnostics")
        if d:
            diag_rows.append(
                [
                    int(f.parent.name),
                    d.get("ess_ratio"),
                    d.get("margin_std"),
                    d.get("budget_share_misranked"),
                    d.get("budget_share_lowest_decile"),
                    d.get("max_budget"),
                    d.get("gate_pass_rate"),
                ]
            )
    if diag_rows:
        lines += [
            "",
            "## Allocation per epoch",
            "",
            "ESS/N: effective sample size of q relative to the number of pairs (1 = uniform).",
            "",
        ]
        lines += md_table(
            ["epoch", "ESS/N", "margin std", "budget on mis-ranked", "budget on lowest decile", "max b_i", "gate pass"],
            diag_rows,
        )
    audits = [
        (int(f.parent.name), json.loads(f.read_text()).get("audit"))
        for f in sorted(run_dir.glob("epochs/*/augment_summary.json"))
    ]
    audits = [(ep, a) for ep, a in audits if a and a.get("operations")]
    if audits:
        from mars_ray.core.audit import examples_markdown, operations_markdown

        lines += [
            "",
            "## Synthetic data audit",
            "",
            "Every generated text by operation: kept, passed the gates but not needed, failed, or rejected "
            "(by reason). Then random kept synthetic pairs of the last epoch beside their human pairs.",
        ]
        for ep, a in audits:
            table = operations_markdown(a["operations"])
            lines += ["", f"Epoch {ep}:", ""] + table
        lines += [""] + examples_markdown(audits[-1][1].get("examples", []))
    images = []
    if rows:
        images.append(
            lines_per_epoch(
                {
                    "validation": {r["epoch"]: r["val_accuracy"] for r in rows if r.get("val_accuracy") is not None},
                    "test": {r["epoch"]: r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None},
                },
                run_dir / "accuracy_per_epoch.png",
                "accuracy",
                f"{strategy}: accuracy per epoch",
            )
        )
        images.append(
            lines_per_epoch(
                {"validation": {r["epoch"]: r["val_snr"] for r in rows if r.get("val_snr") is not None}},
                run_dir / "snr_per_epoch.png",
                "margin SNR",
                f"{strategy}: SNR per epoch",
            )
        )
    margins: dict[str, np.ndarray] = {}
    for alloc in sorted(run_dir.glob("epochs/*/allocation.parquet")):
        t = pq.read_table(alloc)
        ep = int(alloc.parent.name)
        if "margin" in t.column_names:
            margins[f"epoch {ep} (model r{ep - 1})"] = t.column("margin").to_numpy()
            if (
                "q" in t.column_names
                and "budget" in t.column_names
                and ep == max(int(p.parent.name) for p in run_dir.glob("epochs/*/allocation.parquet"))
            ):
                images.append(
                    allocation_plot(
                        t.column("margin").to_numpy(),
                        t.column("q").to_numpy(),
                        t.column("budget").to_numpy(),
                        run_dir / "allocation.png",
                        f"allocation at epoch {ep}",
                    )
                )
    if margins:
        first, last = list(margins)[0], list(margins)[-1]
        images.append(
            margin_histogram(
                {k: margins[k] for k in dict.fromkeys([first, last])},
                run_dir / "margins.png",
                "training-pair margins: first vs last scoring model",
            )
        )
    return write_markdown_and_html(lines, images, run_dir, "report", f"MARS run {strategy}")


def sweep_report(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    metric = result["metric"]
    keys = list(result["space"])
    lines = [
        f"# MARS sweep over {', '.join(keys)}",
        "",
        f"- metric {metric} ({result['mode']}); best {result['best']['overrides']} -> {fmt(result['best'][metric])}",
        f"- best config: {result['best_config']} (`mars-ray train --config {result['best_config']}`)",
        "",
    ]
    rows = sorted(
        result["trials"],
        key=lambda r: (r[metric] is None, -(r[metric] or 0) if result["mode"] == "max" else (r[metric] or 0)),
    )
    lines += md_table(
        [*keys, metric, "val_snr", "epochs reported", "error"],
        [
            [r["overrides"].get(k) for k in keys] + [r[metric], r["val_snr"], r["epochs_reported"], r["error"] or ""]
            for r in rows
        ],
    )
    images = []
    plt = _plt()
    for k in keys:
        pts = [(r["overrides"].get(k), r[metric]) for r in rows if r[metric] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = [p[0] for p in pts]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [p[1] for p in pts])
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {k}")
        images.append(_save(fig, out_dir / f"sweep_{k.replace('.', '_')}.png"))
    return write_markdown_and_html(lines, images, out_dir, "sweep", "MARS sweep")
