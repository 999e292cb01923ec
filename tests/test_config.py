from __future__ import annotations

import pytest
import yaml

from mars_ray.config import Config, keys, read_yaml


def test_defaults_validate_and_have_the_documented_keys():
    cfg = Config().validate()
    for k in (
        "data.path",
        "data.format",
        "data.max_pairs",
        "output.dir",
        "mars.strategy",
        "mars.tau",
        "mars.budget",
        "mars.epochs",
        "seed",
        "train.lr",
        "deepspeed.stage",
        "serve.port",
        "tune.space",
    ):
        assert k in keys()
    assert cfg.mars.tau == 0.5 and cfg.train.lr == 5e-4
    assert cfg.data.max_prompt_tokens == 512 and cfg.data.max_response_tokens == 192


def test_precedence_defaults_file_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: 3\nmars: {tau: 1.5, budget: 10}\ntrain: {lr: 1.0e-4}\n")
    cfg = Config.load(f, {"mars.tau": "0.25"})
    assert cfg.seed == 3
    assert cfg.mars.tau == 0.25  # override beats file
    assert cfg.mars.budget == 10  # file beats default
    assert cfg.train.lr == 1e-4
    assert cfg.mars.epochs == Config().mars.epochs  # untouched default


def test_unknown_key_says_did_you_mean(tmp_path):
    with pytest.raises(ValueError, match=r"did you mean mars\.tau"):
        Config.load(overrides={"mars.tua": "1"})
    f = tmp_path / "bad.yaml"
    f.write_text("trian: {lr: 0.1}\n")
    with pytest.raises(ValueError, match=r"unknown config key 'trian.lr'.*train\.lr"):
        Config.load(f)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("mars.strategy", "marss", r"did you mean 'mars'"),
        ("train.lr", "fast", "expected a number"),
        ("mars.budget", "1.5", "expected an integer"),
        ("train.lora", "maybe", "true or false"),
        ("data.val_fraction", "1.5", r"must be in \[0, 1\)"),
        ("mars.tau", "0", "must be > 0"),
    ],
)
def test_bad_values_are_errors_never_silently_changed(key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        Config.load(overrides={key: value})


def test_cross_field_messages_say_how_to_fix():
    with pytest.raises(ValueError, match="leaves no training data"):
        Config.load(overrides={"data.val_fraction": "0.5", "data.test_fraction": "0.5"})
    with pytest.raises(ValueError, match="data.columns with prompt, chosen and rejected"):
        Config.load(overrides={"data.format": "generic"})
    with pytest.raises(ValueError, match="deepspeed.enabled needs train.num_workers"):
        Config.load(overrides={"deepspeed.enabled": "true", "train.num_workers": "0"})


def test_text_values_for_string_fields_stay_verbatim():
    cfg = Config.load(overrides={"output.dir": "007", "data.tokenizer": "null", "data.path": "yes"})
    assert cfg.output.dir == "007" and cfg.data.path == "yes"
    assert cfg.data.tokenizer is None
    cfg = Config.load(overrides={"data.columns": "{prompt: q, chosen: a, rejected: b}", "data.format": "generic"})
    assert cfg.data.columns == {"prompt": "q", "chosen": "a", "rejected": "b"}


def test_saved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = Config.load(overrides={"mars.tau": "0.7", "tune.space": "{mars.tau: [0.1, 1.0]}"})
    path = cfg.save(tmp_path)
    again = Config.load(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert yaml.safe_load(path.read_text())["mars"]["tau"] == 0.7
    assert Config().hash() != cfg.hash()


def test_tune_space_keys_are_checked():
    with pytest.raises(ValueError, match="tune.space: unknown config key 'mars.tauu'"):
        Config.load(overrides={"tune.space": "{mars.tauu: [1, 2]}"})


def test_read_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match=f"{bad}: invalid YAML"):
        read_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        read_yaml(lst)


def test_sections_cannot_be_assigned_whole():
    with pytest.raises(ValueError, match="is a section"):
        Config.load(overrides={"mars": "1"})


def test_exponent_floats_parse_on_the_command_line_and_in_yaml(tmp_path):
    from mars_ray.config import Config

    assert Config.load(overrides={"train.lr": "1e-3"}).train.lr == 0.001
    (tmp_path / "c.yaml").write_text("train:\n  lr: 2E-5\nmars:\n  tau: 1e1\n")
    c = Config.load(tmp_path / "c.yaml")
    assert c.train.lr == 2e-5 and c.mars.tau == 10.0
    assert Config.load(overrides={"mars.budget": "12"}).mars.budget == 12  # ints stay ints


def test_generation_batch_size_auto_follows_the_actors_device():
    from mars_ray.config import GENERATION_BATCH_AUTO

    cfg = Config.load(overrides={"paraphrase.batch_size": "auto", "rewrite.batch_size": "16"})
    assert cfg.paraphrase.batch(0) == 32 and cfg.paraphrase.batch(1.0) == GENERATION_BATCH_AUTO
    assert cfg.rewrite.batch(1.0) == 16  # a number is kept as it is
    with pytest.raises(ValueError, match="batch_size"):
        Config.load(overrides={"paraphrase.batch_size": "big"})


def test_openai_batches_fill_the_endpoints_requests_in_flight():
    """Issue 39, defect 11: an actor sends one batch at a time, so a batch smaller than
    `concurrency` capped the requests in flight at batch_size (32)."""
    from mars_ray.config import RewriteConfig

    assert RewriteConfig(backend="openai", concurrency=256, batch_size=32).batch(0) == 256
    assert RewriteConfig(backend="openai", concurrency=4, batch_size=32).batch(0) == 32
    assert RewriteConfig(backend="local", concurrency=256, batch_size=32).batch(1) == 32


def test_bank_actors_must_be_positive():
    cfg = Config()
    cfg.bank.actors = 0
    with pytest.raises(ValueError, match="bank.actors=0 must be >= 1"):
        cfg.validate()
