"""Train a character-level GPT: `python -m fastgpt.train [--preset NAME] [--key=value ...]`.

With no arguments it trains nanoGPT's shakespeare_char config on a CUDA machine and nanoGPT's CPU
recipe elsewhere. `--help` lists every flag with its default. Under torchrun it trains data-parallel
(`torchrun --standalone --nproc-per-node=N -m fastgpt.train ...`); `--init_from=CKPT` fine-tunes.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from fastgpt import distributed, kernels, memory
from fastgpt.checkpoint import save_checkpoint
from fastgpt.cli import CommandFailed, StopRequest, UserError, make_log, run_main
from fastgpt.config import TrainConfig, parse_train_args
from fastgpt.data import Batches, Corpus, load_corpus
from fastgpt.device import keep_freed_memory, peak_flops, resolve_dtype, rng_states, synchronize
from fastgpt.distributed import World
from fastgpt.files import out_dir_lock
from fastgpt.kernels.linear_cross_entropy import describe as describe_loss
from fastgpt.metrics import Metrics, summary_writer_class
from fastgpt.model import build_model
from fastgpt.sample import complete
from fastgpt.start import Start, check_world, load_into, resolve
from fastgpt.tokenizer import default_prompt
from fastgpt.warmup import compile_graphs, say_fallbacks

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


# ---------------------------------------------------------------------------------------------------
# the run: setup, compile, loop, summary


# what a run writes into its out_dir: a new run refuses a folder holding any of them unless --overwrite
RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "tb")


def main(argv: list[str]) -> int:
    cfg, given = parse_train_args(argv, torch.cuda.is_available())
    start = resolve(cfg, given)
    world = distributed.init(start.cfg.device)
    out_dir = Path(start.cfg.out_dir)
    try:
        # one run owns its out_dir: rank 0 holds the lock (released by the OS however the process ends)
        with out_dir_lock(out_dir) if world.master else nullcontext():
            # checked after joining the job: rank 0 writes ckpt.pt only after a collective that every
            # process reaches after this check, so no process can mistake rank 0's new file for an old run
            for stale in [t for name in RUN_FILES for t in out_dir.glob(f".{name}.*.tmp")]:
                stale.unlink(missing_ok=True)  # a write that a killed run left half done: never read
            earlier = [name for name in RUN_FILES if (out_dir / name).exists()]
            if start.ckpt is None and earlier and not start.cfg.overwrite:
                raise UserError(f"{out_dir / earlier[0]} holds an earlier run: continue it with --resume, "
                                f"train into another --out_dir, or pass --overwrite to replace it")
            code = train(check_world(start, given, world), world)
            world.barrier()  # every process is done before any of them tears the process group down
            return code
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise UserError("out of memory: lower --batch_size or --block_size, or train a smaller model "
                            "(--n_layer, --n_embd)") from None
        raise
    finally:
        distributed.shutdown()


def train(start: Start, world: World) -> int:
    """Setup (data, model, optimizer, resume), compilation, the loop, the summary; the exit code."""
    run = setup(start, world)
    announce(run, start)
    if run.use_compile:
        run.metrics.compile_seconds = compile_graphs(run)
        run.log(f"compiled in {run.metrics.compile_seconds:.1f} s (before the clock starts)")
    elif run.device.type == "cuda":
        say_fallbacks(run)
    with StopRequest(run.log) as stop:
        loop(run, stop)
    summarise(run)
    return 128 + run.state.stopped if run.state.stopped is not None else 0


@dataclasses.dataclass
class TrainState:
    """Where the loop stands; `state_dict` is what a checkpoint keeps of it."""
    iter_num: int = 0
    start_iter: int = 0  # the iteration this process started (or resumed) at
    best_val: float = math.inf
    resumed: bool = False
    target_iter: int | None = None  # the evaluation that reached --target_val_loss
    stopped: signal.Signals | None = None  # the signal that stopped the run early
    nonfinite: torch.Tensor | None = None  # set by a step whose loss (or, without a scaler, gradient norm) is not finite
    skipped: torch.Tensor | None = None  # steps fp16's loss scaler skipped for an overflow

    def state_dict(self) -> dict:
        return {"iter_num": self.iter_num, "best_val_loss": self.best_val}

    def load_state_dict(self, state: dict) -> None:
        self.iter_num = self.start_iter = state["iter_num"]
        self.best_val = state["best_val_loss"]
        self.resumed = True


@dataclasses.dataclass
class Run:
    """One training run: its settings, data, model and optimizer, record and train state."""
    cfg: TrainConfig
    world: World
    log: Callable[..., None]
    dtype: str
    corpus: Corpus
    train_batches: Batches
    val_batches: Batches  # only evaluated: drawn from its eval_generator
    raw_model: torch.nn.Module  # the module itself: its state dict is what checkpoints hold
    core: torch.nn.Module  # raw_model, compiled or not: evaluation runs it
    model: torch.nn.Module  # core, under DistributedDataParallel with several processes: training runs it
    optimizer: torch.optim.Optimizer
    autocast: object
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler
    metrics: Metrics
    state: TrainState

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    @property
    def use_compile(self) -> bool:
        return self.core is not self.raw_model

    @property
    def tokens_per_iter(self) -> int:  # all processes
        return self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.cfg.block_size


def setup(start: Start, world: World) -> Run:
    """Data, model and optimizer, with the start's weights and state (resumed or fine-tuned)."""
    cfg, device = start.cfg.for_device(world.device.type), world.device
    if cfg.tensorboard:
        summary_writer_class()  # a missing extra is said before the corpus is read
    kernels.set_backend("reference" if cfg.reference else "auto")
    try:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={cfg.out_dir} ({e.strerror}): choose a writable directory")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    memory.check_training(cfg.model_config(1), cfg.batch_size, device)  # before the corpus is read
    corpus = load_corpus(cfg.data_file, cfg.data_dir, extend_vocab=cfg.extend_vocab and start.ckpt is None,
                         expected_sha256=start.ckpt["corpus_sha256"] if start.ckpt else None,
                         tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, tokenizer_state=start.tokenizer_state)
    model_config = cfg.model_config(corpus.tokenizer.vocab_size)
    memory.check_training(model_config, cfg.batch_size, device)
    seed = world.seed(cfg.seed, 0)
    train_batches = Batches(corpus.train, cfg.block_size, cfg.batch_size, device, seed, "train")
    val_batches = Batches(corpus.val, cfg.block_size, cfg.batch_size, device, seed, "val")
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    raw_model = build_model(model_config).to(device)
    torch.manual_seed(world.seed(cfg.seed, 2))  # dropout: a stream of its own in each process
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device.type)
    dtype = resolve_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == "float16" else None
    state = TrainState(nonfinite=torch.zeros((), dtype=torch.bool, device=device),
                       skipped=torch.zeros((), dtype=torch.int64, device=device))
    resumed = load_into(start, raw_model, optimizer, train_batches, scaler, world)
    if resumed is not None:
        state.load_state_dict(resumed)
    core = torch.compile(raw_model, mode=cfg.compile_mode) if (
        cfg.compile if cfg.compile is not None else device.type == "cuda") else raw_model
    model = core if world.size == 1 else torch.nn.parallel.DistributedDataParallel(
        core, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
    metrics = Metrics(Path(cfg.out_dir), world.master, cfg.tensorboard, state.iter_num if state.resumed else None)
    return Run(cfg=cfg, world=world, log=make_log(world.master), dtype=dtype, corpus=corpus,
               train_batches=train_batches, val_batches=val_batches, raw_model=raw_model, core=core, model=model,
               optimizer=optimizer, autocast=autocast, scaler=scaler, metrics=metrics, state=state)


def announce(run: Run, start: Start) -> None:
    cfg, corpus, world = run.cfg, run.corpus, run.world
    run.log(f"fastgpt: {cfg.model} model, {run.raw_model.get_num_params() / 1e6:.2f}M parameters, "
            f"{corpus.tokenizer.vocab_size} {'characters' if corpus.tokenizer.kind == 'char' else f'{corpus.tokenizer.kind} tokens'}, "
            f"{len(corpus.train):,} train / {len(corpus.val):,} val "
            f"tokens from {corpus.source}" + (f", weights from {cfg.init_from}" if start.init is not None else ""))
    steps = cfg.gradient_accumulation_steps
    batch = (f"{steps} micro-batches of {cfg.batch_size} ({steps // world.size} per process)" if world.size > 1
             else f"{steps} micro-batches of {cfg.batch_size}" if steps > 1 else f"batch {cfg.batch_size}")
    run.log(f"device {run.device}{f' x {world.size} processes' if world.size > 1 else ''}, {run.dtype}, compile "
            f"{'on' if run.use_compile else 'off'}, kernels {'reference' if cfg.reference else 'auto'}, {batch}, "
            f"{run.tokens_per_iter:,} tokens/iter, loss {loss_path(run)}"
            + (f", resuming at iter {run.state.iter_num}" if run.state.resumed else ""))


def loss_path(run: Run) -> str:
    """How the loss is computed: unfused, or fused with the output layer (kernels.linear_cross_entropy),
    with the output layer's padding if it has one."""
    config = run.raw_model.config
    if run.raw_model.lm_head is None:
        return "unfused (the bigram table is the logits)"
    padded = f", output layer padded to {config.output_size}" if config.output_size > config.vocab_size else ""
    return describe_loss(run.cfg.batch_size * config.block_size, config.output_size, run.device) + padded


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
    payload = {"model": run.raw_model.state_dict(), "model_config": dataclasses.asdict(run.raw_model.config),
               "tokenizer": run.corpus.tokenizer.state(), "corpus_sha256": run.corpus.sha256,
               **run.state.state_dict()}
    if run.corpus.tokenizer.kind == "char":
        payload["vocab"] = run.corpus.tokenizer.vocab  # as before the BPE, for readers that know only this
    if full:
        payload |= {"optimizer": run.optimizer.state_dict(), "train_config": dataclasses.asdict(run.cfg),
                    "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                    "rng": run.world.gather(rng_states(run.device, run.train_batches.generator))}
    if run.world.master:
        save_checkpoint(run.ckpt_path if full else run.out_dir / "best.pt", payload)


def check_finite(run: Run, since: int) -> None:
    """Stop (exit 1, the last good checkpoint untouched) if a step since `since` was not finite."""
    if run.world.any(run.state.nonfinite):
        raise CommandFailed(  # said once, by rank 0
            f"loss or gradient norm became non-finite between iter {since} and {run.state.iter_num}; stopped without "
            f"saving (last good checkpoint: {run.ckpt_path}): lower --learning_rate or enable --grad_clip"
            if run.world.master else "")


def evaluate_and_save(run: Run) -> bool:
    """Evaluate, record, checkpoint (best.pt on a new best, ckpt.pt always); whether the target is met."""
    check_finite(run, run.metrics.last_log_iter)
    synchronize(run.device)
    eval_start = time.perf_counter()
    losses = evaluate(run)
    run.log(f"iter {run.state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    # train_seconds: training time so far (evaluation and compilation excluded), from which the time to
    # any val loss can be read off afterwards
    sample = {"sample": eval_sample(run)} if run.cfg.eval_sample and run.world.master else {}
    run.metrics.record(iter=run.state.iter_num, train_loss=losses["train"], val_loss=losses["val"],
                       train_seconds=run.metrics.train_seconds(eval_start), **sample)
    if losses["val"] < run.state.best_val:
        run.state.best_val = losses["val"]
        save(run, full=False)
    save(run, full=True)
    run.metrics.logged(run.state.iter_num, time.perf_counter())  # evaluation is not training time
    run.metrics.eval_seconds += run.metrics.last_log_time - eval_start
    return run.cfg.target_val_loss is not None and losses["val"] <= run.cfg.target_val_loss


def sample_text(run: Run, tokens: int) -> str:
    """`tokens` tokens from the tokenizer's default prompt and the run's seed (the prompt left out): the
    same start every time, so that samples of different iterations differ by the model alone. On the
    references: the sample runs in fp32, one row at a time, and on the kernels it would compile an fp32
    set of them (tens of seconds on a GPU) for milliseconds of work. Its generator is its own: training's
    random streams are untouched."""
    prompt = default_prompt(run.corpus.tokenizer)
    with kernels.backend("reference"):
        (text,) = complete(run.raw_model.eval(), run.corpus.tokenizer, prompt, tokens, run.cfg.seed)
    run.raw_model.train()
    return text[len(prompt):]


def eval_sample(run: Run) -> str:
    """The evaluation's sample, kept in metrics.jsonl (the dashboard shows the text improving)."""
    return sample_text(run, run.cfg.eval_sample)


def log_step(run: Run, lr: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """The log line and metrics record of a log interval: its one host sync."""
    loss_value = run.world.mean(loss_sum).item()
    norm_value = grad_norm.item()
    check_finite(run, run.metrics.last_log_iter)
    now = time.perf_counter()
    ms = (now - run.metrics.last_log_time) * 1000 / (run.state.iter_num - run.metrics.last_log_iter)
    tokens_per_sec = run.tokens_per_iter / (ms / 1000)
    peak = peak_flops(run.device, run.dtype)
    peak = peak * run.world.size if peak else None  # every process' GPU
    mfu = run.raw_model.flops_per_token() * run.tokens_per_iter / (ms / 1000) / peak if peak else None
    run.log(f"iter {run.state.iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {norm_value:.3f}, "
            f"{ms:.1f} ms/iter, {tokens_per_sec:,.0f} tokens/s" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""))
    run.metrics.record(iter=run.state.iter_num, loss=loss_value, lr=lr, grad_norm=norm_value, ms_per_iter=ms,
                       tokens_per_sec=tokens_per_sec, mfu=mfu)
    run.metrics.logged(run.state.iter_num, now)


def loop(run: Run, stop: StopRequest) -> None:
    """Train until max_iters, the target val loss, or a stop signal (which saves a checkpoint first)."""
    cfg = run.cfg
    run.model.train()
    run.metrics.start_clock(run.state.iter_num)
    if run.state.resumed and run.state.iter_num >= cfg.max_iters:
        run.log(f"{run.ckpt_path} is at iter {run.state.iter_num}, already at or past --max_iters={cfg.max_iters}: "
                f"nothing to train (raise --max_iters to continue)")
    micro_steps = cfg.gradient_accumulation_steps // run.world.size
    while True:
        lr = get_lr(cfg, run.state.iter_num)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        evaluate_now = run.state.iter_num % cfg.eval_interval == 0 or run.state.iter_num == cfg.max_iters
        if evaluate_now and not (run.state.resumed and run.state.iter_num == run.state.start_iter) and evaluate_and_save(run):
            run.state.target_iter = run.state.iter_num
            return
        if run.state.iter_num >= cfg.max_iters:
            return
        # Under torchrun the ranks agree on stopping through a collective, which waits for the device:
        # it runs at log intervals only, where the loop synchronises anyway.
        signum = stop.signum or 0
        if (run.world.size == 1 or run.state.iter_num % cfg.log_interval == 0) and run.world.any(signum != 0):
            check_finite(run, run.metrics.last_log_iter)
            save(run, full=True)
            run.log(f"stopped at iter {run.state.iter_num}; " + (
                f"saved {run.ckpt_path}: continue with --resume --out_dir={run.out_dir}" if cfg.save_checkpoints
                else "no checkpoint kept (--save_checkpoints=False)"))
            run.state.stopped = signal.Signals(signum or signal.SIGTERM)
            return
        loss_sum, grad_norm = train_step(run.model, run.optimizer, run.train_batches, micro_steps, cfg.grad_clip,
                                         run.autocast, run.scaler)
        if run.scaler is None:
            run.state.nonfinite |= ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        else:  # an overflowing gradient is a step the scaler skipped (and a lower scale), not a divergence
            run.state.nonfinite |= ~torch.isfinite(loss_sum)
            run.state.skipped += ~torch.isfinite(grad_norm)
        run.state.iter_num += 1
        if run.state.iter_num % cfg.log_interval == 0:
            log_step(run, lr, loss_sum, grad_norm)


def summarise(run: Run) -> None:
    """The summary record (the last line of metrics.jsonl) and lines, and the end-of-run sample."""
    cfg = run.cfg
    synchronize(run.device)
    now = time.perf_counter()
    wall_seconds, train_seconds = now - run.metrics.clock_start, run.metrics.train_seconds(now)
    # every process skips the same steps (the gradients are all-reduced before the scaler looks at them)
    skipped = int(run.state.skipped.item()) if run.scaler is not None else 0
    state = run.state
    run.metrics.record(summary=True, skipped_steps=skipped, device=str(run.device), dtype=run.dtype,
                       compile=run.use_compile, reference=cfg.reference, iter=state.iter_num,
                       best_val_loss=state.best_val, target_val_loss=cfg.target_val_loss, target_iter=state.target_iter,
                       train_seconds=train_seconds, eval_seconds=run.metrics.eval_seconds, wall_seconds=wall_seconds,
                       compile_seconds=run.metrics.compile_seconds,
                       stopped_by=state.stopped.name if state.stopped is not None else None)
    run.metrics.close()
    if run.state.stopped is not None:
        return
    run.log(f"{run.state.iter_num - run.state.start_iter} iterations in {train_seconds:.1f} s of training, "
            f"{run.metrics.eval_seconds:.1f} s of evaluation"
            + (f", after {run.metrics.compile_seconds:.1f} s of compilation" if run.use_compile else ""))
    if run.scaler is not None:
        run.log(f"fp16 loss scaling: {skipped} step(s) skipped for overflowing gradients, scale now "
                f"{run.scaler.get_scale():g}")
    if cfg.target_val_loss is not None:
        run.log(f"val loss <= {cfg.target_val_loss} " + (
            f"reached at iter {run.state.target_iter} after {train_seconds:.1f} s of training" if run.state.target_iter is not None
            else f"not reached in {cfg.max_iters} iterations"))
    run.log(f"best val loss {run.state.best_val:.4f}; " + (
        f"checkpoints in {run.out_dir} (best.pt: best val, ckpt.pt: latest)" if cfg.save_checkpoints
        else "no checkpoints kept (--save_checkpoints=False)"))
    if cfg.sample_chars and run.world.master:
        run.log("sample:\n" + sample_text(run, cfg.sample_chars)[:cfg.sample_chars])  # a BPE token: characters


if __name__ == "__main__":
    run_main(main, "fastgpt.train")
