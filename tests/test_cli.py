"""The `mars-ray` command through main(argv): outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import yaml
from conftest import PKU, head_lines, write_jsonl

from mars_ray.cli import main, parse_overrides
from mars_ray.config import Config


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_overrides_forms():
    assert parse_overrides(["--mars.tau", "0.5", "--train.lr=2e-5", "--train.lora", "--seed", "3"]) == {
        "mars.tau": "0.5",
        "train.lr": "2e-5",
        "train.lora": "true",
        "seed": "3",
    }
    assert parse_overrides(["--mars.tau", "-1"]) == {"mars.tau": "-1"}


def test_config_show_prints_resolved_yaml(capsys, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("mars: {budget: 7}\n")
    code, out, _ = run(capsys, "config", "show", "--config", str(f), "--mars.tau", "0.3")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["mars"]["tau"] == 0.3 and shown["mars"]["budget"] == 7


def test_config_validate(capsys, tmp_path):
    good = tmp_path / "good.yaml"
    Config.load(overrides={"mars.tau": "2"}).save(tmp_path)
    (tmp_path / "config.yaml").rename(good)
    assert run(capsys, "config", "validate", str(good))[0] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("mars: {tua: 1}\n")
    code, _out, err = run(capsys, "config", "validate", str(bad))
    assert code == 2 and "did you mean mars.tau" in err and len(err.strip().splitlines()) == 1


def test_unknown_override_is_a_one_line_usage_error(capsys):
    code, _, err = run(capsys, "config", "show", "--mars.tua", "1")
    assert code == 2 and err.startswith("mars-ray: error: unknown config key 'mars.tua'")
    code, _, err = run(capsys, "config", "show", "stray")
    assert code == 2 and "unexpected argument" in err


def test_data_prepare_writes_documented_outputs(capsys, tmp_path):
    src = head_lines(PKU, 200, tmp_path / "pku.jsonl")
    with src.open("a") as f:
        f.write('{"prompt": "p", "chosen": "", "rejected": "r"}\nnot json\n')
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys, "data", "prepare", "--data.path", str(src), "--output.dir", str(out_dir), "--data.max_pairs", "150"
    )
    assert code == 0, err
    report = json.loads((out_dir / "data_report.json").read_text())
    assert (
        report["read"] == 202
        and report["quarantined"] == 2
        and report["read"] == report["kept"] + report["quarantined"]
    )
    assert report["selected"] == 150
    assert "read 202 = kept 200 + quarantined 2" in out
    q = [json.loads(ln) for ln in (out_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [x["line"] for x in q] == [201, 202] and all(x["reason"] for x in q)
    table = pq.read_table(out_dir / "pairs.parquet")
    assert table.num_rows == 150 and set(table.column("split").to_pylist()) == {"train", "val", "test"}
    assert Config.load(out_dir / "config.yaml").data.max_pairs == 150
    assert report["lengths"]["limits"] == {"max_prompt_tokens": 512, "max_response_tokens": 192}
    assert report["lengths"]["chosen"]["p50"] > 0

    code, out, _ = run(capsys, "data", "inspect", str(out_dir))
    assert code == 0 and "read 202" in out and "tokens" in out


def test_data_inspect_a_raw_file(capsys, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "p", "chosen": f"a{i}", "rejected": "b"} for i in range(5)] + ["{bad"]
    )
    code, out, _ = run(capsys, "data", "inspect", str(path), "--json", "--data.max_bad_fraction", "0.9")
    info = json.loads(out)
    assert code == 0 and info["read"] == 6 and info["quarantined"] == 1
    assert not (tmp_path / "pairs.parquet").exists()


def test_data_prepare_failure_is_one_line_nonzero(capsys, tmp_path):
    code, _, err = run(
        capsys, "data", "prepare", "--data.path", str(tmp_path / "none.jsonl"), "--output.dir", str(tmp_path / "o")
    )
    assert code == 1 and err.count("\n") == 1 and "file not found" in err


def test_console_script_is_installed_and_reports_errors(tmp_path):
    exe = subprocess.run(
        [sys.executable, "-m", "mars_ray.cli", "config", "show", "--seed", "x"], capture_output=True, text=True
    )
    assert exe.returncode == 2 and "seed" in exe.stderr
