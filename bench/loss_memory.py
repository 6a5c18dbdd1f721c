"""Peak memory of one training step with a large vocabulary, fused and unfused loss, side by side:

    python -m bench.loss_memory [--vocab_size=50257] [--batch_size=64] [--device=cpu] [--out=FILE.json]

One forward and backward of the shakespeare_char GPT (6 layers of 384, block 256, batch 64) with GPT-2's
50257 tokens in fp32, each loss in a process of its own (spawned one after the other from this command,
so each starts from nothing and the machine holds one at a time):
  unfused  the whole logits and F.cross_entropy (what the model did before kernels.linear_cross_entropy);
  fused    kernels.linear_cross_entropy as `auto` runs it (chunks of about 64 MiB of logits).
On the CPU the figure is the process' peak resident memory (ru_maxrss: Python, torch, the model, the
step); on CUDA it is torch.cuda.max_memory_allocated, and the step's time is the median of a few. Both
cases draw the same weights and batch, and their losses and gradient norms are printed next to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ("unfused", "fused")


def child(args) -> dict:
    import importlib

    import torch

    from fastgpt import kernels
    from fastgpt.model import GPTConfig, build_model

    lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")
    if args.child == "unfused":
        lce.PLAIN_MAX_BYTES = float("inf")  # the whole logits, whatever their size
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=0.0,
                       pad_vocab=64 if device.type == "cuda" else 1)
    model = build_model(config).to(device)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(args.vocab_size, (args.batch_size, args.block_size + 1), generator=g).to(device)
    x, y = idx[:, :-1], idx[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times, loss = [], None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with kernels.backend("auto"):
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": args.child, "loss": loss.item(), "grad_norm": grad_norm, "peak_bytes": peak,
            "before_step_bytes": before, "step_s": statistics.median(times), "steps": args.steps,
            "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.loss_memory", description=__doc__.splitlines()[0])
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="under bf16 autocast (CUDA)")
    p.add_argument("--steps", type=int, default=1, help="steps per case (the time is their median)")
    p.add_argument("--out", default="", help="also write the results to this JSON file (refused if it exists)")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = ("vocab_size", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "steps")
    for name in sizes:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.n_embd % args.n_head:
        p.error("--n_embd must be a multiple of --n_head")
    if args.out and os.path.exists(args.out):
        p.error(f"--out={args.out} exists: choose another file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")]
    results = []
    for case in CASES:
        proc = subprocess.run([sys.executable, "-m", "bench.loss_memory", *passed, f"--child={case}"],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    unit = "GPU memory allocated" if args.device.startswith("cuda") else "process peak RSS"
    print(f"one training step, {args.n_layer} x {args.n_embd}, block {args.block_size}, batch {args.batch_size}, "
          f"vocab {args.vocab_size}, {'bf16 autocast' if args.bf16 else 'fp32'} on {args.device}")
    print(f"| loss | {unit} | step | loss value | grad norm |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['peak_bytes'] / 2**30:.2f} GiB | {r['step_s']:.2f} s | {r['loss']:.6f} | "
              f"{r['grad_norm']:.6f} |")
    a, b = results
    print(f"fused / unfused memory: {b['peak_bytes'] / a['peak_bytes']:.2f}; loss difference "
          f"{abs(a['loss'] - b['loss']):.2e}; grad norm difference {abs(a['grad_norm'] - b['grad_norm']):.2e}")
    if args.out:
        with open(args.out, "x") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"}, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
