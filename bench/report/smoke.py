"""The GPU report's first phase: does each kernel run and agree with the reference, at the real shapes?

    python -m bench.report.smoke --out=FILE [--device=cuda|cpu]

One forward and backward of every op (layer_norm, add_layer_norm, linear_gelu, causal_attention, the fused
linear_cross_entropy against the whole logits' loss, with GPT-2's vocabulary) and of
the whole GPT, at the shakespeare_char shapes (B=64, T=256, C=384, 6 heads of 64) in bf16 on CUDA, each
through the Triton kernels and through the PyTorch reference: the error of each output and gradient
against the op in fp64 next to PyTorch's own error in the same dtype (the rule of kernels/accuracy.py),
and the GPU milliseconds of each (CUDA events, bench.common.device_seconds). Without CUDA (`--device=cpu`)
it runs the kernels in the Triton interpreter at a small shape in fp32, as a test of this machinery.
Each case is appended to FILE as one JSON line when it is done, and a case that raises is recorded with
its error, so one broken kernel does not hide the others. The exit code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext

import torch

SHAPES = {"cuda": dict(batch=64, block=256, n_embd=384, n_head=6, n_layer=6),
          "cpu": dict(batch=2, block=64, n_embd=64, n_head=2, n_layer=2)}
VOCAB = 65


def milliseconds(fn: Callable[[], object], device: torch.device, rounds: int) -> float:
    """The GPU's own median time of fn (launch overhead excluded) on CUDA; the wall clock's on the CPU."""
    from bench.common import device_seconds

    fn()  # compilation and warm-up
    if device.type == "cuda":
        return device_seconds(fn, rounds) * 1e3
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def op_step(fn: Callable, inputs: tuple, dtype: torch.dtype, seed: int) -> Callable[[], list[torch.Tensor]]:
    """A call of fn's forward and backward on `inputs` cast to dtype, for fixed random output gradients,
    returning [out..., d(input)...] (the inputs are cast once, outside the call)."""
    args = [t.to(dtype).detach().requires_grad_() for t in inputs]
    grads_out: list[torch.Tensor] = []

    def step() -> list[torch.Tensor]:
        outs = fn(*args)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        if not grads_out:
            g = torch.Generator(device=outs[0].device).manual_seed(seed)
            grads_out.extend(torch.randn(o.shape, generator=g, dtype=torch.float64, device=o.device).to(o.dtype)
                             for o in outs)
        grads = torch.autograd.grad(outs, args, grads_out)
        return [o.detach() for o in outs] + list(grads)

    return step


def op_cases(shape: dict, device: torch.device) -> dict[str, tuple[Callable, Callable, tuple, list[str]]]:
    """name -> (triton fn, reference fn, fp32 inputs, names of the compared tensors)."""
    from fastgpt.kernels.attention import causal_attention_reference, causal_attention_triton
    from fastgpt.kernels.layer_norm import (add_layer_norm_reference, add_layer_norm_triton, layer_norm_reference,
                                   layer_norm_triton)
    from fastgpt.kernels.linear_cross_entropy import linear_cross_entropy_plain, linear_cross_entropy_triton
    from fastgpt.kernels.linear_gelu import linear_gelu_reference, linear_gelu_triton

    g = torch.Generator(device=device).manual_seed(0)
    b, t, c, h = shape["batch"], shape["block"], shape["n_embd"], shape["n_head"]

    def randn(*size, scale=1.0):
        return torch.randn(size, generator=g, device=device) * scale

    rows = randn(b * t, c)
    weight = 1 + 0.1 * randn(c)
    # the loss over GPT-2's vocabulary padded as on GPUs (50257 classes, 50304 rows); a tenth ignored
    vocab, padded = (50257, 50304) if device.type == "cuda" else (257, 320)
    targets = torch.randint(vocab, (b * t,), generator=g, device=device)
    targets[::10] = -100
    return {
        "layer_norm": (layer_norm_triton, layer_norm_reference, (rows, weight), ["y", "dx", "dweight"]),
        "add_layer_norm": (add_layer_norm_triton, add_layer_norm_reference, (rows, randn(b * t, c), weight),
                           ["h", "y", "dx", "dresidual", "dweight"]),
        "linear_gelu": (linear_gelu_triton, linear_gelu_reference,
                        (rows, randn(4 * c, c, scale=c ** -0.5)), ["y", "dx", "dweight"]),
        "causal_attention": (causal_attention_triton, causal_attention_reference,
                             tuple(randn(b, h, t, c // h) for _ in range(3)), ["out", "dq", "dk", "dv"]),
        "linear_cross_entropy": (lambda x, w: linear_cross_entropy_triton(x, w, targets, None, -100, vocab),
                                 lambda x, w: linear_cross_entropy_plain(x, w, targets, None, -100, vocab),
                                 (rows, randn(padded, c, scale=c ** -0.5)), ["loss", "dx", "dweight"]),
    }


def op_case(name: str, case: tuple, dtype: torch.dtype, device: torch.device, rounds: int) -> dict:
    from fastgpt.kernels.accuracy import compare

    triton_fn, reference_fn, inputs, names = case
    kernel_step, same_step = op_step(triton_fn, inputs, dtype, 1), op_step(reference_fn, inputs, dtype, 1)
    kernel, same = kernel_step(), same_step()
    exact = op_step(reference_fn, inputs, torch.float64, 1)()
    tensors = {n: compare(k, e, s) for n, k, e, s in zip(names, kernel, exact, same)}
    return {"name": name, "ok": all(r["ok"] for r in tensors.values()), "tensors": tensors,
            "triton_ms": milliseconds(kernel_step, device, rounds),
            "reference_ms": milliseconds(same_step, device, rounds)}


def model_case(shape: dict, dtype: torch.dtype, device: torch.device, rounds: int) -> dict:
    """The whole GPT (dropout off): loss and every gradient under the kernels and under the references, in
    the run's dtype (bf16 autocast on CUDA), each against the reference model in fp64."""
    from fastgpt import kernels
    from fastgpt.model import GPTConfig, build_model

    config = GPTConfig(vocab_size=VOCAB, block_size=shape["block"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randint(0, VOCAB, (shape["batch"], shape["block"]), generator=g, device=device)
            for _ in range(2))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def loss_and_grads(backend: str, m=model, cast=autocast) -> tuple[torch.Tensor, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        with kernels.backend(backend), cast:
            _, loss = m(x, y)
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.double().flatten() for p in m.parameters()])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kernel_loss, kernel_grad = loss_and_grads("triton")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    same_loss, same_grad = loss_and_grads("reference")
    exact_model = build_model(config).to(device).double()
    exact_model.load_state_dict(model.state_dict())
    exact_loss, exact_grad = loss_and_grads("reference", exact_model, nullcontext())

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    result = {"loss_error": abs(kernel_loss - exact_loss).item(), "torch_loss_error": abs(same_loss - exact_loss).item(),
              "grad_error": relative(kernel_grad, exact_grad), "torch_grad_error": relative(same_grad, exact_grad)}
    # the same rule as the ops, on the loss and the relative error of all gradients together
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    ok = (result["loss_error"] <= 2 * result["torch_loss_error"] + floor * exact_loss.item()
          and result["grad_error"] <= 2 * result["torch_grad_error"] + floor)
    return {"name": "gpt", "ok": ok, **result, "loss": exact_loss.item(), "peak_memory_mb": peak / 2**20 if peak else None,
            "triton_ms": milliseconds(lambda: loss_and_grads("triton"), device, rounds),
            "reference_ms": milliseconds(lambda: loss_and_grads("reference"), device, rounds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file, appended to")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench.report.smoke: error: on the CPU the kernels run in the Triton interpreter: set TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    shape = SHAPES[device.type]
    # bf16 on a GPU, as training runs; the interpreter computes bf16 wrongly, so fp32 there
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds = 10 if device.type == "cuda" else 2
    # the whole GPT first: it runs every kernel at once, so a cut phase still says whether they all work
    cases: list[tuple[str, Callable[[], dict]]] = [("gpt", lambda: model_case(shape, dtype, device, rounds))]
    cases += [(name, lambda name=name, case=case: op_case(name, case, dtype, device, rounds))
              for name, case in op_cases(shape, device).items()]
    failed = False
    for name, run in cases:
        started = time.perf_counter()
        try:
            result = run()
        except Exception as e:  # recorded, and the next case runs
            result = {"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      "traceback": traceback.format_exc()[-2000:]}
        result |= {"kind": "smoke", "dtype": str(dtype).removeprefix("torch."), "device": device.type,
                   "shape": shape, "seconds": time.perf_counter() - started}
        failed |= not result["ok"]
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        timing = (f"{result['triton_ms']:.3f} ms triton, {result['reference_ms']:.3f} ms reference"
                  if "triton_ms" in result else result.get("error", ""))
        print(f"smoke {name}: {'ok' if result['ok'] else 'FAILED'} ({timing})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
