"""Runs with a subword tokenizer: the tokenizer travels in the checkpoint and sampling, fine-tuning and
resume use it; a resumed bpe run is exact; contradicting flags are one-line errors; GPT-2's path runs
end to end (on a stand-in encoding: its real files need the network); large vocabularies work."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import one_line_error, tiny_flags
from fastgpt import sample, train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.cli import UserError
from fastgpt.model import GPTConfig, build_model

pytest.importorskip("tokenizers")

TINY = tiny_flags(warmup_iters=5, lr_decay_iters=60, eval_interval=10)
BPE = ["--tokenizer=bpe", "--vocab_size=320"]


def losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, small_corpus_module):
    tmp = tmp_path_factory.mktemp("bpe")
    out = tmp / "out"
    assert train.main([f"--data_file={small_corpus_module}", f"--data_dir={tmp}", f"--out_dir={out}", *TINY, *BPE,
                       "--max_iters=20", "--sample_chars=30"]) == 0
    return out, tmp


def test_the_bpe_travels_in_the_checkpoint(bpe_run):
    out, _ = bpe_run
    for name in ("ckpt.pt", "best.pt"):
        ckpt = load_checkpoint(out / name)
        assert ckpt["tokenizer"]["kind"] == "bpe" and "vocab" not in ckpt
        model, tokenizer = model_from_checkpoint(ckpt, out / name)
        assert tokenizer.vocab_size == model.config.vocab_size <= 320
    assert load_checkpoint(out / "ckpt.pt")["train_config"]["tokenizer"] == "bpe"


def test_sampling_a_bpe_model_decodes_any_prompt(bpe_run, capsys):
    out, _ = bpe_run
    assert sample.main([f"--out_dir={out}", "--prompt=ROMEO: 日本 zebra", "--num_samples=2",
                        "--max_new_tokens=12", "--device=cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("ROMEO: 日本 zebra") == 2


def test_fine_tuning_keeps_the_checkpoints_bpe(bpe_run, tmp_path, capsys):
    out, _ = bpe_run
    new_text = tmp_path / "new.txt"
    new_text.write_text("MERCUTIO: a plague on both your houses! 日本\n" * 40, encoding="utf-8")
    ft = tmp_path / "ft"
    assert train.main([f"--init_from={out / 'ckpt.pt'}", f"--data_file={new_text}", f"--data_dir={tmp_path}",
                       f"--out_dir={ft}", *TINY, "--max_iters=4"]) == 0
    base, tuned = load_checkpoint(out / "ckpt.pt"), load_checkpoint(ft / "ckpt.pt")
    assert tuned["tokenizer"] == base["tokenizer"]  # no new BPE trained on the new text
    assert not list(tmp_path.glob("cache/bpe-*.json"))


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer=char"], "was trained with --tokenizer=bpe"),
    (["--tokenizer=gpt2"], "was trained with --tokenizer=bpe"),
    (["--extend_vocab"], "--extend_vocab grows a character vocabulary"),
    (["--tokenizer=bpe", "--vocab_size=500"], "drop --vocab_size"),
])
def test_fine_tuning_with_another_tokenizer_is_refused(bpe_run, tmp_path, flags, message):
    out, data_dir = bpe_run
    with pytest.raises(UserError, match=message):
        train.main([f"--init_from={out / 'ckpt.pt'}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'ft'}",
                    f"--data_file={data_dir / 'nothing.txt'}", *TINY, *flags])


def test_resuming_with_another_tokenizer_is_refused(bpe_run):
    out, data_dir = bpe_run
    with pytest.raises(UserError, match="was trained with --tokenizer=bpe: resume with it"):
        train.main([f"--out_dir={out}", "--resume", "--tokenizer=char", f"--data_dir={data_dir}"])


def test_fine_tuning_a_char_model_with_a_bpe_is_refused(small_corpus_module, tmp_path):
    base = tmp_path / "base"
    common = [f"--data_file={small_corpus_module}", f"--data_dir={tmp_path}", *TINY]
    assert train.main([*common, f"--out_dir={base}", "--max_iters=2"]) == 0
    with pytest.raises(UserError, match="was trained with --tokenizer=char"):
        train.main([*common, f"--init_from={base / 'ckpt.pt'}", f"--out_dir={tmp_path / 'ft'}", *BPE])


@pytest.mark.parametrize("flags, message", [
    (["--vocab_size=500"], "use it with --tokenizer=bpe"),
    (["--tokenizer=wordpiece"], "unknown --tokenizer=wordpiece: choose one of char, bpe, gpt2"),
    (["--tokenizer=bpe", "--vocab_size=100"], "--vocab_size must be between 256"),
    (["--tokenizer=bpe", "--vocab_size=20000", "--model=bigram"], "bigram model is a vocab x vocab table"),
])
def test_bad_tokenizer_flags_are_one_line_and_exit_2(small_corpus_module, tmp_path, cli, flags, message):
    if "--model=bigram" in flags:  # a BPE that large needs a corpus with that many merges: GPT-2's size
        pytest.importorskip("tokenizers")
        big = tmp_path / "many.txt"
        big.write_text(" ".join(f"w{i:05d}x" for i in range(40_000)), encoding="utf-8")
        flags = [*flags, f"--data_file={big}"]
    else:
        flags = [*flags, f"--data_file={small_corpus_module}"]
    argv = [*flags, f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1", "--device=cpu"]
    if "--model=bigram" in flags:  # the command line's side: one line on stderr, exit 2
        result = cli("fastgpt.train", *argv)
        assert message in one_line_error(result)
    else:
        with pytest.raises(UserError) as error:
            train.main(argv)
        assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------
# GPT-2's tokenizer, on a stand-in encoding of the same kind (tiktoken, GPT-2's pattern)


def test_gpt2_trains_samples_and_stores_only_its_name(stand_in_gpt2, small_corpus_module, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main([f"--data_file={small_corpus_module}", f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY,
                       "--tokenizer=gpt2", "--max_iters=4"]) == 0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["tokenizer"] == {"kind": "gpt2"} and stand_in_gpt2 == ["gpt2"]
    assert ckpt["model_config"]["vocab_size"] == 266  # 265 ranks and the end-of-text token
    assert sample.main([f"--out_dir={out}", "--prompt=the night", "--max_new_tokens=5", "--num_samples=1"]) == 0
    assert "the night" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# the model side of a large vocabulary


def test_a_gpt2_sized_vocabulary_trains_samples_and_counts_its_flops():
    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    model = build_model(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one 50257 x 32 table
    idx = torch.randint(50257, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.lm_head.weight.grad.shape == (50257, 32)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    assert model.flops_per_token() == 6 * n + 12 * 1 * 32 * 16
    out = model.eval().generate(idx[:, :3], 20, top_k=50, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23) and int(out.max()) < 50257


def test_flops_leave_out_a_token_table_that_is_only_looked_up():
    config = GPTConfig(vocab_size=5000, block_size=16, n_layer=1, n_head=2, n_embd=32, model="feedforward")
    model = build_model(config)
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    norms = sum(p.numel() for n, p in model.named_parameters() if "ln" in n or "norm" in n)
    assert 6 * (linear + norms) <= model.flops_per_token() - 12 * model.n_attention_layers * 32 * 16
    assert model.flops_per_token() < 6 * model.get_num_params()  # the 5000 x 32 lookup table is not a matmul
