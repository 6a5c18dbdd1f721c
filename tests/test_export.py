"""Export and import: transformers loads the hf export with fastgpt's logits and greedy text; fastgpt ->
nanoGPT -> fastgpt is the identity; a nanoGPT checkpoint (compiled, padded, with mask buffers) imports;
a hostile meta.pkl is refused without running; bad inputs are one line and exit 2; TensorBoard's own
reader finds the trainer's scalars."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import sys

import pytest
import torch

from conftest import one_line_error, tiny_flags
from fastgpt import export, nanogpt, sample, train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fastgpt.cli import UserError
from fastgpt.model import GPTConfig, build_model
from fastgpt.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer

TEXT = "".join(f"{who}: the {what} is {how}, my lord.\n" for who in ("ROMEO", "JULIET", "NURSE")
               for what in ("night", "rose", "sword") for how in ("bright", "sweet", "cold")) * 4
PROMPT = "JULIET: the rose"
NANOGPT_KEYS = {"model", "model_args", "iter_num", "best_val_loss", "config"}


def make_checkpoint(path, tokenizer, bias=True, model="gpt", attn_window=None, seed=0, pad_vocab=1):
    """A fastgpt checkpoint of a small random model with `tokenizer` (weights scaled up so its logits
    are far from ties)."""
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                       dropout=0.0, bias=bias, model=model, attn_window=attn_window, pad_vocab=pad_vocab)
    torch.manual_seed(seed)
    net = build_model(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    payload = {"model": net.state_dict(), "model_config": dataclasses.asdict(config),
               "tokenizer": tokenizer.state(), "corpus_sha256": None, "iter_num": 7, "best_val_loss": 1.5}
    if tokenizer.kind == "char":
        payload["vocab"] = tokenizer.vocab
    save_checkpoint(path, payload)
    return path


@pytest.fixture
def tokenizers_by_kind(request, stand_in_gpt2):
    pytest.importorskip("tokenizers")
    return {"char": CharTokenizer.from_text(TEXT), "bpe": BPETokenizer.train([TEXT], 300),
            "gpt2": GPT2Tokenizer()}


def greedy(model, ids: list[int], n: int) -> list[int]:
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx[:, -model.config.block_size:])[0][:, -1].argmax(-1, keepdim=True)], 1)
    return idx[0].tolist()


# ---------------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("kind, bias", [("char", True), ("char", False), ("bpe", False), ("gpt2", True)])
def test_transformers_loads_the_hf_export_with_our_logits_and_text(tmp_path, tokenizers_by_kind, kind, bias):
    transformers = pytest.importorskip("transformers")
    tokenizer = tokenizers_by_kind[kind]
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizer, bias=bias)
    assert export.main([f"--checkpoint={ckpt}", "--format=hf", f"--out={tmp_path / 'hf'}"]) == 0
    ours, _ = model_from_checkpoint(load_checkpoint(ckpt), ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer.encode(PROMPT).tolist()
    assert hf_tok.encode(PROMPT) == ids
    assert hf_tok.encode(TEXT[:300]) == tokenizer.encode(TEXT[:300]).tolist()
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(x)[0], hf(x).logits
    assert a.shape == b.shape == (1, len(ids), tokenizer.vocab_size)
    assert (a - b).abs().max() <= 1e-4
    n = ours.config.block_size - len(ids)  # transformers' GPT-2 stops at n_positions; fastgpt would slide on
    assert hf.config.eos_token_id == (tokenizer.vocab_size - 1 if kind == "gpt2" else None)  # GPT-2's end of text
    hf.generation_config.eos_token_id = None  # fastgpt's greedy loop does not stop at it either
    theirs = hf.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()
    assert len(theirs) == ours.config.block_size and theirs == greedy(ours, ids, n)
    assert hf_tok.decode(theirs) == tokenizer.decode(theirs)
    if kind == "gpt2":
        assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tokenizer.vocab_size - 1


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_a_padded_output_layer_is_trimmed_by_both_exports(tmp_path, tokenizers_by_kind, kind):
    """A checkpoint trained on CUDA has its output layer padded to a multiple of 64 rows: the HF export and
    the nanoGPT export hold vocab_size rows and give the same logits; imported back it is unpadded."""
    transformers = pytest.importorskip("transformers")
    tokenizer = tokenizers_by_kind[kind]
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizer, pad_vocab=64)
    ours, _ = model_from_checkpoint(load_checkpoint(ckpt), ckpt)
    assert ours.lm_head.weight.shape[0] == -(-tokenizer.vocab_size // 64) * 64 > tokenizer.vocab_size
    assert export.main([f"--checkpoint={ckpt}", "--format=hf", f"--out={tmp_path / 'hf'}"]) == 0
    assert export.main([f"--checkpoint={ckpt}", "--format=nanogpt", f"--out={tmp_path / 'nano'}"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    nano = torch.load(tmp_path / "nano" / "ckpt.pt", weights_only=True)
    assert nano["model"]["lm_head.weight"].shape[0] == nano["model_args"]["vocab_size"] == tokenizer.vocab_size
    nano_model = build_model(GPTConfig(**nano["model_args"]))
    nano_model.load_state_dict(nano["model"])
    x = torch.tensor([tokenizer.encode(PROMPT).tolist()])
    with torch.no_grad():
        expected = ours(x)[0]
        assert expected.shape[-1] == tokenizer.vocab_size
        assert (hf(x).logits - expected).abs().max() <= 1e-4
        assert torch.equal(nano_model.eval()(x)[0], expected)


def test_hf_export_of_a_model_without_biases_has_zero_biases(tmp_path, tokenizers_by_kind):
    transformers = pytest.importorskip("transformers")
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizers_by_kind["char"], bias=False)
    export.main([f"--checkpoint={ckpt}", "--format=hf", f"--out={tmp_path / 'hf'}"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    biases = {n: p for n, p in hf.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 2 * (4 + 2) + 1 and all(torch.count_nonzero(p) == 0 for p in biases.values())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu"


# ---------------------------------------------------------------------------------------------------
# nanoGPT


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_fastgpt_to_nanogpt_to_fastgpt_is_the_identity(tmp_path, tokenizers_by_kind, kind, capsys):
    tokenizer = tokenizers_by_kind[kind]
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizer)
    nano, back = tmp_path / "nano", tmp_path / "back"
    assert export.main([f"--checkpoint={ckpt}", "--format=nanogpt", f"--out={nano}"]) == 0
    saved = torch.load(nano / "ckpt.pt", weights_only=True)  # what nanoGPT's sample.py does
    assert set(saved) == NANOGPT_KEYS and saved["iter_num"] == 7 and saved["best_val_loss"] == 1.5
    assert set(saved["model_args"]) == {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
    # nanoGPT builds GPT(GPTConfig(**model_args)) and loads strictly: the same names as fastgpt's GPT
    build_model(GPTConfig(**saved["model_args"])).load_state_dict(saved["model"])
    meta_path = os.path.join("data", saved["config"]["dataset"], "meta.pkl")  # how sample.py finds meta.pkl
    assert os.path.exists(meta_path) == (kind == "char")
    meta_flag = []
    if kind == "char":
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
        assert meta["vocab_size"] == tokenizer.vocab_size
        assert "".join(meta["itos"][i] for i in range(meta["vocab_size"])) == tokenizer.vocab
        assert all(meta["stoi"][c] == i for i, c in enumerate(tokenizer.vocab))
        meta_flag = [f"--meta={meta_path}"]
    assert export.main([f"--checkpoint={nano / 'ckpt.pt'}", "--format=fastgpt", f"--out={back}", *meta_flag]) == 0
    a, b = load_checkpoint(ckpt), load_checkpoint(back / "best.pt")
    assert b["tokenizer"] == a["tokenizer"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(t, b["model"][name]) for name, t in a["model"].items())
    (m1, _), (m2, _) = model_from_checkpoint(a, ckpt), model_from_checkpoint(b, back)
    x = torch.tensor([tokenizer.encode(PROMPT).tolist()])
    assert torch.equal(m1(x)[0], m2(x)[0])
    assert sample.main([f"--out_dir={back}", f"--prompt={PROMPT}", "--max_new_tokens=5", "--num_samples=1"]) == 0
    assert PROMPT in capsys.readouterr().out


def test_an_imported_nanogpt_model_fine_tunes(tmp_path, tokenizers_by_kind):
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizers_by_kind["char"])
    nano, back = tmp_path / "nano", tmp_path / "back"
    export.main([f"--checkpoint={ckpt}", "--format=nanogpt", f"--out={nano}"])
    export.main([f"--checkpoint={nano / 'ckpt.pt'}", "--format=fastgpt", f"--out={back}", f"--meta={nano / 'meta.pkl'}"])
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    flags = tiny_flags(n_layer=None, n_head=None, n_embd=None, block_size=None, eval_interval=2)
    assert train.main([f"--init_from={back / 'best.pt'}", f"--data_file={corpus}", f"--data_dir={tmp_path}",
                       f"--out_dir={tmp_path / 'ft'}", *flags, "--max_iters=2"]) == 0
    assert load_checkpoint(tmp_path / "ft" / "ckpt.pt")["model_config"]["n_embd"] == 32


def test_a_compiled_padded_nanogpt_checkpoint_imports(tmp_path, tokenizers_by_kind):
    """nanoGPT's own quirks: `_orig_mod.` keys of a compiled model, a GPT-2 vocabulary padded for speed, the
    causal-mask buffers of its non-flash path, a tensor best_val_loss."""
    tokenizer = tokenizers_by_kind["gpt2"]
    n, padded = tokenizer.vocab_size, tokenizer.vocab_size + 30
    config = GPTConfig(vocab_size=padded, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    net = build_model(config)
    state = {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}
    state["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    args = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size",
                                              "dropout")}
    torch.save({"model": state, "model_args": args, "iter_num": 3, "best_val_loss": torch.tensor(2.5),
                "config": {"dataset": "openwebtext"}, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "ckpt.pt")
    assert export.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", "--format=fastgpt", f"--out={tmp_path / 'out'}"]) == 0
    ckpt = load_checkpoint(tmp_path / "out" / "best.pt")
    assert ckpt["model_config"]["vocab_size"] == n and ckpt["best_val_loss"] == 2.5
    assert torch.equal(ckpt["model"]["lm_head.weight"], net.lm_head.weight[:n])
    model, tok = model_from_checkpoint(ckpt, "x")
    assert tok.kind == "gpt2" and model.lm_head.weight is model.transformer.wte.weight


# ---------------------------------------------------------------------------------------------------
# hostile and bad inputs


class Payload:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["shell", "object", "nested"])
def test_a_hostile_meta_pickle_is_refused_and_never_run(tmp_path, tokenizers_by_kind, cli, payload):
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizers_by_kind["char"])
    export.main([f"--checkpoint={ckpt}", "--format=nanogpt", f"--out={tmp_path / 'nano'}"])
    marker = tmp_path / "pwned"
    hostile = {"shell": Payload(marker), "object": os.stat_result((0,) * 10),
               "nested": {"vocab_size": 3, "itos": {0: "a", 1: Payload(marker)}, "stoi": {}}}[payload]
    meta = tmp_path / "meta.pkl"
    meta.write_bytes(pickle.dumps(hostile))
    result = cli("fastgpt.export", f"--checkpoint={tmp_path / 'nano' / 'ckpt.pt'}", "--format=fastgpt",
                 f"--out={tmp_path / 'out'}", f"--meta={meta}")
    assert "not plain data" in one_line_error(result)
    assert not marker.exists() and not (tmp_path / "out" / "best.pt").exists()


def test_the_plain_unpickler_admits_plain_data():
    data = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "\n"}, "stoi": {"a": 0, "é": 1, "😀": 2},
            "t": (1, 2.5, None, True), "l": [-3, 10**30, float("inf"), "x" * 1000]}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert nanogpt.PlainUnpickler(io.BytesIO(pickle.dumps(data, protocol=protocol))).load() == data
    assert nanogpt.PlainUnpickler(io.BytesIO(pickle.dumps([b"raw"], protocol=3))).load() == [b"raw"]


@pytest.mark.parametrize("case, message", [
    ("text file", "not a readable fastgpt checkpoint"),
    ("truncated", "not a readable fastgpt checkpoint"),
    ("bigram", "--model=bigram model"),
    ("window", "sliding attention window"),
    ("bpe to nanogpt", "export it with --format=hf"),
    ("fastgpt as nanogpt", "is not a nanoGPT checkpoint (it is a fastgpt checkpoint already)"),
    ("truncated nanogpt", "not a readable nanoGPT checkpoint"),
    ("missing", "no checkpoint at"),
    ("bad format", "--format must be one of hf, nanogpt, fastgpt"),
    ("wrong meta", "has 4 characters but the checkpoint's model has vocab_size"),
])
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, tokenizers_by_kind, cli, case, message):
    char, bpe = tokenizers_by_kind["char"], tokenizers_by_kind["bpe"]
    fmt, extra = {"bpe to nanogpt": "nanogpt", "bad format": "onnx"}.get(case, "hf"), []
    path = tmp_path / "ckpt.pt"
    if case == "text file":
        path.write_text("not a checkpoint\n")
    elif case in ("truncated", "truncated nanogpt"):
        make_checkpoint(path, char)
        path.write_bytes(path.read_bytes()[:5000])
        fmt = "fastgpt" if case == "truncated nanogpt" else fmt
    elif case in ("bigram", "window", "bpe to nanogpt", "fastgpt as nanogpt", "bad format"):
        make_checkpoint(path, bpe if case == "bpe to nanogpt" else char, model="bigram" if case == "bigram" else "gpt",
                        attn_window=8 if case == "window" else None)
        fmt = "fastgpt" if case == "fastgpt as nanogpt" else fmt
    elif case == "wrong meta":
        make_checkpoint(tmp_path / "best.pt", char)
        export.main([f"--checkpoint={tmp_path / 'best.pt'}", "--format=nanogpt", f"--out={tmp_path / 'nano'}"])
        (tmp_path / "nano" / "meta.pkl").write_bytes(pickle.dumps({"itos": dict(enumerate("abcd"))}))
        path, fmt, extra = tmp_path / "nano" / "ckpt.pt", "fastgpt", [f"--meta={tmp_path / 'nano' / 'meta.pkl'}"]
    argv = [f"--checkpoint={path}", f"--format={fmt}", f"--out={tmp_path / 'out'}", *extra]
    if case in ("truncated", "bigram"):  # the command line's side: one line on stderr, exit 2
        result = cli("fastgpt.export", *argv)
        assert message in one_line_error(result)
    else:  # the message (a UserError is that one line)
        with pytest.raises(UserError) as error:
            export.main(argv)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_extra_is_named(tmp_path, tokenizers_by_kind, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "best.pt", tokenizers_by_kind["char"])
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r'needs the transformers package: pip install -e "\.\[hf\]"'):
        export.main([f"--checkpoint={ckpt}", "--format=hf", f"--out={tmp_path / 'hf'}"])


# ---------------------------------------------------------------------------------------------------
# TensorBoard


def scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_the_metrics_scalars_and_resume_keeps_them_whole(small_corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
              *tiny_flags(log_interval=2, eval_interval=4), "--tensorboard"]
    assert train.main([*common, "--max_iters=4"]) == 0
    assert train.main([f"--out_dir={out}", "--resume", "--max_iters=8"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = scalars(out / "tb")
    assert {"train/loss", "val/loss", "train/eval_loss", "lr", "grad_norm", "tokens_per_sec", "ms_per_iter"} <= set(got)
    steps = {r["iter"]: r for r in records if "loss" in r}
    assert sorted(got["train/loss"]) == sorted(steps) == [2, 4, 6, 8]
    for it, r in steps.items():
        assert got["train/loss"][it] == pytest.approx(r["loss"], rel=1e-6)
        assert got["lr"][it] == pytest.approx(r["lr"], rel=1e-6)
    evals = {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}
    assert got["val/loss"] == pytest.approx(evals, rel=1e-6) and sorted(evals) == [0, 4, 8]
    assert "mfu" not in got  # only on a GPU


def test_tensorboard_without_its_extra_is_one_line(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r'--tensorboard needs the tensorboard package: pip install -e "\.\[tensorboard\]"'):
        train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}",
                    *tiny_flags(), "--max_iters=1", "--tensorboard"])
