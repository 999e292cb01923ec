"""Property: random malformed rows never crash a reader without a clear message, and no row is lost."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mars_ray.config import DataConfig
from mars_ray.data import DataFileError, read_preferences

text = st.one_of(st.text(max_size=12), st.sampled_from(["", "  ", "same", "\n\nAssistant: x"]))
value = st.one_of(
    text,
    st.none(),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text}), max_size=3),
)
key = st.sampled_from(
    [
        "prompt",
        "chosen",
        "rejected",
        "subset",
        "response_0",
        "response_1",
        "safer_response_id",
        "better_response_id",
        "score_chosen",
        "junk",
    ]
)
row = st.one_of(
    st.dictionaries(key, value, max_size=7),
    st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}),
)
line = st.one_of(
    row.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.sampled_from([b"[1]", b"null", b'"str"', b'{"prompt": ', b"\xff\xfe{}"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(line, min_size=1, max_size=12),
    fmt=st.sampled_from(["auto", "pairs", "hh-rlhf", "pku-saferlhf", "ultrafeedback", "rewardbench"]),
)
def test_random_rows_never_lost_never_unexplained(tmp_path_factory, lines, fmt):
    path = tmp_path_factory.mktemp("prop") / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    n_rows = sum(1 for ln in lines if ln.strip())
    cfg = DataConfig(path=str(path), format=fmt, max_bad_fraction=1.0)
    try:
        res = read_preferences(cfg, seed=0)
    except DataFileError as e:
        assert str(path) in str(e) or "no usable" in str(e) or path.name in str(e)
        return
    r = res.report
    assert r["read"] == n_rows
    assert r["read"] == r["kept"] + r["quarantined"]
    assert res.table.num_rows == r["kept"]
    used_lines = set(res.table.column("source_line").to_pylist())
    bad_lines = {q["line"] for q in res.quarantine}
    assert not used_lines & bad_lines
    assert len(used_lines) + len(bad_lines) == n_rows
    for q in res.quarantine:
        assert q["reason"] and q["field"] and isinstance(q["line"], int)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.one_of(st.text(max_size=8), st.just("\xff")), min_size=1, max_size=4), min_size=1, max_size=8
    )
)
def test_random_csv_rows(tmp_path_factory, rows):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "chosen", "rejected"])
    for r in rows:
        w.writerow(r)
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogateescape").replace("\xff".encode(), b"\xff"))
    cfg = DataConfig(path=str(path), format="pairs", max_bad_fraction=1.0)
    try:
        res = read_preferences(cfg, seed=0)
    except DataFileError as e:
        assert path.name in str(e) or "no usable" in str(e)
        return
    assert res.report["read"] == res.report["kept"] + res.report["quarantined"]
