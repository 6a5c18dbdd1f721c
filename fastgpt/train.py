"""Train a character-level GPT: `python -m fastgpt.train [--preset NAME] [--key=value ...]`.

With no arguments it trains nanoGPT's shakespeare_char config on a CUDA machine and nanoGPT's CPU
recipe elsewhere. `--help` lists every flag with its default. Under torchrun it trains data-parallel
(`torchrun --standalone --nproc-per-node=N -m fastgpt.train ...`); `--init_from=CKPT` fine-tunes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from fastgpt import kernels
from fastgpt import distributed, memory
from fastgpt.checkpoint import (check_resumable_state, load_checkpoint, load_weights, require, save_checkpoint,
                                tokenizer_state)
from fastgpt.cli import CommandFailed, UserError, make_log, run_main
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig, parse_train_args
from fastgpt.data import Batches, Corpus, load_corpus
from fastgpt.device import (device_rng_state, keep_freed_memory, peak_flops, resolve_dtype, set_device_rng_state,
                            synchronize)
from fastgpt.files import atomic_write, out_dir_lock
from fastgpt.distributed import World
from fastgpt.model import GPTConfig, build_model
from fastgpt.sample import complete
from fastgpt.tokenizer import default_prompt

MAX_BIGRAM_VOCAB = 8192  # the bigram model's table is vocab x vocab

def get_lr(cfg: TrainConfig, it: int) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT's schedule)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def adopt_architecture(cfg: TrainConfig, given: set[str], saved: dict, source: str) -> TrainConfig:
    """cfg with the model-shape fields of a checkpoint's model config; a flag given on the command
    line that contradicts them is a UserError."""
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


def kept_record(line: str, iter_num: int) -> bool:
    """Whether a metrics.jsonl line belongs to the steps a resumed checkpoint holds (a line cut short by
    a crash is dropped)."""
    try:
        return json.loads(line)["iter"] <= iter_num
    except (ValueError, KeyError, TypeError):
        return False


def train_step(model, optimizer, batches: Batches, micro_steps: int, grad_clip: float,
               autocast, scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `micro_steps` micro-batches of this process.

    Under DistributedDataParallel the gradients are averaged across processes only after the last
    micro-batch (`no_sync` covers the forward and backward of the others). With a `scaler` (fp16) the
    loss is scaled before the backward and the gradients unscaled before clipping; a step whose gradients
    overflowed is skipped by the scaler (its gradient norm is then not finite). Returns the step's mean
    loss and the gradient norm before clipping, as device tensors: reading them is left to the
    caller, so the step itself never waits for the device.
    """
    loss_sum = torch.zeros((), device=batches.device)
    for micro in range(micro_steps):
        x, y = batches.next()
        defer_sync = hasattr(model, "no_sync") and micro < micro_steps - 1
        with model.no_sync() if defer_sync else nullcontext():
            with autocast:
                _, loss = model(x, y)
                loss = loss / micro_steps
            loss_sum += loss.detach().float()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag read at step boundaries; a second signal aborts at once."""

    def __init__(self, log):
        self.signum: int | None = None
        self.log = log
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                 f"(signal again to abort without saving)")


# ---------------------------------------------------------------------------------------------------
# the run: setup, compile, loop, summary


# what a run writes into its out_dir: a new run refuses a folder holding any of them unless --overwrite
RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "tb")


def main(argv: list[str]) -> int:
    cfg, given = parse_train_args(argv, torch.cuda.is_available())
    ckpt = None
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume:
        ckpt = require(load_checkpoint(ckpt_path), ckpt_path, "resume",
                       ("model", "model_config", "vocab", "optimizer", "train_config", "rng", "iter_num"))
        cfg = resume_config(cfg, given, ckpt)
    world = distributed.init(cfg.device)
    try:
        # one run owns its out_dir: rank 0 holds the lock (released by the OS however the process ends)
        with out_dir_lock(Path(cfg.out_dir)) if world.master else nullcontext():
            # checked after joining the job: rank 0 writes ckpt.pt only after a collective that every
            # process reaches after this check, so no process can mistake rank 0's new file for an old run
            for stale in [t for name in RUN_FILES for t in Path(cfg.out_dir).glob(f".{name}.*.tmp")]:
                stale.unlink(missing_ok=True)  # a write that a killed run left half done: never read
            earlier = [name for name in RUN_FILES if (Path(cfg.out_dir) / name).exists()]
            if ckpt is None and earlier and not cfg.overwrite:
                raise UserError(f"{Path(cfg.out_dir) / earlier[0]} holds an earlier run: continue it with --resume, "
                                f"train into another --out_dir, or pass --overwrite to replace it")
            code = train(cfg, given, ckpt, world)
            world.barrier()  # every process is done before any of them tears the process group down
            return code
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise UserError("out of memory: lower --batch_size or --block_size, or train a smaller model "
                            "(--n_layer, --n_embd)") from None
        raise
    finally:
        distributed.shutdown()


def train(cfg: TrainConfig, given: set[str], ckpt: dict | None, world: World) -> int:
    """Setup (data, model, optimizer, resume), compilation, the loop, the summary; the exit code."""
    run = setup(cfg, given, ckpt, world)
    announce(run)
    if run.use_compile:
        run.compile_seconds = compile_graphs(run)
        run.log(f"compiled in {run.compile_seconds:.1f} s (before the clock starts)")
    elif run.device.type == "cuda":
        say_fallbacks(run)
    with StopRequest(run.log) as stop:
        loop(run, stop)
    summarise(run)
    return 128 + run.stopped if run.stopped is not None else 0


@dataclasses.dataclass
class Run:
    """One training run's state: its settings, data, model and optimizer, and where the loop stands."""
    cfg: TrainConfig
    world: World
    log: Callable[..., None]
    out_dir: Path
    dtype: str
    use_compile: bool
    corpus: Corpus
    train_batches: Batches
    val_batches: Batches
    model_config: GPTConfig
    raw_model: torch.nn.Module  # the module itself: its state dict is what checkpoints hold
    core: torch.nn.Module  # raw_model, compiled or not: evaluation runs it
    model: torch.nn.Module  # core, under DistributedDataParallel with several processes: training runs it
    optimizer: torch.optim.Optimizer
    autocast: object
    init_from: str = ""  # the checkpoint a fine-tuning run started from
    resumed: bool = False
    iter_num: int = 0
    start_iter: int = 0
    best_val: float = math.inf
    metrics: object = None  # metrics.jsonl, open on rank 0
    tensorboard: object = None  # a SummaryWriter on rank 0 with --tensorboard
    nonfinite: torch.Tensor | None = None  # set by a step whose loss (or, without a scaler, gradient norm) is not finite
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaler
    skipped: torch.Tensor | None = None  # steps the scaler skipped for an overflow
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluation time, kept apart from training time
    clock_start: float = 0.0
    last_log_iter: int = 0
    last_log_time: float = 0.0
    target_iter: int | None = None
    stopped: signal.Signals | None = None  # the signal that stopped the run early

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    @property
    def tokens_per_iter(self) -> int:  # all processes
        return self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.cfg.block_size


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


def setup(cfg: TrainConfig, given: set[str], ckpt: dict | None, world: World) -> Run:
    """Configuration, data, model and optimizer, restored from `ckpt` when resuming."""
    out_dir = Path(cfg.out_dir)
    if ckpt is not None:
        check_resumable(ckpt, world, out_dir / "ckpt.pt")
    elif "gradient_accumulation_steps" not in given and world.size > 1:
        # under torchrun, one micro-batch per process: the global batch is processes x batch_size
        cfg = dataclasses.replace(cfg, gradient_accumulation_steps=world.size)
    if cfg.gradient_accumulation_steps % world.size:
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the global "
                        f"number of micro-batches and must be a multiple of the {world.size} processes")
    if cfg.tensorboard:
        summary_writer_class()  # a missing extra is said before the corpus is read
    device = world.device
    kernels.set_backend("reference" if cfg.reference else "auto")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={out_dir} ({e.strerror}): choose a writable directory")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    init = None
    if cfg.init_from:
        init = require(load_checkpoint(cfg.init_from), cfg.init_from, "fine-tune from",
                       ("model", "model_config", "vocab"))
        cfg = adopt_architecture(cfg, given, init["model_config"], cfg.init_from)

    cfg, state = checkpoint_tokenizer(cfg, given, ckpt, init)
    memory.check_training(cfg.model_config(1), cfg.batch_size, device)  # before the corpus is read
    corpus = load_corpus(cfg.data_file, cfg.data_dir, extend_vocab=cfg.extend_vocab and ckpt is None,
                         expected_sha256=ckpt["corpus_sha256"] if ckpt else None, tokenizer=cfg.tokenizer,
                         vocab_size=cfg.vocab_size, tokenizer_state=state)
    if cfg.model == "bigram" and corpus.tokenizer.vocab_size > MAX_BIGRAM_VOCAB:
        raise UserError(f"the bigram model is a vocab x vocab table: {corpus.tokenizer.vocab_size} tokens make "
                        f"it {corpus.tokenizer.vocab_size ** 2 / 1e6:,.0f}M parameters: train it on at most "
                        f"{MAX_BIGRAM_VOCAB} tokens (--tokenizer=char, or bpe with a smaller --vocab_size), or "
                        f"choose another --model")
    memory.check_training(cfg.model_config(corpus.tokenizer.vocab_size), cfg.batch_size, device)
    train_batches = Batches(corpus.train, cfg.block_size, cfg.batch_size, device, world.seed(cfg.seed, 0), "train")
    # the val split is only evaluated: its batches come from its eval_generator, not its own generator
    val_batches = Batches(corpus.val, cfg.block_size, cfg.batch_size, device, world.seed(cfg.seed, 0), "val")
    model_config = cfg.model_config(corpus.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    raw_model = build_model(model_config).to(device)
    if init is not None:
        load_weights(raw_model, init["model"], cfg.init_from, (init.get("model_config") or {}).get("vocab_size"))
    torch.manual_seed(world.seed(cfg.seed, 2))  # dropout: a stream of its own in each process
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device.type)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    core = torch.compile(raw_model, mode=cfg.compile_mode) if use_compile else raw_model
    model = core if world.size == 1 else torch.nn.parallel.DistributedDataParallel(
        core, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = resolve_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
    run = Run(cfg=cfg, world=world, log=make_log(world.master), out_dir=out_dir, dtype=dtype,
              use_compile=use_compile, corpus=corpus, train_batches=train_batches, val_batches=val_batches,
              model_config=model_config, raw_model=raw_model, core=core, model=model, optimizer=optimizer,
              autocast=autocast, init_from=cfg.init_from if init is not None else "",
              nonfinite=torch.zeros((), dtype=torch.bool, device=device),
              scaler=torch.amp.GradScaler(device.type) if dtype == "float16" else None,
              skipped=torch.zeros((), dtype=torch.int64, device=device))
    if ckpt is not None:
        restore(run, ckpt)
    open_metrics(run)
    return run


def restore(run: Run, ckpt: dict) -> None:
    """Weights, optimizer, iteration and every RNG state of this process, from a resumable checkpoint
    (validated first: check_resumable_state)."""
    check_resumable_state(ckpt, run.raw_model, run.optimizer, run.ckpt_path)
    run.raw_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.iter_num = run.start_iter = ckpt["iter_num"]
    run.best_val = ckpt["best_val_loss"]
    run.resumed = True
    rng = ckpt["rng"][run.world.rank]
    try:
        torch.set_rng_state(rng["torch"])
        set_device_rng_state(run.device, rng.get(run.device.type) if run.device.type != "cpu" else None)
    except (RuntimeError, TypeError, KeyError, AttributeError):
        raise UserError(f"{run.ckpt_path} is damaged (its RNG states are not torch's): resume from another "
                        f"checkpoint, or start afresh with --overwrite") from None
    try:
        run.train_batches.generator.set_state(rng["batches"])
    except (RuntimeError, TypeError, KeyError):  # a CUDA generator's state for a host one, or the other way round
        raise UserError("the checkpoint's batch stream was drawn on another kind of device (or with the split "
                        "held elsewhere, or is damaged): resume on the machine that wrote it") from None
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])


def open_metrics(run: Run) -> None:
    """metrics.jsonl on rank 0: a new run starts it empty; a resumed one drops the records of steps its
    checkpoint did not keep."""
    if not run.world.master:
        return
    path = run.out_dir / "metrics.jsonl"
    if run.resumed and path.exists():
        # replaced whole or not at all: a kill while it is rewritten leaves the old file
        text = path.read_bytes().decode("utf-8", errors="replace")
        kept = "".join(line + "\n" for line in text.splitlines() if kept_record(line, run.iter_num))
        atomic_write(path, lambda f: f.write(kept.encode()))
    elif not run.resumed:
        atomic_write(path, lambda f: None)
    run.metrics = path.open("a")
    if run.cfg.tensorboard:
        run.tensorboard = open_tensorboard(run.out_dir / "tb", run.iter_num + 1 if run.resumed else None)


# metrics.jsonl's fields and their TensorBoard tags
TENSORBOARD_TAGS = {"loss": "train/loss", "val_loss": "val/loss", "train_loss": "train/eval_loss", "lr": "lr",
                    "grad_norm": "grad_norm", "tokens_per_sec": "tokens_per_sec", "mfu": "mfu",
                    "ms_per_iter": "ms_per_iter"}


def summary_writer_class():
    """torch's SummaryWriter, or a UserError naming the extra that installs TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"') from None
    return SummaryWriter


def open_tensorboard(log_dir: Path, resumed_at: int | None):
    """A SummaryWriter into log_dir: a new run starts it empty, a resumed one drops the events from
    `resumed_at` on (TensorBoard's purge_step: the steps after its checkpoint's)."""
    SummaryWriter = summary_writer_class()
    if resumed_at is None:
        for old in log_dir.glob("events.out.tfevents.*"):  # an earlier run's, replaced by this one
            old.unlink()
    return SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at, flush_secs=10)


def record(run: Run, **fields) -> None:
    if run.metrics is not None:
        run.metrics.write(json.dumps(fields) + "\n")
        run.metrics.flush()
    if run.tensorboard is not None and "iter" in fields:
        for name, tag in TENSORBOARD_TAGS.items():
            if isinstance(fields.get(name), (int, float)):
                run.tensorboard.add_scalar(tag, fields[name], fields["iter"])


def announce(run: Run) -> None:
    cfg, corpus, world = run.cfg, run.corpus, run.world
    run.log(f"fastgpt: {cfg.model} model, {run.raw_model.get_num_params() / 1e6:.2f}M parameters, "
            f"{corpus.tokenizer.vocab_size} {'characters' if corpus.tokenizer.kind == 'char' else f'{corpus.tokenizer.kind} tokens'}, "
            f"{len(corpus.train):,} train / {len(corpus.val):,} val "
            f"tokens from {corpus.source}" + (f", weights from {run.init_from}" if run.init_from else ""))
    steps = cfg.gradient_accumulation_steps
    batch = (f"{steps} micro-batches of {cfg.batch_size} ({steps // world.size} per process)" if world.size > 1
             else f"{steps} micro-batches of {cfg.batch_size}" if steps > 1 else f"batch {cfg.batch_size}")
    run.log(f"device {run.device}{f' x {world.size} processes' if world.size > 1 else ''}, {run.dtype}, compile "
            f"{'on' if run.use_compile else 'off'}, kernels {'reference' if cfg.reference else 'auto'}, {batch}, "
            f"{run.tokens_per_iter:,} tokens/iter" + (f", resuming at iter {run.iter_num}" if run.resumed else ""))


@contextlib.contextmanager
def throwaway_batch(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A training batch from a generator of its own, for work that must leave the run as it was: torch's
    and CUDA's RNG states are restored afterwards (dropout draws from them)."""
    rng = torch.get_rng_state(), device_rng_state(run.device)
    try:
        yield run.train_batches.next(run.train_batches.seeded_generator(0))
    finally:
        torch.set_rng_state(rng[0])
        set_device_rng_state(run.device, rng[1])


def say_fallbacks(run: Run) -> None:
    """One eager forward on a throwaway batch: on CUDA, an op that `auto` sends to its reference says so
    here (kernels/backend.py), which it cannot while torch.compile traces."""
    with throwaway_batch(run) as (x, y), torch.no_grad(), run.autocast:
        run.raw_model.eval()
        run.raw_model(x, y)
    run.raw_model.train()


def compile_graphs(run: Run) -> float:
    """Compile the training and the evaluation graphs on a throwaway batch before the clock starts, so
    training times are steady-state times; the run is left exactly as it was (no optimizer step,
    gradients cleared, RNG states restored). Returns the seconds it took."""
    started = time.perf_counter()
    if run.device.type == "cuda":
        say_fallbacks(run)
    with throwaway_batch(run) as (x, y):
        with run.autocast:
            _, loss = run.model(x, y)
        loss.backward()
        run.optimizer.zero_grad(set_to_none=True)
        run.core.eval()
        with torch.no_grad(), run.autocast:
            run.core(x, y)
        run.core.train()
    synchronize(run.device)
    return time.perf_counter() - started


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split (the same batches at every evaluation), averaged
    over the processes."""
    run.core.eval()
    losses = torch.zeros(2, device=run.device)
    for i, batches in enumerate((run.train_batches, run.val_batches)):
        batches.eval_generator.manual_seed(run.world.seed(run.cfg.seed, 1))
        for _ in range(run.cfg.eval_iters):
            x, y = batches.next(batches.eval_generator)
            with run.autocast:
                _, loss = run.core(x, y)
            losses[i] += loss.float() / run.cfg.eval_iters
    run.core.train()
    train_loss, val_loss = run.world.mean(losses).tolist()
    return {"train": train_loss, "val": val_loss}


def save(run: Run, full: bool) -> None:
    """Write best.pt (weights only) or ckpt.pt (everything resume needs: a collective call), unless the
    run keeps no checkpoints (--save_checkpoints=False)."""
    if not run.cfg.save_checkpoints:
        return
    payload = {"model": run.raw_model.state_dict(), "model_config": dataclasses.asdict(run.model_config),
               "tokenizer": run.corpus.tokenizer.state(), "corpus_sha256": run.corpus.sha256,
               "iter_num": run.iter_num, "best_val_loss": run.best_val}
    if run.corpus.tokenizer.kind == "char":
        payload["vocab"] = run.corpus.tokenizer.vocab  # as before the BPE, for readers that know only this
    if full:
        payload |= {
            "optimizer": run.optimizer.state_dict(), "train_config": dataclasses.asdict(run.cfg),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "rng": run.world.gather({
                "device": run.device.type,
                "torch": torch.get_rng_state(),
                "cuda": device_rng_state(run.device) if run.device.type == "cuda" else None,
                "mps": device_rng_state(run.device) if run.device.type == "mps" else None,
                "batches": run.train_batches.generator.get_state(),
            }),
        }
    if run.world.master:
        save_checkpoint(run.ckpt_path if full else run.out_dir / "best.pt", payload)


def check_finite(run: Run, since: int) -> None:
    """Stop (exit 1, the last good checkpoint untouched) if a step since `since` was not finite."""
    if run.world.any(run.nonfinite):
        raise CommandFailed(  # said once, by rank 0
            f"loss or gradient norm became non-finite between iter {since} and {run.iter_num}; stopped without "
            f"saving (last good checkpoint: {run.ckpt_path}): lower --learning_rate or enable --grad_clip"
            if run.world.master else "")


def evaluate_and_save(run: Run) -> bool:
    """Evaluate, record, checkpoint (best.pt on a new best, ckpt.pt always); whether the target is met."""
    check_finite(run, run.last_log_iter)
    synchronize(run.device)
    eval_start = time.perf_counter()
    losses = evaluate(run)
    run.log(f"iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    # train_seconds: training time so far (evaluation and compilation excluded), from which the time to
    # any val loss can be read off afterwards
    record(run, iter=run.iter_num, train_loss=losses["train"], val_loss=losses["val"],
           train_seconds=eval_start - run.clock_start - run.eval_seconds)
    if losses["val"] < run.best_val:
        run.best_val = losses["val"]
        save(run, full=False)
    save(run, full=True)
    run.last_log_iter, run.last_log_time = run.iter_num, time.perf_counter()  # eval is not training time
    run.eval_seconds += run.last_log_time - eval_start
    return run.cfg.target_val_loss is not None and losses["val"] <= run.cfg.target_val_loss


def log_step(run: Run, lr: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """The log line and metrics record of a log interval: its one host sync."""
    loss_value = run.world.mean(loss_sum).item()
    norm_value = grad_norm.item()
    check_finite(run, run.last_log_iter)
    now = time.perf_counter()
    ms = (now - run.last_log_time) * 1000 / (run.iter_num - run.last_log_iter)
    tokens_per_sec = run.tokens_per_iter / (ms / 1000)
    peak = peak_flops(run.device, run.dtype)
    peak = peak * run.world.size if peak else None  # every process' GPU
    mfu = run.raw_model.flops_per_token() * run.tokens_per_iter / (ms / 1000) / peak if peak else None
    run.log(f"iter {run.iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {norm_value:.3f}, "
            f"{ms:.1f} ms/iter, {tokens_per_sec:,.0f} tokens/s" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""))
    record(run, iter=run.iter_num, loss=loss_value, lr=lr, grad_norm=norm_value, ms_per_iter=ms,
           tokens_per_sec=tokens_per_sec, mfu=mfu)
    run.last_log_iter, run.last_log_time = run.iter_num, now


def loop(run: Run, stop: StopRequest) -> None:
    """Train until max_iters, the target val loss, or a stop signal (which saves a checkpoint first)."""
    cfg = run.cfg
    run.model.train()
    run.clock_start = run.last_log_time = time.perf_counter()
    run.last_log_iter = run.iter_num
    if run.resumed and run.iter_num >= cfg.max_iters:
        run.log(f"{run.ckpt_path} is at iter {run.iter_num}, already at or past --max_iters={cfg.max_iters}: "
                f"nothing to train (raise --max_iters to continue)")
    micro_steps = cfg.gradient_accumulation_steps // run.world.size
    while True:
        lr = get_lr(cfg, run.iter_num)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        evaluate_now = run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters
        if evaluate_now and not (run.resumed and run.iter_num == run.start_iter) and evaluate_and_save(run):
            run.target_iter = run.iter_num
            return
        if run.iter_num >= cfg.max_iters:
            return
        # Under torchrun the ranks agree on stopping through a collective, which waits for the device:
        # it runs at log intervals only, where the loop synchronises anyway.
        signum = stop.signum or 0
        if (run.world.size == 1 or run.iter_num % cfg.log_interval == 0) and run.world.any(signum != 0):
            check_finite(run, run.last_log_iter)
            save(run, full=True)
            run.log(f"stopped at iter {run.iter_num}; " + (
                f"saved {run.ckpt_path}: continue with --resume --out_dir={run.out_dir}" if cfg.save_checkpoints
                else "no checkpoint kept (--save_checkpoints=False)"))
            run.stopped = signal.Signals(signum or signal.SIGTERM)
            return
        loss_sum, grad_norm = train_step(run.model, run.optimizer, run.train_batches, micro_steps, cfg.grad_clip,
                                         run.autocast, run.scaler)
        if run.scaler is None:
            run.nonfinite |= ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        else:  # an overflowing gradient is a step the scaler skipped (and a lower scale), not a divergence
            run.nonfinite |= ~torch.isfinite(loss_sum)
            run.skipped += ~torch.isfinite(grad_norm)
        run.iter_num += 1
        if run.iter_num % cfg.log_interval == 0:
            log_step(run, lr, loss_sum, grad_norm)


def summarise(run: Run) -> None:
    """The summary record (the last line of metrics.jsonl) and lines, and the end-of-run sample."""
    cfg = run.cfg
    synchronize(run.device)
    wall_seconds = time.perf_counter() - run.clock_start
    train_seconds = wall_seconds - run.eval_seconds
    # every process skips the same steps (the gradients are all-reduced before the scaler looks at them)
    skipped = int(run.skipped.item()) if run.scaler is not None else 0
    record(run, summary=True, skipped_steps=skipped, device=str(run.device), dtype=run.dtype, compile=run.use_compile,
           reference=cfg.reference, iter=run.iter_num, best_val_loss=run.best_val, target_val_loss=cfg.target_val_loss,
           target_iter=run.target_iter, train_seconds=train_seconds, eval_seconds=run.eval_seconds,
           wall_seconds=wall_seconds, compile_seconds=run.compile_seconds,
           stopped_by=run.stopped.name if run.stopped is not None else None)
    if run.metrics is not None:
        run.metrics.close()
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.stopped is not None:
        return
    run.log(f"{run.iter_num - run.start_iter} iterations in {train_seconds:.1f} s of training, "
            f"{run.eval_seconds:.1f} s of evaluation"
            + (f", after {run.compile_seconds:.1f} s of compilation" if run.use_compile else ""))
    if run.scaler is not None:
        run.log(f"fp16 loss scaling: {skipped} step(s) skipped for overflowing gradients, scale now "
                f"{run.scaler.get_scale():g}")
    if cfg.target_val_loss is not None:
        run.log(f"val loss <= {cfg.target_val_loss} " + (
            f"reached at iter {run.target_iter} after {train_seconds:.1f} s of training" if run.target_iter is not None
            else f"not reached in {cfg.max_iters} iterations"))
    run.log(f"best val loss {run.best_val:.4f}; " + (
        f"checkpoints in {run.out_dir} (best.pt: best val, ckpt.pt: latest)" if cfg.save_checkpoints
        else "no checkpoints kept (--save_checkpoints=False)"))
    if cfg.sample_chars and run.world.master:
        prompt = default_prompt(run.corpus.tokenizer)
        # on the references: the sample runs in fp32, one row at a time, and on the kernels it would compile
        # an fp32 set of them (tens of seconds on a GPU) for milliseconds of work
        with kernels.backend("reference"):
            (text,) = complete(run.raw_model.eval(), run.corpus.tokenizer, prompt, cfg.sample_chars, cfg.seed)
        run.log("sample:\n" + text[len(prompt):][:cfg.sample_chars])  # a BPE's tokens are several characters


if __name__ == "__main__":
    run_main(main, "fastgpt.train")
