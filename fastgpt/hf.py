"""Export to Hugging Face transformers: a GPT-2 folder that `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load (`python -m fastgpt.export --format=hf`).

fastgpt's GPT is nanoGPT's, which is GPT-2 with exact GELU (`activation_function="gelu"`) and optional
biases: the weights keep their names, the four projections are transposed into GPT-2's Conv1D layout,
and a model without biases gets zero ones. The tokenizer becomes a `tokenizers` file: the characters as
a merge-free BPE (each character one token), the trained BPE as it is, GPT-2's from tiktoken's ranks
(the merges recovered from them, as transformers' own tiktoken converter does).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fastgpt.checkpoint import exportable
from fastgpt.cli import UserError
from fastgpt.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer

EXTRA = "hf"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(f'--format=hf needs the transformers package: pip install -e ".[{EXTRA}]"') from None
    return transformers


def hf_state(model) -> dict[str, torch.Tensor]:
    """fastgpt's GPT weights under GPT-2's names and layouts, with zero biases where it has none."""
    state = {name: t.detach().clone() for name, t in model.trimmed_state_dict().items()}
    for name in list(state):
        if name.endswith(CONV1D):
            state[name] = state[name].t().contiguous()  # nn.Linear (out, in) -> Conv1D (in, out)
    for name, t in list(state.items()):  # every Linear but lm_head and every LayerNorm has a bias in GPT-2
        if name.endswith(".weight") and (name.endswith(CONV1D) or ".ln_" in name or name.startswith("transformer.ln_f")):
            bias = name[:-len("weight")] + "bias"
            if bias not in state:
                width = t.shape[-1] if name.endswith(CONV1D) else t.shape[0]
                state[bias] = torch.zeros(width, dtype=t.dtype)
    return state


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the byte-level BPE's alphabet): printable
    Latin-1 bytes stand for themselves, the others take the code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge of each multi-byte token, in rank order: the two parts byte-level BPE reaches for it
    using only the tokens ranked before it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes as `tokenizer` does."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if isinstance(tokenizer, BPETokenizer):
        return HFTokenizer.from_str(tokenizer.serialized)
    if isinstance(tokenizer, CharTokenizer):
        tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.vocab)}, merges=[]))
        tok.decoder = decoders.Fuse()  # the characters joined as they are, no spaces between
        return tok
    assert isinstance(tokenizer, GPT2Tokenizer)
    ranks = tokenizer.mergeable_ranks()
    alphabet = bytes_to_unicode()
    show = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    tok = HFTokenizer(models.BPE(vocab={show(t): r for t, r in ranks.items()},
                                 merges=[(show(a), show(b)) for a, b in merges_from_ranks(ranks)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    for name, rank in tokenizer.special_tokens():
        if rank != tok.get_vocab_size():
            raise UserError(f"GPT-2's special token {name} has id {rank}, past its BPE's {tok.get_vocab_size()}: "
                            f"this tiktoken encoding does not convert")
        tok.add_special_tokens([name])
    return tok


def to_hf(ckpt: dict, path: Path, out: Path) -> list[Path]:
    transformers = require_transformers()
    transformers.utils.logging.set_verbosity_error()  # its notes on GPT-2's defaults, its progress bars
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = exportable(ckpt, path, "hf")
    c = model.config
    # GPT-2's end-of-text token is its bos and eos, as in GPT-2's own config; the others have none
    special = tokenizer.special_tokens() if isinstance(tokenizer, GPT2Tokenizer) else []
    end = special[0] if special else (None, None)
    config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.n_embd, activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=c.dropout,
        embd_pdrop=c.dropout, attn_pdrop=c.dropout, bos_token_id=end[1], eos_token_id=end[1], pad_token_id=None,
        tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(hf_state(model), strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # old masks
    if missing or unexpected:
        raise UserError(f"{path} does not map onto GPT-2 (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                        f"export a checkpoint of --model=gpt")
    names = {"bos_token": end[0], "eos_token": end[0]} if end[0] else {}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(tokenizer), **names,
                                                clean_up_tokenization_spaces=False, model_max_length=c.block_size)
    # transformers writes in place: it writes into a staging folder beside the files, each then renamed
    # over its namesake, so a file of an earlier export (--force) is replaced whole or not at all
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as staging:
        hf.save_pretrained(staging, safe_serialization=True)
        fast.save_pretrained(staging)
        for made in sorted(Path(staging).iterdir()):
            os.replace(made, out / made.name)
            written.append(out / made.name)
    return written
