"""Sample from a trained model: `python -m fastgpt.sample [--out_dir=out] [--prompt=TEXT] [...]`.

Generation uses a KV cache (the same tokens as cache-free generation for the same seed) and keeps
going past block_size by sliding the context window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastgpt import kernels, memory
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.cli import UserError, parse_command, run_main
from fastgpt.text import read_text_file
from fastgpt.distributed import resolve_device
from fastgpt.model import LanguageModel
from fastgpt.tokenizer import Tokenizer, check_prompt, default_prompt


@dataclass
class SampleConfig:
    out_dir: str = "out"  # training output directory; its best.pt is sampled unless --checkpoint is given
    checkpoint: str = ""  # path of a checkpoint file; overrides out_dir
    prompt: str = "\n"  # text to continue (by default a newline, or the vocabulary's first character)
    prompt_file: str = ""  # read the prompt from this UTF-8 file instead of --prompt
    num_samples: int = 3  # independent samples, generated as one batch
    max_new_tokens: int = 500  # tokens generated per sample (characters with the char tokenizer)
    temperature: float = 0.8  # < 1 sharpens, > 1 flattens the distribution; must be > 0
    top_k: int = 0  # sample among the k most likely tokens only; 0 = all
    seed: int = 1337  # seeds the sampling generator
    kv_cache: bool = True  # reuse keys and values of earlier positions
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, mps, cuda, cuda:N
    reference: bool = False  # run every kernel as its PyTorch reference


def complete(model: LanguageModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, seed: int, *,
             num_samples: int = 1, temperature: float = 0.8, top_k: int | None = None,
             use_cache: bool = True) -> list[str]:
    """`num_samples` continuations of `prompt` (each returned with the prompt), sampled on the model's
    device from a generator seeded with `seed`.

    In fp32 whatever the device: generating a few characters is cheap, and in fp32 the cached and the
    cache-free computation agree (bf16 rounds them differently and can flip a sampled character).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    idx = torch.from_numpy(tokenizer.encode(prompt)).to(device)[None].repeat(num_samples, 1)  # (N, T)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                         use_cache=use_cache)
    return [tokenizer.decode(row) for row in out.tolist()]


def main(argv: list[str]) -> int:
    cfg, given = parse_command(SampleConfig, argv, SampleConfig(), "fastgpt.sample")
    if "prompt" in given and cfg.prompt_file:
        raise UserError("pass either --prompt or --prompt_file, not both")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0:
        raise UserError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    if not 0 < cfg.temperature < float("inf"):
        raise UserError(f"--temperature must be a finite number > 0, got {cfg.temperature}: use e.g. 0.8")
    path = Path(cfg.checkpoint) if cfg.checkpoint else Path(cfg.out_dir) / "best.pt"
    model, tokenizer = model_from_checkpoint(load_checkpoint(path), path)
    if not 0 <= cfg.top_k <= tokenizer.vocab_size:
        raise UserError(f"--top_k must be between 1 and the vocabulary size {tokenizer.vocab_size} "
                        f"(or 0 for no top-k), got {cfg.top_k}")
    if cfg.prompt_file:
        prompt = read_text_file(Path(cfg.prompt_file), "--prompt_file")[0]
    else:
        prompt = cfg.prompt if "prompt" in given else default_prompt(tokenizer)
    check_prompt(tokenizer, prompt)

    kernels.set_backend("reference" if cfg.reference else "auto")
    device = resolve_device(cfg.device)
    memory.check_sampling(model.config, cfg.num_samples, len(prompt) + cfg.max_new_tokens, device)
    model.to(device)
    texts = complete(model, tokenizer, prompt, cfg.max_new_tokens, cfg.seed, num_samples=cfg.num_samples,
                     temperature=cfg.temperature, top_k=cfg.top_k or None, use_cache=cfg.kv_cache)
    print("\n---------------\n".join(texts))
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.sample")
