"""The training command line: flag syntax, types, presets, validation, and the entry point's errors
and --help."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastgpt.config import PRESETS, TrainConfig, parse_train_args

from fastgpt.cli import UserError, parse_flags


def parse(*argv: str, cuda: bool = False) -> TrainConfig:
    return parse_train_args(list(argv), cuda_available=cuda)[0]


# ---------------------------------------------------------------------------------------------------
# flag syntax and types


@pytest.mark.parametrize("argv", [["--n_layer=3"], ["--n_layer", "3"], ["--n-layer=3"]])
def test_key_value_forms(argv):
    cfg, given = parse_train_args(argv, cuda_available=False)
    assert cfg.n_layer == 3
    assert given == {"n_layer"}


def test_values_are_converted_to_the_field_types():
    cfg = parse("--learning_rate=3e-4", "--out_dir", "runs/a b", "--seed=-5", "--dropout", "0.1", "--device=cpu")
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.out_dir == "runs/a b"
    assert cfg.seed == -5 and isinstance(cfg.seed, int)
    assert cfg.dropout == 0.1
    assert cfg.device == "cpu"


def test_a_value_may_contain_equals_signs():
    assert parse("--data_file=a=b.txt").data_file == "a=b.txt"


@pytest.mark.parametrize("argv, expected", [
    (["--bias"], True), (["--no-bias"], False), (["--no_bias"], False),
    (["--bias=true"], True), (["--bias=false"], False), (["--bias=False"], False), (["--bias=0"], False),
    (["--bias=1"], True), (["--bias=yes"], True), (["--bias=off"], False),
    (["--bias", "--no-bias"], False), (["--no-bias", "--bias"], True),  # the last one wins
])
def test_bool_flags(argv, expected):
    assert parse(*argv).bias is expected


def test_no_flag_turns_off_a_default_true():
    assert PRESETS["cpu"].decay_lr is True
    assert parse("--no-decay_lr").decay_lr is False


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--compile"], True), (["--no-compile"], False), (["--compile=none"], None),
    (["--compile=None"], None), (["--compile=false"], False),
])
def test_optional_bool(argv, expected):
    assert parse(*argv).compile is expected


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--attn_window=None"], None), (["--attn_window=none"], None), (["--attn_window=32"], 32),
    (["--attn_window", "1"], 1),
])
def test_attn_window_none_or_int(argv, expected):
    assert parse(*argv).attn_window == expected


def test_parse_flags_returns_a_copy_and_the_given_names():
    defaults = TrainConfig(n_layer=2)
    cfg, given = parse_flags(TrainConfig, ["--n_embd=64", "--bias", "--max_iters", "7"], defaults)
    assert (cfg.n_layer, cfg.n_embd, cfg.bias, cfg.max_iters) == (2, 64, True, 7)
    assert given == {"n_embd", "bias", "max_iters"}
    assert defaults == TrainConfig(n_layer=2)  # untouched


# ---------------------------------------------------------------------------------------------------
# presets


def test_default_preset_is_cpu_without_cuda():
    cfg, given = parse_train_args([], cuda_available=False)
    assert cfg == PRESETS["cpu"]
    assert given == set()


def test_default_preset_is_shakespeare_char_with_cuda():
    assert parse(cuda=True) == PRESETS["shakespeare_char"]


@pytest.mark.parametrize("argv", [["--preset=shakespeare_char"], ["--preset", "shakespeare_char"]])
def test_shakespeare_char_preset_is_nanogpts(argv):
    cfg = parse(*argv)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (6, 6, 384)
    assert (cfg.block_size, cfg.batch_size, cfg.dropout) == (256, 64, 0.2)
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters) == (1e-3, 1e-4, 100)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.99, 0.1, 1.0)
    assert (cfg.max_iters, cfg.lr_decay_iters) == (5000, 5000)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.log_interval) == (250, 200, 10)
    assert cfg.gradient_accumulation_steps == 1 and cfg.bias is False


def test_cpu_preset_is_nanogpts_cpu_recipe():
    cfg = parse("--preset=cpu", cuda=True)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (4, 4, 128)
    assert (cfg.block_size, cfg.batch_size, cfg.dropout) == (64, 12, 0.0)
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.eval_iters) == (2000, 2000, 20)


def test_flags_override_the_preset_wherever_it_is_given():
    for argv in (["--preset=shakespeare_char", "--n_layer=2"], ["--n_layer=2", "--preset=shakespeare_char"]):
        cfg, given = parse_train_args(argv, cuda_available=False)
        assert cfg == dataclasses.replace(PRESETS["shakespeare_char"], n_layer=2)
        assert given == {"n_layer"}


def test_presets_are_not_modified_by_parsing():
    before = dataclasses.replace(PRESETS["cpu"])
    parse("--n_layer=1", "--bias")
    assert PRESETS["cpu"] == before


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], r"unknown flag --nope; see --help"),
    (["--layer=2"], r"unknown flag --layer \(did you mean --n_layer\?\)"),
    (["--no-bias=1"], r"unknown flag --no-bias \(did you mean --bias\?\)"),
    (["--no-n_layer"], r"unknown flag --no-n_layer"),
    (["n_layer=2"], r"unexpected argument 'n_layer=2': flags look like --key=value"),
    (["--bias", "false"], r"unexpected argument 'false'"),
    (["--n_layer"], r"--n_layer needs a value: --n_layer=VALUE"),
    (["--n_layer=two"], r"--n_layer takes an integer, got 'two'"),
    (["--n_layer=1.5"], r"--n_layer takes an integer, got '1.5'"),
    (["--n_layer="], r"--n_layer takes an integer, got ''"),
    (["--learning_rate=fast"], r"--learning_rate takes a number, got 'fast'"),
    (["--bias=maybe"], r"--bias takes true or false, got 'maybe'"),
    (["--attn_window=wide"], r"--attn_window takes an integer, got 'wide'"),
    (["--preset=gpt2"], r"unknown preset 'gpt2': choose one of shakespeare_char, cpu"),
    (["--preset"], r"unknown preset ''"),
])
def test_bad_flags_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv, cuda_available=False)


@pytest.mark.parametrize("argv, message", [
    (["--n_embd=100", "--n_head=3"], r"--n_embd=100 must be a multiple of --n_head=3"),
    (["--learning_rate=-1e-3"], r"--learning_rate > 0"),
    (["--learning_rate=0"], r"--learning_rate > 0"),
    (["--min_lr=-1"], r"0 <= --min_lr <= --learning_rate"),
    (["--min_lr=0.1", "--learning_rate=0.01"], r"0 <= --min_lr <= --learning_rate"),
    (["--n_layer=0"], r"--n_layer must be >= 1, got 0"),
    (["--batch_size=-2"], r"--batch_size must be >= 1, got -2"),
    (["--block_size=0"], r"--block_size must be >= 1"),
    (["--eval_interval=0"], r"--eval_interval must be >= 1"),
    (["--gradient_accumulation_steps=0"], r"--gradient_accumulation_steps must be >= 1"),
    (["--max_iters", "-1"], r"--max_iters must be >= 0, got -1"),
    (["--warmup_iters=-1"], r"--warmup_iters must be >= 0"),
    (["--sample_chars=-1"], r"--sample_chars must be >= 0"),
    (["--dropout=1"], r"--dropout must be in \[0, 1\), got 1.0"),
    (["--dropout=-0.1"], r"--dropout must be in \[0, 1\)"),
    (["--dropout=nan"], r"--dropout must be a finite number, got nan"),
    (["--attn_window=0"], r"--attn_window must be >= 1 or None, got 0"),
    (["--pad_vocab=0"], r"--pad_vocab must be between 1 and 4096, got 0"),
    (["--pad_vocab=5000"], r"--pad_vocab must be between 1 and 4096, got 5000"),
    (["--grad_clip=-1"], r"--grad_clip and --weight_decay must be >= 0"),
    (["--weight_decay=-0.1"], r"--grad_clip and --weight_decay must be >= 0"),
    (["--dtype=float8"], r"--dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
    (["--device=tpu"], r"--device must be auto, cpu, mps, cuda or cuda:N, got 'tpu'"),
    (["--device=cuda:x"], r"--device must be auto, cpu, mps, cuda or cuda:N"),
    (["--compile_mode=fast"], r"--compile_mode must be one of default, reduce-overhead, max-autotune, "
                              r"max-autotune-no-cudagraphs, got 'fast'"),
])
def test_invalid_values_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv, cuda_available=False)


@pytest.mark.parametrize("argv", [["--learning_rate=nan"], ["--grad_clip=nan"], ["--weight_decay=nan"]])
def test_nan_values_are_user_errors(argv):
    with pytest.raises(UserError):
        parse_train_args(argv, cuda_available=False)


@pytest.mark.parametrize("argv", [["--device=cpu"], ["--device=cuda"], ["--device=cuda:1"], ["--attn_window=1"],
                                  ["--min_lr=0.001"], ["--min_lr=0"], ["--grad_clip=0"], ["--max_iters=0"],
                                  ["--dropout=0.99"], ["--dtype=bfloat16"], ["--dtype=float16"],
                                  ["--n_head=1", "--n_embd=7"]])
def test_edge_values_are_accepted(argv):
    parse_train_args(argv, cuda_available=False)


# ---------------------------------------------------------------------------------------------------
# the entry point


def test_train_cli_reports_a_bad_flag_in_one_line(cli):
    r = cli("fastgpt.train", "--nope=1")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["fastgpt.train: error: unknown flag --nope; see --help for the list"]
    assert r.stdout == ""


def test_train_cli_help_lists_every_field_with_its_default(cli):
    r = cli("fastgpt.train", "--help")
    assert r.returncode == 0, r.stderr
    defaults = PRESETS["shakespeare_char" if torch.cuda.is_available() else "cpu"]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("usage: python -m fastgpt.train")
    assert "--preset NAME" in r.stdout and "shakespeare_char, cpu" in r.stdout
    for field in dataclasses.fields(TrainConfig):
        flag = f"--[no-]{field.name}" if field.type in ("bool", "bool | None") else f"--{field.name}"
        matching = [line for line in lines if line.split()[:1] == [flag]]
        assert len(matching) == 1, f"{flag} not listed once in --help"
        assert matching[0].endswith(f"(default: {getattr(defaults, field.name)!r})")


@pytest.mark.parametrize("module", ["fastgpt.train", "fastgpt.sample", "fastgpt.export", "fastgpt.attention_maps",
                                    "fastgpt.compare", "fastgpt.plot"])
def test_every_entry_point_shows_help_through_one_parser(module, cli):
    result = cli(module, "--help")
    assert result.returncode == 0 and result.stderr == "" and f"python -m {module}" in result.stdout
