"""Pictures: what is drawn (axes, lines, legends from the runs' settings, the attention rows summing to 1
with nothing above the diagonal), and bad input in one line with exit 2."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import one_line_error, tiny_flags
from fastgpt import attention_maps, plot, train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.cli import UserError

pytest.importorskip("matplotlib")

TINY = tiny_flags(log_interval=2, eval_interval=4, max_iters=8)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short runs that differ in their seed only."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "text.txt"
    corpus.write_text("".join(f"ROMEO: the {w} is bright, é.\n" for w in ("night", "day", "rose")) * 40)
    dirs = []
    for seed in (1, 2):
        out = root / f"seed{seed}"
        assert train.main([f"--data_file={corpus}", f"--data_dir={root}", f"--out_dir={out}", *TINY,
                           f"--seed={seed}"]) == 0
        dirs.append(out)
    return dirs


def lines_with_data(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_runs_are_overlaid_with_legends_from_their_settings(two_runs, tmp_path):
    runs = [plot.read_run(d) for d in two_runs]
    plot.label_runs(runs)
    assert [r.label for r in runs] == ["seed=1", "seed=2"]
    fig = plot.runs_figure(runs)
    ax_loss, ax_time, ax_lr, ax_speed = fig.axes
    assert len(fig.axes) == 4
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["seed=1", "seed=2"]  # the val lines
    assert len(lines_with_data(ax_loss)) == 4  # and each run's train line
    train_line = lines_with_data(ax_loss)[0]
    assert list(train_line.get_xdata()) == [2, 4, 6, 8]
    records = [json.loads(x) for x in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert list(train_line.get_ydata()) == [r["loss"] for r in records if "loss" in r]
    assert list(lines_with_data(ax_loss)[1].get_xdata()) == [0, 4, 8]  # evaluations
    assert list(lines_with_data(ax_time)[0].get_xdata()) == [r["train_seconds"] for r in records if "val_loss" in r]
    assert len(lines_with_data(ax_lr)) == len(lines_with_data(ax_speed)) == 2
    assert plot.main([*map(str, two_runs), f"--out={tmp_path / 'loss.png'}"]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_alike_in_every_setting_are_named_by_their_directories(two_runs):
    runs = [plot.read_run(two_runs[0])]
    plot.label_runs(runs)
    assert runs[0].label == "seed1"


def test_attention_rows_sum_to_one_with_nothing_above_the_diagonal(two_runs):
    model, tokenizer = model_from_checkpoint(load_checkpoint(two_runs[0] / "best.pt"), "x")
    ids = tokenizer.encode("ROMEO: the rose").tolist()
    maps = attention_maps.attention_probabilities(model, torch.tensor([ids]))
    assert len(maps) == model.config.n_layer
    for layer in maps:
        assert layer.shape == (model.config.n_head, len(ids), len(ids))
        torch.testing.assert_close(layer.sum(-1), torch.ones(model.config.n_head, len(ids)))
        assert torch.count_nonzero(torch.triu(layer, diagonal=1)) == 0
        assert (layer.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_attention_maps_are_the_models_own_weights(two_runs):
    """The recomputed probabilities reproduce the layer's output: p @ v, projected, is what it returns."""
    model, tokenizer = model_from_checkpoint(load_checkpoint(two_runs[0] / "best.pt"), "x")
    layer = model.transformer.h[0].attn
    x = torch.randn(1, 10, model.config.n_embd)
    captured = []
    hook = layer.register_forward_hook(lambda m, args, out: captured.append(out))
    (probs,) = attention_maps.attention_probabilities(_Single(layer, model.config), x)
    hook.remove()
    _, _, v = layer.c_attn(x).split(model.config.n_embd, dim=2)
    v = v.view(1, 10, layer.n_head, -1).transpose(1, 2)
    y = (probs[None] @ v).transpose(1, 2).reshape(1, 10, -1)
    torch.testing.assert_close(layer.c_proj(y), captured[0], rtol=1e-5, atol=1e-5)


class _Single(torch.nn.Module):
    """One attention layer as a model: attention_maps runs it on its input."""

    def __init__(self, layer, config):
        super().__init__()
        self.layer, self.config = layer, config

    def forward(self, x):
        return self.layer(x)


def test_the_attention_picture_has_a_heatmap_per_layer_and_head(two_runs, tmp_path, capsys):
    out = tmp_path / "attn.png"
    assert attention_maps.main([f"--checkpoint={two_runs[0] / 'best.pt'}", "--prompt=ROMEO: the", f"--out={out}"]) == 0
    assert out.is_file() and "reference path" in capsys.readouterr().out
    model, tokenizer = model_from_checkpoint(load_checkpoint(two_runs[0] / "best.pt"), "x")
    ids = tokenizer.encode("ROMEO: the").tolist()
    fig = attention_maps.attention_figure(attention_maps.attention_probabilities(model, torch.tensor([ids])),
                                     attention_maps.token_labels(tokenizer, ids), "t")
    assert len(fig.axes) == model.config.n_layer * model.config.n_head
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list("ROMEO:␣the")
    assert [t.get_text() for t in ax.get_yticklabels()] == list("ROMEO:␣the")
    assert ax.get_images()[0].get_array().shape == (len(ids), len(ids))


@pytest.mark.parametrize("case, message", [
    ("no metrics", "has no metrics.jsonl"),
    ("empty metrics", "has no training records"),
    ("no out", "--out=FILE.png"),
    ("bad suffix", "needs a picture's suffix"),
])
def test_bad_plot_input_is_one_line_and_exit_2(tmp_path, cli, two_runs, case, message):
    run = tmp_path / "run"
    run.mkdir()
    args = [str(run), f"--out={tmp_path / 'x.png'}"]
    if case == "empty metrics":
        (run / "metrics.jsonl").write_text("")
    elif case == "no out":
        args = [str(two_runs[0])]
    elif case == "bad suffix":
        args = [str(two_runs[0]), f"--out={tmp_path / 'x.txt'}"]
    if case == "no metrics":  # the command line's side: one line on stderr, exit 2
        result = cli("fastgpt.plot", *args)
        assert message in one_line_error(result)
    else:
        with pytest.raises(UserError, match=message):
            plot.main(args)


@pytest.mark.parametrize("prompt, message", [("", "the prompt is empty"), ("ROMEO " * 8, "longer than the model's block_size"),
                                             ("ROMEO: #", "the model's vocabulary lacks")])
def test_bad_attention_input_is_one_line_and_exit_2(tmp_path, cli, two_runs, prompt, message):
    argv = [f"--checkpoint={two_runs[0] / 'best.pt'}", f"--prompt={prompt}", f"--out={tmp_path / 'a.png'}"]
    if not prompt:  # the command line's side: one line on stderr, exit 2
        result = cli("fastgpt.attention_maps", *argv)
        assert message in one_line_error(result)
    else:
        with pytest.raises(UserError, match=message):
            attention_maps.main(argv)


def test_a_missing_matplotlib_is_named(monkeypatch, two_runs, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[plot\]"'):
        plot.main([str(two_runs[0]), f"--out={tmp_path / 'x.png'}"])
