"""How a run starts, decided in one place: afresh, resuming out_dir/ckpt.pt (`--resume`), or fine-tuning
another checkpoint's weights (`--init_from`). `resolve` settles the configuration (a resumed run takes
its checkpoint's, with this command line's flags on top; a fine-tuned one takes its source's
architecture) and the tokenizer; `check_world` what the processes of the job must agree with;
`load_into` the weights, optimizer, RNG states and train state of the model built from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgpt.checkpoint import check_resumable_state, load_checkpoint, load_weights, require, tokenizer_state
from fastgpt.cli import UserError
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig
from fastgpt.device import set_device_rng_state
from fastgpt.distributed import World
from fastgpt.model import GPTConfig

# what a resumable checkpoint holds
RESUME_KEYS = ("model", "model_config", "vocab", "optimizer", "train_config", "rng", "iter_num")


@dataclass
class Start:
    """The resolved start of a run: its configuration, the checkpoint it resumes or fine-tunes (at most
    one), and the tokenizer state it continues with (None: a new tokenizer for the corpus)."""
    cfg: TrainConfig
    ckpt: dict | None = None  # --resume: out_dir/ckpt.pt
    init: dict | None = None  # --init_from: the checkpoint whose weights it starts from
    tokenizer_state: dict | None = None

    @property
    def ckpt_path(self) -> Path:
        return Path(self.cfg.out_dir) / "ckpt.pt"


def resolve(cfg: TrainConfig, given: set[str]) -> Start:
    """The run's start from the command line's config and the flags it gave."""
    ckpt = init = None
    if cfg.resume:
        path = Path(cfg.out_dir) / "ckpt.pt"
        ckpt = require(load_checkpoint(path), path, "resume", RESUME_KEYS)
        cfg = resume_config(cfg, given, ckpt)
    elif cfg.init_from:
        init = require(load_checkpoint(cfg.init_from), cfg.init_from, "fine-tune from", ("model", "model_config", "vocab"))
        cfg = adopt_architecture(cfg, given, init["model_config"], cfg.init_from)
    cfg, state = checkpoint_tokenizer(cfg, given, ckpt, init)
    return Start(cfg, ckpt, init, state)


def check_world(start: Start, given: set[str], world: World) -> Start:
    """A resumed checkpoint must come from a job of this many processes on this kind of device; a new run
    under torchrun takes one micro-batch per process unless told otherwise."""
    cfg = start.cfg
    if start.ckpt is not None:
        check_resumable(start.ckpt, world, start.ckpt_path)
    elif "gradient_accumulation_steps" not in given and world.size > 1:
        # under torchrun, one micro-batch per process: the global batch is processes x batch_size
        cfg = dataclasses.replace(cfg, gradient_accumulation_steps=world.size)
    if cfg.gradient_accumulation_steps % world.size:
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the global "
                        f"number of micro-batches and must be a multiple of the {world.size} processes")
    return dataclasses.replace(start, cfg=cfg)


def load_into(start: Start, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, scaler,
              world: World) -> dict | None:
    """Put the start's weights into `model` (a fine-tuning source's, or a resumed run's with its optimizer,
    RNG states, batch stream and loss scaler, each checked first). Returns the resumed train state
    (iter_num, best_val_loss) or None."""
    if start.init is not None:
        load_weights(model, start.init["model"], start.cfg.init_from,
                     (start.init.get("model_config") or {}).get("vocab_size"))
    ckpt = start.ckpt
    if ckpt is None:
        return None
    path, device = start.ckpt_path, world.device
    check_resumable_state(ckpt, model, optimizer, path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"][world.rank]
    try:
        torch.set_rng_state(rng["torch"])
        set_device_rng_state(device, rng.get(device.type) if device.type != "cpu" else None)
    except (RuntimeError, TypeError, KeyError, AttributeError):
        raise UserError(f"{path} is damaged (its RNG states are not torch's): resume from another "
                        f"checkpoint, or start afresh with --overwrite") from None
    try:
        batches.generator.set_state(rng["batches"])
    except (RuntimeError, TypeError, KeyError):  # a CUDA generator's state for a host one, or the other way round
        raise UserError("the checkpoint's batch stream was drawn on another kind of device (or with the split "
                        "held elsewhere, or is damaged): resume on the machine that wrote it") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return {"iter_num": ckpt["iter_num"], "best_val_loss": ckpt["best_val_loss"]}


def adopt_architecture(cfg: TrainConfig, given: set[str], saved: dict, source: str) -> TrainConfig:
    """cfg with the model-shape fields of a checkpoint's model config; a flag given on the command
    line that contradicts them is a UserError."""
    saved = dataclasses.asdict(GPTConfig(**saved))  # an older checkpoint lacks the newer fields: their defaults
    for name in ARCHITECTURE_FIELDS:
        if name in given and getattr(cfg, name) != saved[name]:
            raise UserError(f"--{name}={getattr(cfg, name)} differs from {source}'s {saved[name]}: drop the "
                            f"flag, or train a new model in another --out_dir")
    return dataclasses.replace(cfg, **{name: saved[name] for name in ARCHITECTURE_FIELDS})


def resume_config(cfg: TrainConfig, given: set[str], ckpt: dict) -> TrainConfig:
    """The checkpoint's train config, with the flags given on this command line applied on top."""
    # a fine-tuned run started from init_from; resuming it starts from this checkpoint instead
    try:
        saved = dataclasses.replace(TrainConfig(**ckpt["train_config"]), init_from="", extend_vocab=False)
    except TypeError as e:
        raise UserError(f"the checkpoint's train config does not fit this fastgpt ({e}): resume with the "
                        f"fastgpt that wrote it") from None
    # the run continues in the folder it was read from, whatever out_dir the checkpoint recorded
    merged = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given | {"out_dir"}})
    merged = adopt_architecture(merged, given, ckpt["model_config"], "the checkpoint")
    merged.validate()
    return merged


def check_resumable(ckpt: dict, world: World, ckpt_path: Path) -> None:
    if ckpt["rng"][0].get("device", "cpu") != world.device.type:
        raise UserError(f"{ckpt_path} was written on {ckpt['rng'][0].get('device')} and this run is on "
                        f"{world.device.type}: resume on the same kind of device (--device)")
    if len(ckpt["rng"]) != world.size:
        raise UserError(f"{ckpt_path} was written by {len(ckpt['rng'])} process(es) but this run has "
                        f"{world.size}: resume with torchrun --nproc-per-node={len(ckpt['rng'])} "
                        f"(or without torchrun for 1)")


def checkpoint_tokenizer(cfg: TrainConfig, given: set[str], ckpt: dict | None,
                         init: dict | None) -> tuple[TrainConfig, dict | None]:
    """The tokenizer state of the checkpoint a run resumes or fine-tunes (None for a new model), with
    cfg.tokenizer set to its kind; a contradicting --tokenizer, --vocab_size or --extend_vocab is a
    UserError."""
    start = ckpt or init
    if start is None:
        return cfg, None
    state = tokenizer_state(start)
    kind, source = state.get("kind"), "the checkpoint" if ckpt else cfg.init_from
    doing = "resume" if ckpt else "fine-tune"
    if "tokenizer" in given and cfg.tokenizer != kind:
        raise UserError(f"{source} was trained with --tokenizer={kind}: {doing} with it (or leave "
                        f"--tokenizer out)")
    if kind != "char" and "vocab_size" in given and not ckpt:
        raise UserError(f"{source} brings its own {kind} tokenizer: drop --vocab_size")
    if kind != "char" and cfg.extend_vocab:
        raise UserError(f"--extend_vocab grows a character vocabulary, and {source} uses the {kind} tokenizer, "
                        f"which encodes any text: drop --extend_vocab")
    return dataclasses.replace(cfg, tokenizer=kind), state
