"""Fine-tuning: --init_from a checkpoint on a new text, with or without growing the vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_flags

from fastgpt import sample, train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.config import parse_train_args
from fastgpt.cli import UserError

TINY = tiny_flags(batch_size=8, eval_iters=4, log_interval=10, learning_rate=1e-2, warmup_iters=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small model trained on one text; returns (checkpoint path, its text)."""
    root = tmp_path_factory.mktemp("base")
    text = "".join(f"the {w} of the {v} is {a}.\n" for w in ("king", "queen", "knight", "fool")
                   for v in ("realm", "court", "field") for a in ("old", "wise", "proud", "bold")) * 8
    (root / "base.txt").write_text(text)
    code = train.main([f"--data_file={root / 'base.txt'}", f"--data_dir={root}", f"--out_dir={root / 'out'}",
                       *TINY, "--max_iters=60", "--eval_interval=60"])
    assert code == 0
    return root / "out" / "ckpt.pt", text


def val_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


def test_finetuning_lowers_the_loss_on_the_new_text(base, tmp_path, capsys):
    ckpt, _ = base
    new = tmp_path / "new.txt"
    new.write_text("".join(f"a {w} is {a} in the {v}.\n" for w in ("fool", "knight") for a in ("wise", "bold")
                           for v in ("court", "realm")) * 20)  # the same characters, other sentences
    out = tmp_path / "ft"
    code = train.main(["--preset=finetune", f"--init_from={ckpt}", f"--data_file={new}",
                       f"--data_dir={tmp_path}", f"--out_dir={out}", "--batch_size=8", "--eval_iters=4",
                       "--max_iters=40", "--lr_decay_iters=40", "--eval_interval=20", "--learning_rate=3e-3",
                       "--sample_chars=0"])
    assert code == 0
    losses = val_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3
    tuned = load_checkpoint(out / "ckpt.pt")
    original = load_checkpoint(ckpt)
    assert tuned["iter_num"] == 40 and tuned["vocab"] == original["vocab"]
    assert tuned["model_config"] == original["model_config"] | {"dropout": 0.1}  # the finetune preset's
    steps = {int(s["step"]) for s in tuned["optimizer"]["state"].values()}
    assert steps == {40}  # a fresh optimizer: its step count starts from zero
    assert "weights from" in capsys.readouterr().out
    assert sample.main([f"--out_dir={out}", "--prompt=a fool", "--max_new_tokens=10"]) == 0
    assert train.main([f"--out_dir={out}", "--resume", "--max_iters=45", "--lr_decay_iters=45"]) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 45  # a fine-tuned run resumes like any other


def test_characters_outside_the_vocabulary_are_a_one_line_error(base, tmp_path, cli):
    ckpt, _ = base
    new = tmp_path / "new.txt"
    new.write_text("the king is old. ZEBRA 7 times!\n" * 50)
    result = cli("fastgpt.train", f"--init_from={ckpt}", f"--data_file={new}", f"--data_dir={tmp_path}",
                 f"--out_dir={tmp_path / 'ft'}", "--max_iters=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    for char in "ZEBRA7!":
        assert repr(char) in line
    assert "--extend_vocab" in line


@pytest.mark.parametrize("model", ["gpt", "bigram"])
def test_extending_the_vocabulary_keeps_old_tokens_logits(tmp_path, model):
    base_text = "abc abc cab bac\n" * 40
    (tmp_path / "base.txt").write_text(base_text)
    base_out, ft_out = tmp_path / "base", tmp_path / "ft"
    assert train.main([f"--data_file={tmp_path / 'base.txt'}", f"--data_dir={tmp_path}", f"--out_dir={base_out}",
                       f"--model={model}", *TINY, "--max_iters=10", "--eval_interval=10"]) == 0
    (tmp_path / "new.txt").write_text("abc xyz! cab zyx?\n" * 40)
    # max_iters=0: evaluate and save the extended model before its first step
    assert train.main([f"--init_from={base_out / 'ckpt.pt'}", f"--data_file={tmp_path / 'new.txt'}",
                       f"--data_dir={tmp_path}", f"--out_dir={ft_out}", "--extend_vocab", "--max_iters=0",
                       "--eval_iters=2", "--batch_size=4", "--sample_chars=0"]) == 0
    old_model, old_tok = model_from_checkpoint(load_checkpoint(base_out / "ckpt.pt"), "base")
    new_model, new_tok = model_from_checkpoint(load_checkpoint(ft_out / "ckpt.pt"), "ft")
    assert new_tok.vocab == old_tok.vocab + "!?xyz"  # old ids kept, new characters appended in order
    prompt = torch.from_numpy(old_tok.encode("cab abc\nba"))[None]
    old_logits, new_logits = old_model(prompt)[0], new_model(prompt)[0]
    assert new_logits.shape[-1] == old_logits.shape[-1] + 5
    # the same maths; only the wider output matmul may round differently in the last bits
    torch.testing.assert_close(new_logits[..., :old_tok.vocab_size], old_logits, rtol=0, atol=1e-5)
    grown = next(p for name, p in new_model.named_parameters() if "wte" in name or "token_embedding" in name)
    new_rows = grown[old_tok.vocab_size:]
    assert new_rows.abs().max() > 0 and new_rows.std() < 0.05  # initialised as at the start of training


def test_finetuning_flags_are_checked(base, tmp_path):
    ckpt, _ = base
    with pytest.raises(UserError, match="--init_from"):
        parse_train_args(["--preset=finetune"], cuda_available=False)
    with pytest.raises(UserError, match="--extend_vocab grows"):
        parse_train_args(["--extend_vocab"], cuda_available=False)
    with pytest.raises(UserError, match="pass only one"):
        parse_train_args(["--resume", f"--init_from={ckpt}"], cuda_available=False)
    with pytest.raises(UserError, match="--n_layer=3 differs"):
        train.main([f"--init_from={ckpt}", "--n_layer=3", f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match="no checkpoint"):
        train.main([f"--init_from={tmp_path / 'missing.pt'}", f"--out_dir={tmp_path}"])
