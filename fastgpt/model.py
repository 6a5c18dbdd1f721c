"""The GPT: a pre-norm, decoder-only Transformer over characters, as in nanoGPT and "Let's build GPT",
and the lecture's steps towards it as models of their own.

Modules here only hold parameters and call the ops in `kernels` (LayerNorm, causal attention, linear +
GELU), which run Triton kernels or their PyTorch references as `kernels.set_backend` says. The GPT's
parameter names are nanoGPT's; the earlier steps' are the lecture's.

The progression (`GPTConfig.model`, `build_model`), each step adding one idea to the one before:
  bigram       a vocab x vocab table read as next-character logits: no context at all
  attention    token + position embeddings, one causal self-attention head, a linear head
  multihead    n_head smaller heads in place of the single one
  feedforward  a position-wise MLP after the attention: the tokens "think" about what they gathered
  blocks       n_layer pre-norm blocks (LayerNorm -> attention / MLP -> residual add), a final LayerNorm
  gpt          the full model: blocks plus dropout (what the presets train)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import kernels

def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


MODELS = ("bigram", "attention", "multihead", "feedforward", "blocks", "gpt")


@dataclass
class GPTConfig:
    vocab_size: int = 65  # number of distinct characters in the corpus
    block_size: int = 256  # longest context the model sees
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # width of the residual stream
    dropout: float = 0.2  # on attention probabilities, residual branches and embeddings
    bias: bool = False  # biases in Linear and LayerNorm layers
    attn_window: int | None = None  # sliding attention window; None = full causal attention
    model: str = "gpt"  # step of the lecture's progression, one of MODELS
    pad_vocab: int = 1  # the output layer's rows rounded up to a multiple of this (64 on GPUs: nanoGPT's 50304)

    @property
    def output_size(self) -> int:
        """Rows of the output layer: vocab_size rounded up to a multiple of pad_vocab. The padding rows are
        never predicted (masked out of the loss, trimmed off the logits, dropped on export). The bigram
        model's table is its own output and is not padded."""
        if self.model == "bigram":
            return self.vocab_size
        return -(-self.vocab_size // self.pad_vocab) * self.pad_vocab


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, 1e-5)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, layer_norm(h)) for h = x + residual, in one pass over the residual stream."""
        return kernels.add_layer_norm(x, residual, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of one attention layer for the positions generated so far.

    Allocated on first use for the full context, (B, H, block_size, head_dim), in the dtype the layer
    computes in (autocast included), so a generation step writes one position instead of concatenating.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hs) at positions pos..pos+T-1; return all keys and values so far."""
        if self.k is None:
            B, H, _, hs = k.shape
            self.k = k.new_empty((B, H, self.block_size, hs))
            self.v = v.new_empty((B, H, self.block_size, hs))
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.window = config.attn_window

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, nh, pos + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = kernels.causal_attention(q, k, v, dropout_p=dropout_p, window=self.window)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = kernels.linear_gelu(x, self.c_fc.weight, self.c_fc.bias)  # (B, T, 4C)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """nanoGPT's `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`, the first residual add done by the
        LayerNorm that reads its result (one pass over the stream instead of two)."""
        x, h = self.ln_2.add_and_norm(x, self.attn(self.ln_1(x), cache, pos))  # x += attn(ln_1(x)); h = ln_2(x)
        return x + self.mlp(h)


class LanguageModel(nn.Module):
    """What every model of the progression shares: the loss, generation with a KV cache, the
    optimizer's parameter groups, parameter and FLOP counts. Subclasses define `hidden` and, when they
    have one, the output layer `lm_head` (None: `hidden` gives the logits themselves)."""

    n_attention_layers = 0  # attention layers, each with its own KV cache

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config

    def hidden(self, idx: torch.Tensor, cache: list[KVCache] | None, pos: int) -> torch.Tensor:
        """What the output layer reads, (B, T, C), for token ids idx (B, T) at positions pos..pos+T-1 (the
        logits themselves for a model without an output layer)."""
        raise NotImplementedError

    def logits(self, idx: torch.Tensor, cache: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) for token ids idx (B, T) at positions pos..pos+T-1 (the
        padding rows of the output layer left out)."""
        h = self.hidden(idx, cache, pos)
        if self.lm_head is None:
            return h
        logits = self.lm_head(h)
        return logits[..., :self.config.vocab_size] if logits.size(-1) > self.config.vocab_size else logits

    def vocab_dims(self) -> dict[str, tuple[int, ...]]:
        """The weights (state_dict names) that have a row or column per token, and which of their
        dimensions those are: what a grown vocabulary extends and an export trims to vocab_size."""
        return {}

    def trimmed_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict() without the output layer's padding rows (what exports write)."""
        state = self.state_dict()
        for name, dims in self.vocab_dims().items():
            for dim in dims:
                state[name] = state[name].narrow(dim, 0, self.config.vocab_size)
        return state

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, None) for token ids idx (B, T); given targets (B, T), (None, their mean cross-entropy).

        The loss is computed with the output layer (kernels.linear_cross_entropy, fused where the
        logits would be large), so the logits are not returned with it: call the model without
        targets for them. With `cache` (from `new_cache`), idx holds positions pos..pos+T-1 and the
        keys and values of the earlier positions come from the cache.
        """
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of length {pos + T} exceeds block_size {self.config.block_size}")
        if targets is None:
            return self.logits(idx, cache, pos), None  # (B, T, vocab_size)
        h = self.hidden(idx, cache, pos)
        if self.lm_head is None:
            return None, F.cross_entropy(h.view(-1, h.size(-1)), targets.reshape(-1))
        return None, kernels.linear_cross_entropy(h, self.lm_head.weight, targets, self.lm_head.bias,
                                                  n_classes=self.config.vocab_size)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embeddings are left out by default (token embeddings count:
        they are tied to, or are, the output layer), as nanoGPT counts."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if not (non_embedding and name.endswith(("wpe.weight", "position_embedding_table.weight"))))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the weight matmuls forward and backward, plus 12*L*H*Q*T
        for attention scores and their use (PaLM, appendix B; nanoGPT's MFU estimate); H*Q = n_embd.
        N leaves out the tables that are only looked up: position embeddings, and token embeddings that
        are not also the output layer (tied in the GPT, so there its 6N is nanoGPT's)."""
        c = self.config
        outputs = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        lookups = sum(m.weight.numel() for m in self.modules()
                      if isinstance(m, nn.Embedding) and id(m.weight) not in outputs)
        matmul_params = sum(p.numel() for p in self.parameters()) - lookups
        return 6 * matmul_params + 12 * self.n_attention_layers * c.n_embd * c.block_size

    def new_cache(self) -> list[KVCache]:
        """An empty KV cache, one KVCache per attention layer."""
        return [KVCache(self.config.block_size) for _ in range(self.n_attention_layers)]

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only; the fused implementation
        on CUDA and on the CPU (on the cpu preset it steps ~3.5x faster than the foreach one), and on
        MPS from torch 2.5, which added it there; the foreach one elsewhere."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu") or (device_type == "mps" and torch_version() >= (2, 5))
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens) (`stream`'s
        tokens, gathered)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator, use_cache)], dim=1)

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Sample max_new_tokens tokens after idx (B, T), yielding each (B, 1) as soon as it is drawn.

        The context is the last block_size tokens. With `use_cache`, each step runs only the newest
        token against cached keys and values; once the sequence outgrows block_size every position
        shifts, so the cache is refilled from the cropped context - the same computation as without
        the cache, which is why both give the same tokens for the same generator.
        """
        block_size = self.config.block_size
        cache, pos = None, 0
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is not None and pos < block_size:
                logits, _ = self(idx[:, -1:], cache=cache, pos=pos)
                pos += 1
            else:
                context = idx[:, -block_size:]
                cache = self.new_cache()
                logits, _ = self(context, cache=cache, pos=0)
                pos = context.size(1)
            logits = logits[:, -1, :]  # (B, vocab_size)
            # shifted so the largest logit is 0: a tiny temperature then sharpens to argmax, not to inf/nan
            logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

class BigramLanguageModel(LanguageModel):
    """Step 1: each character's row of a vocab x vocab table is the logits of the next character."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        self.lm_head = None  # the table's rows are the logits
        self.apply(self._init_weights)

    def hidden(self, idx: torch.Tensor, cache: list[KVCache] | None, pos: int) -> torch.Tensor:
        return self.token_embedding_table(idx)  # (B, T, vocab_size): the logits

    def vocab_dims(self) -> dict[str, tuple[int, ...]]:
        return {"token_embedding_table.weight": (0, 1)}


class AttentionLanguageModel(LanguageModel):
    """Steps 2-4: embeddings, one causal self-attention layer (single- or multi-head), optionally a
    position-wise MLP, and a linear head; no residual connections or normalisation yet."""

    n_attention_layers = 1

    def __init__(self, config: GPTConfig, n_head: int, feedforward: bool):
        super().__init__(config)
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.sa_heads = CausalSelfAttention(dataclasses.replace(config, n_head=n_head))
        self.ffwd = MLP(config) if feedforward else None
        self.lm_head = nn.Linear(config.n_embd, config.output_size, bias=config.bias)
        self.apply(self._init_weights)

    def vocab_dims(self) -> dict[str, tuple[int, ...]]:
        dims = {"token_embedding_table.weight": (0,), "lm_head.weight": (0,)}
        return dims | ({"lm_head.bias": (0,)} if self.lm_head.bias is not None else {})

    def hidden(self, idx: torch.Tensor, cache: list[KVCache] | None, pos: int) -> torch.Tensor:
        positions = torch.arange(pos, pos + idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        x = self.token_embedding_table(idx) + self.position_embedding_table(positions)  # (B, T, C)
        x = self.sa_heads(x, None if cache is None else cache[0], pos)
        if self.ffwd is not None:
            x = self.ffwd(x)
        return x


class GPT(LanguageModel):
    """Steps 5 and 6: the Transformer. `blocks` is this model without dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.n_attention_layers = config.n_layer
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.output_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.output_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def vocab_dims(self) -> dict[str, tuple[int, ...]]:
        return {"transformer.wte.weight": (0,), "lm_head.weight": (0,)}

    def hidden(self, idx: torch.Tensor, cache: list[KVCache] | None, pos: int) -> torch.Tensor:
        positions = torch.arange(pos, pos + idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], pos)
        return self.transformer.ln_f(x)


def build_model(config: GPTConfig) -> LanguageModel:
    """The model of the progression that config.model names (see the module docstring)."""
    no_dropout = dataclasses.replace(config, dropout=0.0)  # dropout arrives with the last step
    if config.model == "bigram":
        return BigramLanguageModel(config)
    if config.model in ("attention", "multihead", "feedforward"):
        return AttentionLanguageModel(no_dropout, n_head=1 if config.model == "attention" else config.n_head,
                                      feedforward=config.model == "feedforward")
    if config.model == "blocks":
        return GPT(no_dropout)
    if config.model == "gpt":
        return GPT(config)
    raise ValueError(f"unknown model {config.model!r}: choose one of {', '.join(MODELS)}")
