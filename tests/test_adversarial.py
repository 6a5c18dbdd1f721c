"""Hostile files and careless hands, by family: nothing a command did not create is replaced without being
asked, a run writes only under the out_dir it was given, and what is read is validated before it is used
(a damaged checkpoint ends in one line, never in a crash inside the optimizer)."""

from __future__ import annotations

import importlib
import json
import os
import zlib

import numpy as np
import pytest
import torch

from fastgpt import export, train
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.files import out_dir_lock
from fastgpt.cli import UserError

from conftest import SMALL_TRAINER as TINY, tiny_flags


def resume(out, small_corpus, tmp_path, *extra):
    return train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", "--resume",
                       "--max_iters=12", *extra])


# ---------------------------------------------------------------------------------------------------
# nothing replaced without being asked


@pytest.mark.parametrize("fmt, victim", [("nanogpt", "ckpt.pt"), ("fastgpt", "best.pt"), ("hf", "best.pt")])
def test_export_never_replaces_files_it_did_not_create(trained, tmp_path, fmt, victim):
    source, extra = trained / "best.pt", []
    if fmt == "fastgpt":
        assert export.main([f"--checkpoint={source}", "--format=nanogpt", f"--out={tmp_path / 'nano'}"]) == 0
        source, extra = tmp_path / "nano" / "ckpt.pt", [f"--meta={tmp_path / 'nano' / 'meta.pkl'}"]
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="already holds .*--force"):
        export.main([f"--checkpoint={source}", f"--format={fmt}", f"--out={trained}", *extra])
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    assert victim in before
    assert export.main([f"--checkpoint={source}", f"--format={fmt}", f"--out={trained}", "--force", *extra]) == 0


def test_export_refuses_an_out_folder_a_run_is_training_into(trained, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    with out_dir_lock(target):
        with pytest.raises(UserError, match="in use by fastgpt.train process"):
            export.main([f"--checkpoint={trained / 'best.pt'}", "--format=nanogpt", f"--out={target}"])
    assert not (target / "ckpt.pt").exists()


@pytest.mark.parametrize("left", ["best.pt", "metrics.jsonl"])
def test_a_new_run_refuses_a_folder_holding_what_a_run_writes(trained, small_corpus, tmp_path, left):
    for name in ("ckpt.pt", "best.pt", "metrics.jsonl"):
        if name != left:
            (trained / name).unlink()
    before = (trained / left).read_bytes()
    args = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={trained}", *TINY, "--max_iters=2"]
    with pytest.raises(UserError, match=f"{left} holds an earlier run.*--overwrite"):
        train.main(args)
    assert (trained / left).read_bytes() == before
    assert train.main([*args, "--overwrite"]) == 0


def test_resume_writes_where_it_read_not_where_the_checkpoint_says(trained, small_corpus, tmp_path):
    ckpt = load_checkpoint(trained / "ckpt.pt")
    ckpt["train_config"]["out_dir"] = str(tmp_path / "elsewhere" / ".." / ".." / "x")
    save_checkpoint(trained / "ckpt.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    assert resume(trained, small_corpus, tmp_path) == 0
    assert load_checkpoint(trained / "ckpt.pt")["iter_num"] == 12
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path.parent / "x").exists()


def test_metrics_are_replaced_whole_on_resume(trained, small_corpus, tmp_path, monkeypatch):
    """A kill while metrics.jsonl is rewritten leaves the old file, not an empty one: the rewrite is a
    new file renamed over it. Here the rename never happens (the process "dies" just before it)."""
    before = (trained / "metrics.jsonl").read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        resume(trained, small_corpus, tmp_path)
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_metrics_with_invalid_utf8_resume(trained, small_corpus, tmp_path):
    with open(trained / "metrics.jsonl", "ab") as f:
        f.write(b'{"iter": 3, "loss": "\xff\xfe"}\n')
    assert resume(trained, small_corpus, tmp_path) == 0


# ---------------------------------------------------------------------------------------------------
# damaged checkpoints: validated before anything is loaded


def damage(out, change):
    ckpt = load_checkpoint(out / "ckpt.pt")
    change(ckpt)
    save_checkpoint(out / "ckpt.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})


def first_moment(ckpt):
    return next(iter(ckpt["optimizer"]["state"].values()))


DAMAGES = {
    "moment too small": lambda c: first_moment(c).update(exp_avg=first_moment(c)["exp_avg"].flatten()[:3]),
    "moment too large": lambda c: first_moment(c).update(exp_avg_sq=torch.zeros(4096, 4096)),
    "moment non-finite": lambda c: first_moment(c)["exp_avg"].fill_(float("nan")),
    "moment not a tensor": lambda c: first_moment(c).update(exp_avg=[1.0]),
    "unknown parameter": lambda c: c["optimizer"]["state"].update({999: {}}),
    "groups missing": lambda c: c["optimizer"].update(param_groups=[]),
    "optimizer not a dict": lambda c: c.update(optimizer=[1, 2]),
    "weight of another shape": lambda c: c["model"].update({k: torch.zeros(3) for k in list(c["model"])[:1]}),
    "weight missing": lambda c: c["model"].pop(next(iter(c["model"]))),
    "NaN weights": lambda c: next(iter(c["model"].values())).fill_(float("nan")),
    "integer weights": lambda c: c["model"].update({k: v.long() for k, v in list(c["model"].items())[:1]}),
    "iter_num negative": lambda c: c.update(iter_num=-5),
    "iter_num a string": lambda c: c.update(iter_num="7"),
    "best_val_loss NaN": lambda c: c.update(best_val_loss=float("nan")),
    "rng of the wrong size": lambda c: c["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8)),
    "rng not a tensor": lambda c: c["rng"][0].update(torch="x"),
    "batch stream damaged": lambda c: c["rng"][0].update(batches=torch.zeros(2, dtype=torch.uint8)),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_in_one_line_and_left_alone(trained, small_corpus, tmp_path, name):
    damage(trained, DAMAGES[name])
    before = (trained / "ckpt.pt").read_bytes()
    with pytest.raises(UserError) as refused:
        resume(trained, small_corpus, tmp_path)
    assert "\n" not in str(refused.value) and "ckpt.pt" in str(refused.value) or "checkpoint" in str(refused.value)
    assert (trained / "ckpt.pt").read_bytes() == before


def test_fine_tuning_refuses_weights_of_another_shape(trained, small_corpus, tmp_path):
    """Only the vocabulary may grow under --init_from: a position table whose shape is not the one the
    checkpoint's own config describes is refused, not half loaded."""
    best = load_checkpoint(trained / "best.pt")
    best["model"]["transformer.wpe.weight"] = best["model"]["transformer.wpe.weight"][:5]
    save_checkpoint(tmp_path / "tampered.pt", {k: v for k, v in best.items() if k not in ("format", "version")})
    args = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *TINY, "--max_iters=2"]
    with pytest.raises(UserError, match="wpe.weight has shape \\(5, 16\\), which does not fit \\(8, 16\\)"):
        train.main([*args, f"--out_dir={tmp_path / 'ft'}", f"--init_from={tmp_path / 'tampered.pt'}"])
    assert train.main([*args, f"--out_dir={tmp_path / 'ft2'}", f"--init_from={trained / 'best.pt'}"]) == 0


# ---------------------------------------------------------------------------------------------------
# tampered caches: rebuilt, never trusted


def cache_entry(data_dir):
    (meta,) = (data_dir / "cache").glob("*-v4.json")
    return meta, meta.with_suffix(".bin")


def recheck(meta_path, meta):
    """A description rewritten as a careless tool would, its own checksum made to match again."""
    from fastgpt.data import describe

    meta["check"] = describe(meta)
    meta_path.write_text(json.dumps(meta))


def tamper_train_count(meta_path, bin_path):
    meta = json.loads(meta_path.read_text())
    meta["train"] -= 100
    meta_path.write_text(json.dumps(meta))  # the checksum no longer matches


def tamper_train_count_rechecked(meta_path, bin_path):
    meta = json.loads(meta_path.read_text())
    meta["train"] -= 100  # a char split is 90% of the tokens: derivable, so checked too
    recheck(meta_path, meta)


def tamper_ids_out_of_vocab(meta_path, bin_path):
    raw = bytearray(bin_path.read_bytes())
    raw[10] = 250
    bin_path.write_bytes(bytes(raw))
    meta = json.loads(meta_path.read_text())
    meta["crc32"] = zlib.crc32(bytes(raw))
    recheck(meta_path, meta)


TAMPERS = {
    "train count": tamper_train_count,
    "train count, checksum redone": tamper_train_count_rechecked,
    "out-of-vocabulary ids, CRC redone": tamper_ids_out_of_vocab,
    "Infinity": lambda m, b: m.write_text('{"dtype": "uint8", "tokens": Infinity, "train": 1, "crc32": 0}'),
    "deep nesting": lambda m, b: m.write_text("[" * 100000 + "]" * 100000),
    "not an object": lambda m, b: m.write_text("[1, 2]"),
    "invalid UTF-8": lambda m, b: m.write_bytes(b"\xff\xfe{}"),
    "tokens truncated": lambda m, b: b.write_bytes(b.read_bytes()[:-3]),
    "description gone": lambda m, b: m.unlink(),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_a_tampered_token_cache_is_rebuilt(small_corpus, tmp_path, name):
    from fastgpt.data import load_corpus

    first = load_corpus(str(small_corpus), tmp_path)
    meta_path, bin_path = cache_entry(tmp_path)
    TAMPERS[name](meta_path, bin_path)
    again = load_corpus(str(small_corpus), tmp_path)
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    assert load_corpus(str(small_corpus), tmp_path).train.shape == first.train.shape  # and reads back


def test_a_corpus_edited_while_it_is_encoded_is_not_cached_as_the_original(small_corpus, tmp_path, monkeypatch):
    from fastgpt import data
    from fastgpt import text as corpus_text

    original = small_corpus.read_bytes()
    real = corpus_text.read_chunks
    calls = []

    def edited_midway(path, start=0, stop=None):
        for i, chunk in enumerate(real(path, start, stop)):
            calls.append(i)
            if len(calls) == 2:  # the encoding pass: the text changes under it (same size)
                path.write_bytes(original.replace(b"ROMEO", b"TYBLT"))
            yield chunk

    monkeypatch.setattr(corpus_text, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(corpus_text, "read_chunks", edited_midway)
    with pytest.raises(UserError, match="changed while it was being encoded"):
        data.load_corpus(str(small_corpus), tmp_path)
    monkeypatch.setattr(corpus_text, "read_chunks", real)
    assert not list((tmp_path / "cache").glob("*.bin"))
    small_corpus.write_bytes(original)
    assert data.load_corpus(str(small_corpus), tmp_path).train.size > 0


def test_a_glob_through_a_loop_of_links_reads_each_file_once(tmp_path):
    from fastgpt.text import corpus_files

    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text("alpha\n")
    (tmp_path / "texts" / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "texts" / "sub" / "loop").symlink_to(tmp_path / "texts")
    (tmp_path / "texts" / "again.txt").symlink_to(tmp_path / "texts" / "a.txt")
    files = corpus_files(str(tmp_path / "texts" / "**" / "*.txt"), tmp_path)
    assert sorted(p.resolve().name for p in files) == ["a.txt", "b.txt"]
    assert len(corpus_files(str(tmp_path / "texts"), tmp_path)) == 1  # a directory: its own .txt files, once


# ---------------------------------------------------------------------------------------------------
# huge values: refused before anything is allocated


@pytest.mark.parametrize("flag", ["--batch_size=1000000", "--n_layer=1000000000", "--block_size=100000000",
                                  "--n_embd=10000000"])
def test_sizes_beyond_the_machine_are_refused_before_the_corpus_is_read(small_corpus, tmp_path, flag):
    with pytest.raises(UserError, match="needs about .* GiB, more than the .* this machine's cpu has: lower"):
        train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}",
                    *tiny_flags(), flag, "--n_head=1"])
    assert not (tmp_path / "cache").exists()  # refused before encoding


def test_a_checkpoint_recording_a_huge_model_is_refused_before_it_is_built(trained, tmp_path):
    from fastgpt import sample

    best = load_checkpoint(trained / "best.pt")
    best["model_config"]["n_layer"] = 10**9
    save_checkpoint(tmp_path / "huge.pt", {k: v for k, v in best.items() if k not in ("format", "version")})
    with pytest.raises(UserError, match="the model of .*huge.pt needs about"):
        sample.main([f"--checkpoint={tmp_path / 'huge.pt'}"])


def test_sampling_more_than_the_machine_holds_is_refused(trained):
    from fastgpt import sample

    with pytest.raises(UserError, match="100000000 samples of .* lower --num_samples"):
        sample.main([f"--out_dir={trained}", "--num_samples=100000000"])


# ---------------------------------------------------------------------------------------------------
# bad text where text is read


def test_a_prompt_that_is_not_utf8_is_one_line(trained, cli):
    from conftest import one_line_error

    result = cli("fastgpt.sample", f"--out_dir={trained}", "--prompt=\udcff", "--max_new_tokens=2")
    assert "the prompt is not UTF-8 text" in one_line_error(result)


def test_plot_skips_damaged_metrics_lines(trained, tmp_path):
    from fastgpt import plot

    with open(trained / "metrics.jsonl", "ab") as f:
        f.write(b'{"iter": 3, "loss": "\xff"}\n{"iter": "x", "loss": 1.0}\n[1]\n')
    run = plot.read_run(trained)
    assert run.steps and all(isinstance(r["loss"], float) for r in run.steps)


@pytest.mark.parametrize("flags, message", [
    (["--rounds=0"], "--rounds must be between 1 and 100"),
    (["--source=/nonexistent/input.txt"], "no Tiny Shakespeare at /nonexistent/input.txt"),
    (["--mb=0"], "--mb must be between 1 and 100000"),
    (["--tokenizers=char,x"], "--tokenizers takes char and/or bpe"),
    (["--vocab_size=5"], "--vocab_size must be between 257"),
])
def test_bench_corpus_edge_flags_are_one_line(flags, message, cli, tmp_path):
    from conftest import one_line_error

    result = cli("bench.corpus", *flags, f"--out={tmp_path}")
    assert message in one_line_error(result)


def test_pictures_never_replace_a_file_unasked(trained, tmp_path):
    from fastgpt import attention_maps, plot

    picture = tmp_path / "mine.png"
    picture.write_bytes(b"my own picture")
    with pytest.raises(UserError, match="exists: choose another path, or pass --force"):
        plot.main([str(trained), f"--out={picture}"])
    with pytest.raises(UserError, match="exists: choose another path, or pass --force"):
        attention_maps.main([f"--checkpoint={trained / 'best.pt'}", "--prompt=ROMEO", f"--out={picture}"])
    assert picture.read_bytes() == b"my own picture"
    assert plot.main([str(trained), f"--out={picture}", "--force"]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".mine.png.*"))


# ---------------------------------------------------------------------------------------------------
# processes killed at any moment, and full disks


# ---------------------------------------------------------------------------------------------------
# checkpoints that load but describe no model: every command that reads one refuses it the same way


CONTENT_DAMAGES = {
    "model_config a string field": lambda c: c["model_config"].update(n_layer="x"),
    "model_config negative heads": lambda c: c["model_config"].update(n_head=-1),
    "model_config unknown field": lambda c: c["model_config"].update(foo=1),
    "model_config not a mapping": lambda c: c.update(model_config=None),
    "model_config huge vocabulary": lambda c: c["model_config"].update(vocab_size=10**12),
    "model_config unknown model": lambda c: c["model_config"].update(model="transformer-xl"),
    "model_config no padding multiple": lambda c: c["model_config"].update(pad_vocab=0),
    "model_config padding past the limit": lambda c: c["model_config"].update(pad_vocab=2**40),
    "NaN weights": lambda c: next(iter(c["model"].values())).fill_(float("nan")),
    "weights not tensors": lambda c: c["model"].update({next(iter(c["model"])): [1.0]}),
    "tokenizer vocabulary not text": lambda c: c.update(tokenizer={"kind": "char", "vocab": 5}),
    "tokenizer of an unknown kind": lambda c: c.update(tokenizer={"kind": "zzz"}),
    "train_config of the wrong type": lambda c: c.get("train_config", {}).update(batch_size="x"),
    "train_config NaN": lambda c: c.get("train_config", {}).update(learning_rate=float("nan")),
}


@pytest.mark.parametrize("command", ["sample", "resume", "export", "init_from"])
@pytest.mark.parametrize("name", list(CONTENT_DAMAGES))
def test_a_checkpoint_describing_no_model_is_refused_by_every_command(trained, small_corpus, tmp_path, name, command):
    from fastgpt import sample

    if command in ("sample", "export", "init_from") and name.startswith("train_config"):
        pytest.skip("best.pt holds no train config")
    for which in ("ckpt.pt", "best.pt"):
        ckpt = load_checkpoint(trained / which)
        CONTENT_DAMAGES[name](ckpt)
        save_checkpoint(trained / which, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    before = (trained / "ckpt.pt").read_bytes()
    runs = {
        "sample": lambda: sample.main([f"--out_dir={trained}", "--max_new_tokens=2"]),
        "resume": lambda: resume(trained, small_corpus, tmp_path),
        "export": lambda: export.main([f"--checkpoint={trained / 'best.pt'}", "--format=nanogpt",
                                       f"--out={tmp_path / 'x'}"]),
        "init_from": lambda: train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}",
                                         f"--init_from={trained / 'best.pt'}", f"--out_dir={tmp_path / 'ft'}",
                                         "--max_iters=1"]),
    }
    with pytest.raises(UserError) as refused:
        runs[command]()
    assert "\n" not in str(refused.value) and "checkpoint" in str(refused.value) or "fastgpt" in str(refused.value)
    assert (trained / "ckpt.pt").read_bytes() == before and not (tmp_path / "x" / "ckpt.pt").exists()


def test_a_gpt2_vocabulary_run_is_sized_with_the_fused_loss(monkeypatch):
    """The memory check counts the loss as it will run: the shakespeare_char GPT with GPT-2's vocabulary
    (fused: a chunk of logits) fits an 8 GiB device, where its whole logits would not."""
    from fastgpt import memory
    from fastgpt.config import PRESETS

    config = PRESETS["shakespeare_char"].model_config(50257)
    monkeypatch.setattr(memory, "device_bytes", lambda device: 8 * 2**30)
    memory.check_training(config, 64, torch.device("cpu"))
    assert memory.loss_floats(config, 64 * 256) * 4 < 2**30
    lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")
    monkeypatch.setattr(lce, "PLAIN_MAX_BYTES", float("inf"))
    with pytest.raises(UserError, match="lower --batch_size"):
        memory.check_training(config, 64, torch.device("cpu"))
