"""The lecture's progression: every model trains, samples, checkpoints and compares like the GPT."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from conftest import tiny_flags

from fastgpt import compare, sample, train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.cli import UserError
from fastgpt.model import (MODELS, AttentionLanguageModel, BigramLanguageModel, GPT, GPTConfig, LayerNorm,
                           build_model)

TINY = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
TRAIN_FLAGS = tiny_flags(batch_size=8, eval_iters=4, warmup_iters=0, learning_rate=1e-2, log_interval=10)


def tiny(name: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY, model=name, **changes))


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes(name):
    model = tiny(name)
    idx = torch.randint(TINY.vocab_size, (3, TINY.block_size))
    logits, loss = model(idx, idx)
    assert logits is None and loss.shape == ()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model(idx[:, :5])[0].shape == (3, 5, TINY.vocab_size)


@pytest.mark.parametrize("name", MODELS)
def test_generation_with_and_without_cache_agree(name):
    model = tiny(name).double().eval()
    prompt = torch.randint(TINY.vocab_size, (2, 3))
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        runs.append(model.generate(prompt, 30, generator=generator, use_cache=use_cache))  # past block_size
    assert runs[0].shape == (2, 33)
    assert torch.equal(runs[0], runs[1])


def test_each_step_adds_its_idea():
    bigram, attention, multihead = tiny("bigram"), tiny("attention"), tiny("multihead")
    feedforward, blocks, gpt = tiny("feedforward"), tiny("blocks"), tiny("gpt")
    assert isinstance(bigram, BigramLanguageModel)
    assert bigram.get_num_params() == TINY.vocab_size ** 2  # the table is the whole model
    idx = torch.randint(TINY.vocab_size, (1, 8))
    shuffled = torch.cat([idx[:, torch.randperm(7)], idx[:, 7:]], dim=1)
    assert torch.equal(bigram(idx)[0][:, -1], bigram(shuffled)[0][:, -1])  # no context
    assert all(isinstance(m, AttentionLanguageModel) for m in (attention, multihead, feedforward))
    assert attention.sa_heads.n_head == 1 and multihead.sa_heads.n_head == TINY.n_head
    assert attention.ffwd is None and multihead.ffwd is None and feedforward.ffwd is not None
    assert not any(isinstance(m, LayerNorm) for m in feedforward.modules())  # no norm before blocks
    assert isinstance(blocks, GPT) and len(blocks.transformer.h) == TINY.n_layer
    assert sum(isinstance(m, LayerNorm) for m in blocks.modules()) == 2 * TINY.n_layer + 1
    dropouts = lambda m: {mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)}  # noqa: E731
    assert dropouts(blocks) == {0.0} and dropouts(gpt) == {TINY.dropout}
    for model in (attention, multihead, feedforward):
        assert model.sa_heads.dropout == 0.0
    # without dropout, blocks and gpt are the same function of the same weights
    gpt_no_dropout = tiny("gpt", dropout=0.0)
    assert torch.equal(blocks.eval()(idx)[0], gpt_no_dropout.eval()(idx)[0])


@pytest.mark.parametrize("name", MODELS)
def test_training_lowers_the_loss_and_the_checkpoint_samples(name, small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                       f"--model={name}", *TRAIN_FLAGS, "--max_iters=40", "--eval_interval=40"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_config"]["model"] == name
    model, _ = model_from_checkpoint(ckpt, out / "ckpt.pt")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][key]), key
    capsys.readouterr()
    assert sample.main([f"--out_dir={out}", "--prompt=ROMEO", "--max_new_tokens=20", "--num_samples=1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO") and len(text.rstrip("\n")) >= 20


def test_unknown_model_is_a_one_line_error(cli, tmp_path):
    result = cli("fastgpt.train", "--model=transformer", f"--out_dir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "--model=transformer" in lines[0] and all(name in lines[0] for name in MODELS)


def test_resuming_with_another_model_is_an_error(small_corpus, tmp_path):
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"]
    assert train.main([*common, *TRAIN_FLAGS, "--max_iters=2", "--model=feedforward"]) == 0
    with pytest.raises(UserError, match="--model=bigram differs from the checkpoint's feedforward"):
        train.main([*common, "--resume", "--model=bigram"])


def test_compare_trains_every_model_and_writes_the_table(small_corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = compare.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                         *TRAIN_FLAGS, "--max_iters=20", "--eval_interval=10"])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["model"] for r in rows] == list(MODELS)
    for row in rows:
        assert row["iter"] == 20 and row["val_loss"] > 0 and row["tokens_per_sec"] > 0
        assert len(row["sample"]) == compare.SAMPLE_CHARS
        assert (out / row["model"] / "ckpt.pt").is_file()
    assert rows[0]["parameters"] < rows[1]["parameters"] < rows[3]["parameters"] < rows[4]["parameters"]
    table = (out / "compare.md").read_text().splitlines()
    assert len(table) == 2 + len(MODELS) + 2 and all(f"| {name} |" in table[2 + i] for i, name in enumerate(MODELS))
    assert "\n".join(table) in capsys.readouterr().out
    # the cpu preset has no dropout, all that gpt adds to blocks: the same model, and the table says why
    blocks, gpt = rows[MODELS.index("blocks")], rows[MODELS.index("gpt")]
    assert blocks["val_loss"] == gpt["val_loss"] and blocks["sample"] == gpt["sample"]
    assert table[-1] == f"Note: {compare.COINCIDE}."
    with pytest.raises(UserError, match="drop --model"):
        compare.main([f"--out_dir={out}", "--model=gpt"])


def test_compare_help_lists_the_trainer_flags_with_its_own_defaults(capsys):
    from fastgpt.cli import ShowHelp

    with pytest.raises(ShowHelp) as shown:  # run_main prints it and exits 0
        compare.main(["--help"])
    text = str(shown.value)
    assert "python -m fastgpt.compare" in text and "'out-compare'" in text and "--max_iters" in text


@pytest.mark.parametrize("name", MODELS)
def test_the_fused_loss_is_the_plain_one_with_every_gradient(name, monkeypatch):
    """Forced to chunks of 16 rows (as a GPT-2 vocabulary would be), every model's loss and gradients are
    those of the whole logits' cross-entropy."""
    lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")  # kernels.linear_cross_entropy is the op

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        return [loss] + [p.grad.clone() for p in model.parameters()]

    idx, targets = torch.randint(TINY.vocab_size, (3, TINY.block_size)), torch.randint(TINY.vocab_size, (3, TINY.block_size))
    model = tiny(name, dropout=0.0).double()
    plain = loss_and_grads(model)
    monkeypatch.setattr(lce, "PLAIN_MAX_BYTES", 0)
    monkeypatch.setattr(lce, "CHUNK_BYTES", 16 * 4 * model.config.output_size)
    assert lce.chunk_rows(idx.numel(), model.config.output_size) == 16
    fused = loss_and_grads(model)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_padding_the_vocabulary_changes_no_prediction(name):
    """pad_vocab=64 rounds the output layer up (11 -> 64 rows); the padding is never predicted: the logits,
    the samples and the loss are those of the same weights without it, and the export drops it."""
    from fastgpt.model import build_model

    padded = tiny(name, pad_vocab=64, dropout=0.0)
    plain = build_model(dataclasses.replace(TINY, model=name, dropout=0.0))
    plain.load_state_dict(padded.trimmed_state_dict())
    head = padded.lm_head
    if head is not None:
        assert head.weight.shape[0] == 64 and padded.config.output_size == 64
        with torch.no_grad():
            head.weight[TINY.vocab_size:] = 10.0  # the padding rows would win every softmax if they counted
    idx = torch.randint(TINY.vocab_size, (2, TINY.block_size))
    torch.testing.assert_close(padded(idx)[0], plain(idx)[0])
    torch.testing.assert_close(padded(idx, idx)[1], plain(idx, idx)[1])
    g = torch.Generator().manual_seed(3)
    sample = padded.generate(idx[:, :3], 20, generator=g)
    assert sample.max() < TINY.vocab_size
    assert torch.equal(sample, plain.generate(idx[:, :3], 20, generator=torch.Generator().manual_seed(3)))
    padded(idx, idx)[1].backward()
    if head is not None:
        assert not head.weight.grad[TINY.vocab_size:].any()


@pytest.mark.parametrize("name", MODELS)
def test_a_grown_vocabulary_keeps_the_old_rows_with_or_without_padding(name):
    """--extend_vocab's weight copy (load_weights): the old tokens' rows and columns come from the checkpoint,
    the new tokens' and the padding keep their fresh values, whether the padded sizes differ (11 -> 70
    tokens: 64 -> 128 rows) or not (11 -> 14: 64 rows both)."""
    from fastgpt.checkpoint import load_weights

    for new_vocab in (14, 70):
        old = tiny(name, pad_vocab=64)
        torch.manual_seed(5)
        new = build_model(dataclasses.replace(TINY, model=name, pad_vocab=64, vocab_size=new_vocab))
        fresh = {k: v.clone() for k, v in new.state_dict().items()}
        load_weights(new, old.state_dict(), "old.pt", TINY.vocab_size)
        state, dims = new.state_dict(), new.vocab_dims()
        for key, tensor in old.state_dict().items():
            if key not in dims:
                assert torch.equal(state[key], tensor), key
                continue
            kept = tuple(slice(0, TINY.vocab_size) if d in dims[key] else slice(None) for d in range(tensor.dim()))
            assert torch.equal(state[key][kept], tensor[kept]), key
            rest = state[key].clone()
            rest[kept] = fresh[key][kept]
            assert torch.equal(rest, fresh[key]), key  # everything else as initialised
