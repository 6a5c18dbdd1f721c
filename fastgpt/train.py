"""Train a character-level GPT: `python -m fastgpt.train [--preset NAME] [--key=value ...]`.

With no arguments it trains nanoGPT's shakespeare_char config on a CUDA machine and nanoGPT's CPU
recipe elsewhere. `--help` lists every flag with its default. Under torchrun it trains data-parallel
(`torchrun --standalone --nproc-per-node=N -m fastgpt.train ...`); `--init_from=CKPT` fine-tunes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import kernels
from fastgpt import distributed
from fastgpt.checkpoint import load_checkpoint, load_weights, require, save_checkpoint
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig, UserError, make_log, parse_train_args, run_main
from fastgpt.data import Batches, default_prompt, load_corpus
from fastgpt.distributed import World
from fastgpt.model import build_model
from fastgpt.sample import complete

# dense bf16 tensor-core peaks in FLOP/s, matched in this order against torch.cuda.get_device_name() (the
# first key found in the name wins, so "H100 NVL" before "H100" and "L40S", "L40" before "L4")
PEAK_BF16_FLOPS = {
    "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
    "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device, dtype: str = "bfloat16") -> float | None:
    """The device's dense peak for the run's matmuls: bf16, or TF32 (half of it on these GPUs) for float32
    runs, which the trainer lets use TF32. None off CUDA or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
    return peak / 2 if peak is not None and dtype == "float32" else peak


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS (CPU training only; CUDA
    has its own caching allocator). By default blocks over 128 KiB are mmap'ed and unmapped on free, and
    the heap top is trimmed, so every step's activations come back as fresh pages that the kernel must
    fault in and zero: about 1,000 page faults and several ms of system time per step of the cpu preset.
    With the thresholds raised, a step reuses the previous step's memory. Returns whether glibc took both
    settings (False on other C libraries)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, <malloc.h>
    # 32 MiB is the largest mmap threshold every glibc accepts (older ones refuse more than half of a
    # 64 MiB heap); blocks above it, rare on a CPU, are still mmap'ed
    mmap_set = libc.mallopt(m_mmap_threshold, 32 << 20)
    trim_set = libc.mallopt(m_trim_threshold, 1 << 30)
    return bool(mmap_set and trim_set)


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
    merged = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given})
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
               autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `micro_steps` micro-batches of this process.

    Under DistributedDataParallel the gradients are averaged across processes only after the last
    micro-batch (`no_sync` covers the forward and backward of the others). Returns the step's mean
    loss and the gradient norm before clipping, as device tensors: reading them is left to the
    caller, so the step itself never waits for the device.
    """
    loss_sum = torch.zeros((), device=batches.data.device)
    for micro in range(micro_steps):
        x, y = batches.next()
        defer_sync = hasattr(model, "no_sync") and micro < micro_steps - 1
        with model.no_sync() if defer_sync else nullcontext():
            with autocast:
                _, loss = model(x, y)
                loss = loss / micro_steps
            loss_sum += loss.detach().float()
            loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
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
        # checked after joining the job: rank 0 writes ckpt.pt only after a collective that every
        # process reaches after this check, so no process can mistake rank 0's new file for an old run
        if ckpt is None and ckpt_path.exists() and not cfg.overwrite:
            raise UserError(f"{ckpt_path} holds an earlier run: continue it with --resume, train into "
                            f"another --out_dir, or pass --overwrite to replace it")
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
    # -------------------------------------------------------------------------------------------------
    # configuration
    log = make_log(world.master)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt is not None and ckpt["rng"][0].get("device", "cpu") != world.device.type:
        raise UserError(f"{ckpt_path} was written on {ckpt['rng'][0].get('device')} and this run is on "
                        f"{world.device.type}: resume on the same kind of device (--device)")
    if ckpt is not None and len(ckpt["rng"]) != world.size:
        raise UserError(f"{ckpt_path} was written by {len(ckpt['rng'])} process(es) but this run has "
                        f"{world.size}: resume with torchrun --nproc-per-node={len(ckpt['rng'])} "
                        f"(or without torchrun for 1)")
    if cfg.gradient_accumulation_steps % world.size:
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the global "
                        f"number of micro-batches and must be a multiple of the {world.size} processes")
    micro_steps = cfg.gradient_accumulation_steps // world.size
    device = world.device
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
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

    # -------------------------------------------------------------------------------------------------
    # data and model
    start = ckpt or init
    corpus = load_corpus(cfg.data_file, cfg.data_dir, vocab=start["vocab"] if start else None,
                         extend_vocab=cfg.extend_vocab and ckpt is None,
                         expected_sha256=ckpt["corpus_sha256"] if ckpt else None)
    train_batches = Batches(corpus.train, cfg.block_size, cfg.batch_size, device,
                            world.seed(cfg.seed, 0), "train")
    # the val split is only evaluated: its batches come from eval_generator, not its own generator
    val_batches = Batches(corpus.val, cfg.block_size, cfg.batch_size, device, world.seed(cfg.seed, 0), "val")
    eval_generator = torch.Generator(device=device)
    model_config = cfg.model_config(corpus.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    raw_model = build_model(model_config).to(device)
    if init is not None:
        load_weights(raw_model, init["model"], cfg.init_from)
    torch.manual_seed(world.seed(cfg.seed, 2))  # dropout: a stream of its own in each process
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), device.type)
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        rng = ckpt["rng"][world.rank]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        train_batches.generator.set_state(rng["batches"])
    core = torch.compile(raw_model, mode=cfg.compile_mode) if use_compile else raw_model
    model = core
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # all processes
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter
    peak = peak_flops(device, dtype)
    peak = peak * world.size if peak else None  # every process' GPU
    log(f"fastgpt: {cfg.model} model, {raw_model.get_num_params() / 1e6:.2f}M parameters, "
        f"{corpus.tokenizer.vocab_size} characters, {len(corpus.train):,} train / {len(corpus.val):,} val "
        f"tokens from {corpus.source}" + (f", weights from {cfg.init_from}" if init is not None else ""))
    log(f"device {device}{f' x {world.size} processes' if world.size > 1 else ''}, {dtype}, compile "
        f"{'on' if use_compile else 'off'}, kernels {'reference' if cfg.reference else 'auto'}, "
        f"{tokens_per_iter:,} tokens/iter" + (f", resuming at iter {iter_num}" if ckpt is not None else ""))

    # -------------------------------------------------------------------------------------------------
    # helpers that close over the run's state
    metrics_path = out_dir / "metrics.jsonl"
    metrics = None
    if world.master:
        if ckpt is not None and metrics_path.exists():  # drop records of steps the checkpoint did not keep
            kept = [line for line in metrics_path.read_text().splitlines() if kept_record(line, iter_num)]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        elif ckpt is None:
            metrics_path.write_text("")
        metrics = metrics_path.open("a")

    def record(**fields) -> None:
        if metrics is not None:
            metrics.write(json.dumps(fields) + "\n")
            metrics.flush()

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Mean loss over eval_iters batches of each split (the same batches at every evaluation),
        averaged over the processes."""
        core.eval()
        losses = torch.zeros(2, device=device)
        for i, batches in enumerate((train_batches, val_batches)):
            eval_generator.manual_seed(world.seed(cfg.seed, 1))
            for _ in range(cfg.eval_iters):
                x, y = batches.next(eval_generator)
                with autocast:
                    _, loss = core(x, y)
                losses[i] += loss.float() / cfg.eval_iters
        core.train()
        train_loss, val_loss = world.mean(losses).tolist()
        return {"train": train_loss, "val": val_loss}

    def save(full: bool) -> None:
        """Write best.pt (weights only) or ckpt.pt (everything resume needs: a collective call)."""
        payload = {"model": raw_model.state_dict(), "model_config": dataclasses.asdict(model_config),
                   "vocab": corpus.tokenizer.vocab, "corpus_sha256": corpus.sha256,
                   "iter_num": iter_num, "best_val_loss": best_val}
        if full:
            payload |= {
                "optimizer": optimizer.state_dict(), "train_config": dataclasses.asdict(cfg),
                "rng": world.gather({
                    "device": device.type,
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "batches": train_batches.generator.get_state(),
                }),
            }
        if world.master:
            save_checkpoint(ckpt_path if full else out_dir / "best.pt", payload)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def compile_graphs() -> float:
        """Compile the training and the evaluation graphs on a throwaway batch before the clock starts,
        so training times are steady-state times; the run is left exactly as it was (no optimizer step,
        gradients cleared, RNG states restored, the batch drawn from a generator of its own).
        Returns the seconds it took."""
        started = time.perf_counter()
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        x, y = train_batches.next(torch.Generator(device=device).manual_seed(0))
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        core.eval()
        with torch.no_grad(), autocast:
            core(x, y)
        core.train()
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        synchronize()
        return time.perf_counter() - started

    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked at syncs, not every step

    def check_finite(since: int) -> None:
        if world.any(nonfinite):
            if world.master:
                print(f"fastgpt.train: error: loss or gradient norm became non-finite between iter {since} "
                      f"and {iter_num}; stopped without saving (last good checkpoint: {ckpt_path}): lower "
                      f"--learning_rate or enable --grad_clip", file=sys.stderr)
            sys.exit(1)

    # -------------------------------------------------------------------------------------------------
    # the training loop
    model.train()
    compile_seconds = 0.0
    if use_compile:
        compile_seconds = compile_graphs()
        log(f"compiled in {compile_seconds:.1f} s (before the clock starts)")
    clock_start = time.perf_counter()
    eval_seconds = 0.0  # evaluation time, kept apart from training time
    target_iter = None
    last_log_iter, last_log_time = iter_num, time.perf_counter()
    start_iter = iter_num
    stopped = None  # the signal that stopped the run early
    if ckpt is not None and iter_num >= cfg.max_iters:
        log(f"{ckpt_path} is at iter {iter_num}, already at or past --max_iters={cfg.max_iters}: "
            f"nothing to train (raise --max_iters to continue)")
    with StopRequest(log) as stop:
        while True:
            lr = get_lr(cfg, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            evaluate_now = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
            if evaluate_now and not (ckpt is not None and iter_num == start_iter):
                check_finite(last_log_iter)
                synchronize()
                eval_start = time.perf_counter()
                losses = evaluate()
                log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                # train_seconds: training time so far (evaluation and compilation excluded), from which
                # the time to any val loss can be read off afterwards
                record(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"],
                       train_seconds=eval_start - clock_start - eval_seconds)
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    save(full=False)
                save(full=True)
                last_log_iter, last_log_time = iter_num, time.perf_counter()  # eval is not training time
                eval_seconds += last_log_time - eval_start
                if cfg.target_val_loss is not None and losses["val"] <= cfg.target_val_loss:
                    target_iter = iter_num
                    break
            if iter_num >= cfg.max_iters:
                break
            # Under torchrun the ranks agree on stopping through a collective, which waits for the
            # device: it runs at log intervals only, where the loop synchronises anyway.
            signum = stop.signum or 0
            if (world.size == 1 or iter_num % cfg.log_interval == 0) and world.any(signum != 0):
                check_finite(last_log_iter)
                save(full=True)
                log(f"stopped at iter {iter_num}; saved {ckpt_path}: continue with --resume --out_dir={out_dir}")
                stopped = signal.Signals(signum or signal.SIGTERM)
                break

            loss_sum, grad_norm = train_step(model, optimizer, train_batches, micro_steps, cfg.grad_clip,
                                             autocast)
            nonfinite |= ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
            iter_num += 1

            if iter_num % cfg.log_interval == 0:
                loss_value = world.mean(loss_sum).item()  # the one host sync per log interval
                norm_value = grad_norm.item()
                check_finite(last_log_iter)
                now = time.perf_counter()
                ms = (now - last_log_time) * 1000 / (iter_num - last_log_iter)
                tokens_per_sec = tokens_per_iter / (ms / 1000)
                mfu = flops_per_iter / (ms / 1000) / peak if peak else None
                log(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {norm_value:.3f}, "
                    f"{ms:.1f} ms/iter, {tokens_per_sec:,.0f} tokens/s"
                    + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""))
                record(iter=iter_num, loss=loss_value, lr=lr, grad_norm=norm_value, ms_per_iter=ms,
                       tokens_per_sec=tokens_per_sec, mfu=mfu)
                last_log_iter, last_log_time = iter_num, now
    synchronize()
    wall_seconds = time.perf_counter() - clock_start
    train_seconds = wall_seconds - eval_seconds
    record(summary=True, device=str(device), dtype=dtype, compile=use_compile, reference=cfg.reference,
           iter=iter_num, best_val_loss=best_val, target_val_loss=cfg.target_val_loss,
           target_iter=target_iter, train_seconds=train_seconds, eval_seconds=eval_seconds,
           wall_seconds=wall_seconds, compile_seconds=compile_seconds,
           stopped_by=stopped.name if stopped is not None else None)
    if metrics is not None:
        metrics.close()
    if stopped is not None:
        return 128 + stopped

    # -------------------------------------------------------------------------------------------------
    # summary
    log(f"{iter_num - start_iter} iterations in {train_seconds:.1f} s of training, {eval_seconds:.1f} s of "
        f"evaluation" + (f", after {compile_seconds:.1f} s of compilation" if use_compile else ""))
    if cfg.target_val_loss is not None:
        log(f"val loss <= {cfg.target_val_loss} " + (f"reached at iter {target_iter} after {train_seconds:.1f} s "
                                                      f"of training" if target_iter is not None else
                                                      f"not reached in {cfg.max_iters} iterations"))
    log(f"best val loss {best_val:.4f}; checkpoints in {out_dir} (best.pt: best val, ckpt.pt: latest)")
    if cfg.sample_chars and world.master:
        prompt = default_prompt(corpus.tokenizer)
        # on the references: the sample runs in fp32, one row at a time, and on the kernels it would compile
        # an fp32 set of them (tens of seconds on a GPU) for milliseconds of work
        with kernels.backend("reference"):
            (text,) = complete(raw_model.eval(), corpus.tokenizer, prompt, cfg.sample_chars, cfg.seed)
        log("sample:\n" + text[len(prompt):])
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.train")
