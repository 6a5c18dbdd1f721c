"""Training configuration: `TrainConfig` (every field a flag of `python -m fastgpt.train`, through
fastgpt.cli's parser), its validation and its presets."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastgpt.cli import ShowHelp, UserError, format_help, parse_flags
from fastgpt.model import MODELS, GPTConfig
from fastgpt.tokenizer import KINDS

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_BPE_VOCAB = 1 << 20
MAX_PAD_VOCAB = 4096
PAD_VOCAB_CUDA = 64  # tensor cores and cuBLAS tiles like a multiple of 64 rows (nanoGPT's 50304)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    # defaults are nanoGPT's shakespeare_char config; see PRESETS for the cpu recipe
    out_dir: str = "out"  # checkpoints (ckpt.pt latest, best.pt best val) and metrics.jsonl go here
    data_file: str = ""  # UTF-8 text to train on: a file, a directory of .txt files or a glob; empty = Tiny Shakespeare, downloaded into data_dir
    data_dir: str = "data"  # where the corpus is downloaded and encoded splits are cached
    tokenizer: str = "char"  # char (the corpus' characters), bpe (a byte-level BPE trained on the train split), gpt2 (GPT-2's, through tiktoken)
    vocab_size: int = 2048  # with --tokenizer=bpe: tokens of the trained BPE (its 256 bytes and the merges)
    resume: bool = False  # continue exactly from out_dir/ckpt.pt
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run, replacing it
    init_from: str = ""  # fine-tune: start from this checkpoint's weights (new optimizer, iteration 0)
    extend_vocab: bool = False  # with init_from: add the new text's extra characters to the vocabulary
    model: str = "gpt"  # step of the lecture: bigram, attention, multihead, feedforward, blocks, gpt
    eval_interval: int = 250  # iterations between evaluations (and checkpoints)
    eval_iters: int = 200  # batches per split in each evaluation
    log_interval: int = 10  # iterations between log lines
    batch_size: int = 64  # sequences per micro-batch
    block_size: int = 256  # context length
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # residual stream width
    dropout: float = 0.2  # dropout rate in training
    bias: bool = False  # biases in Linear and LayerNorm layers
    attn_window: int | None = None  # sliding attention window (None = full causal)
    pad_vocab: int | None = None  # round the output layer up to a multiple of this many tokens (never predicted); None = 64 on CUDA, 1 elsewhere
    learning_rate: float = 1e-3  # peak learning rate
    max_iters: int = 5000  # total optimizer steps
    target_val_loss: float | None = None  # stop at the first evaluation whose val loss is at or below this
    weight_decay: float = 0.1  # AdamW weight decay on >= 2-D weights
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    decay_lr: bool = True  # cosine learning-rate decay after warmup
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 5000  # step at which the cosine reaches min_lr
    min_lr: float = 1e-4  # floor of the learning rate
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, mps, cuda, cuda:N
    dtype: str = "auto"  # auto (CUDA: bfloat16 autocast, float16 with loss scaling without bf16; else float32), float32, bfloat16, float16
    compile: bool | None = None  # torch.compile the model; None = on for CUDA, off on CPU (measured faster)
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead and max-autotune use CUDA graphs
    reference: bool = False  # run every kernel as its PyTorch reference
    seed: int = 1337  # seeds the weights, dropout and batch sampling
    sample_chars: int = 200  # characters of sample printed at the end; 0 = none
    eval_sample: int = 100  # tokens sampled from a fixed prompt and seed at each evaluation, kept in metrics.jsonl (fastgpt.dashboard shows them); 0 = none
    tensorboard: bool = False  # also write the metrics as TensorBoard event files under out_dir/tb
    save_checkpoints: bool = True  # write ckpt.pt (every evaluation, and on a stop signal) and best.pt; False for measurements that keep none (bench.report)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig these settings describe, for a corpus of vocab_size characters."""
        fields = {name: getattr(self, name) for name in MODEL_FIELDS}
        return GPTConfig(vocab_size=vocab_size, **fields | {"pad_vocab": self.pad_vocab or 1})

    def for_device(self, device_type: str) -> TrainConfig:
        """These settings with the defaults that depend on the device filled in (pad_vocab)."""
        if self.pad_vocab is not None:
            return self
        return dataclasses.replace(self, pad_vocab=PAD_VOCAB_CUDA if device_type == "cuda" else 1)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name} must be a finite number, got {value}")
        if not self.out_dir:
            raise UserError("--out_dir is empty: name a directory for the checkpoints, e.g. --out_dir=out")
        if abs(self.seed) >= 2**62:  # torch generators take 64-bit seeds; ranks add small offsets
            raise UserError(f"--seed must be between -2**62 and 2**62, got {self.seed}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.model not in MODELS:
            raise UserError(f"unknown --model={self.model}: choose one of {', '.join(MODELS)}")
        if self.resume and self.init_from:
            raise UserError("--resume continues a run and --init_from starts a new one: pass only one")
        if self.tokenizer not in KINDS:
            raise UserError(f"unknown --tokenizer={self.tokenizer}: choose one of {', '.join(KINDS)}")
        if not 256 <= self.vocab_size <= MAX_BPE_VOCAB:
            raise UserError(f"--vocab_size must be between 256 (the bytes alone) and {MAX_BPE_VOCAB}, got "
                            f"{self.vocab_size}")
        if self.extend_vocab and not self.init_from:
            raise UserError("--extend_vocab grows a checkpoint's vocabulary: use it with --init_from=CKPT")
        positive = ["eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "n_layer",
                    "n_head", "n_embd", "gradient_accumulation_steps", "lr_decay_iters"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ["max_iters", "warmup_iters", "sample_chars", "eval_sample"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd={self.n_embd} must be a multiple of --n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.pad_vocab is not None and not 1 <= self.pad_vocab <= MAX_PAD_VOCAB:
            raise UserError(f"--pad_vocab must be between 1 and {MAX_PAD_VOCAB}, got {self.pad_vocab}")
        if self.attn_window is not None and self.attn_window < 1:
            raise UserError(f"--attn_window must be >= 1 or None, got {self.attn_window}")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise UserError("need 0 <= --min_lr <= --learning_rate and --learning_rate > 0")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("--grad_clip and --weight_decay must be >= 0")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, "
                            f"got {self.compile_mode!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")


PRESETS: dict[str, TrainConfig] = {
    "shakespeare_char": TrainConfig(),
    # nanoGPT's CPU recipe (README of karpathy/nanoGPT) with a learning rate for its smaller model:
    # 3e-3 reaches val 1.77 where 1e-3 (nanoGPT's) reaches 1.90 in the same 2000 steps (see README)
    "cpu": TrainConfig(eval_iters=20, block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128,
                       max_iters=2000, lr_decay_iters=2000, dropout=0.0, learning_rate=3e-3),
    # fine-tuning a trained model (--init_from) on a new, usually small, text: a tenth of the learning
    # rate for a short schedule, evaluated often; the model's shape comes from the checkpoint
    "finetune": TrainConfig(out_dir="out-finetune", batch_size=32, eval_interval=50, eval_iters=20,
                            learning_rate=3e-4, min_lr=3e-5, warmup_iters=20, max_iters=500,
                            lr_decay_iters=500, dropout=0.1),
}

# the model's settings that are also the trainer's flags (all of GPTConfig's but the vocabulary, which the
# corpus decides), and of those the ones that fix the model's shape: a resumed or fine-tuned run takes them
# from its checkpoint (dropout it may change)
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size")
ARCHITECTURE_FIELDS = tuple(name for name in MODEL_FIELDS if name != "dropout")


def parse_train_args(argv: Sequence[str], cuda_available: bool) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from the command line: `--preset NAME` picks the base, flags override it.

    With no preset: shakespeare_char when CUDA is available, cpu otherwise. `--help` prints the flags
    and exits.
    """
    argv = list(argv)
    preset = "shakespeare_char" if cuda_available else "cpu"
    rest = []
    while argv:
        arg = argv.pop(0)
        if arg == "--preset" or arg.startswith("--preset="):
            preset = arg.partition("=")[2] if "=" in arg else (argv.pop(0) if argv else "")
            if preset not in PRESETS:
                raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        else:
            rest.append(arg)
    if "--help" in rest or "-h" in rest:
        raise ShowHelp(format_help(TrainConfig, "fastgpt.train", PRESETS[preset],
                                   f"  --preset NAME  one of {', '.join(PRESETS)} (this machine's default: "
                                   f"{'shakespeare_char' if cuda_available else 'cpu'}); defaults below are "
                                   f"{preset}'s"))
    cfg, given = parse_flags(TrainConfig, rest, PRESETS[preset])
    if preset == "finetune" and not (cfg.init_from or cfg.resume):
        raise UserError("the finetune preset continues a trained model: pass --init_from=CKPT "
                        "(or --resume to continue a fine-tuning run)")
    cfg.validate()
    if "vocab_size" in given and cfg.tokenizer != "bpe":
        raise UserError("--vocab_size sets the size of a trained BPE: use it with --tokenizer=bpe")
    return cfg, given


# each model setting is a trainer flag
assert set(MODEL_FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}, "TrainConfig lacks a GPTConfig field"
