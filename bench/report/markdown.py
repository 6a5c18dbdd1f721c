"""The GPU report's tables, from its JSON (bench/report/__init__.py)."""

from __future__ import annotations


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def percent(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def phase_table(report: dict) -> list[str]:
    lines = ["| phase | status | seconds | share | commit (sources) | note |", "|---|---|---|---|---|---|"]
    for name, phase in report["phases"].items():
        note = phase.get("reason", "")
        if name == "kernel_tests" and "passed" in phase:
            note = f"{phase['passed']} passed, {phase['failed']} failed, {phase['skipped']} skipped"
        lines.append(f"| {name} | **{phase['status']}** | {fmt(phase.get('seconds'), 0)} | "
                     f"{fmt(phase.get('share_s'), 0)} | {phase.get('commit') or '-'} ({phase.get('sources', '-')}) | "
                     f"{note} |")
    return lines + [""]


def smoke(phase: dict) -> list[str]:
    results = phase.get("results", [])
    where = ("GPU ms: CUDA events, launch overhead excluded." if any(r.get("device") == "cuda" for r in results)
             else "On the CPU the Triton column is the Triton interpreter's wall clock: it tests the machinery, "
                  "not the speed.")
    lines = ["## Smoke: each op and the GPT, forward + backward", "",
             "Worst tensor: the kernel's max error against fp64 over the rule's bound (2x PyTorch's own error in "
             f"the same dtype plus a floor; <= 1 passes). {where}", "",
             "| case | ok | worst tensor: error / bound | Triton ms | reference ms | reference / Triton |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r and "tensors" not in r and "grad_error" not in r:
            lines.append(f"| {r['name']} | **FAILED** | {r['error']} | - | - | - |")
            continue
        if "tensors" in r:
            name, t = max(r["tensors"].items(), key=lambda kv: kv[1].get("error", float("inf")) /
                          max(kv[1].get("bound", 1e-30), 1e-30))
            worst = f"{name}: {t['error']:.3g} / {t['bound']:.3g}" if "error" in t else f"{name}: {t['why']}"
        else:
            worst = (f"loss {r['loss_error']:.3g} (torch {r['torch_loss_error']:.3g}), gradients "
                     f"{r['grad_error']:.3g} (torch {r['torch_grad_error']:.3g}) relative")
        ratio = r["reference_ms"] / r["triton_ms"] if r.get("triton_ms") else None
        lines.append(f"| {r['name']} ({r['dtype']}) | {'ok' if r['ok'] else '**FAILED**'} | {worst} | "
                     f"{fmt(r.get('triton_ms'), 3)} | {fmt(r.get('reference_ms'), 3)} | {fmt(ratio, 2)}x |")
    return lines + [""]


def kernel_tests(phase: dict) -> list[str]:
    if "passed" not in phase:
        return []
    lines = ["## Kernel tests, native", "", f"`{phase['command']}`: **{phase['passed']} passed, {phase['failed']} "
             f"failed, {phase['skipped']} skipped** in {phase['seconds']:.0f} s ({phase['status']})", ""]
    lines += [f"- failed: `{f['test']}`: {f['message']}" for f in phase["failures"]]
    return lines + ([""] if phase["failures"] else [])


def train_step(phase: dict) -> list[str]:
    results = phase.get("results", [])
    if not results:
        return []
    base = next((r["tokens_per_sec"] for r in results if r.get("backend") == "reference"
                 and r.get("compile_mode") == "default"), None)
    lines = ["## Training step", "", f"`{phase['command']}`. Wall clock per optimizer step (median).", "",
             "| case | ms/step | tokens/s | MFU | peak memory MB | vs reference compiled |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['tokens_per_sec'] / base:.2f}x" if base else "-"
        lines.append(f"| `{r['name']}` | {fmt(r.get('ms_per_iter'), 2)} | {fmt(r.get('tokens_per_sec'), 0)} | "
                     f"{percent(r.get('mfu'))} | {fmt(r.get('peak_memory_mb'), 0)} | {ratio} |")
    return lines + [""]


def kernel_bench(phase: dict) -> list[str]:
    results = phase.get("results", [])
    if not results:
        return []
    lines = ["## Kernel benchmarks", "", f"`{phase['command']}`. Wall ms: the median call, launch overhead "
             "included; GPU ms: the kernels' own time (CUDA events, L2 flushed), from which the figure is computed.",
             "", "| benchmark | wall ms | GPU ms | figure |", "|---|---|---|---|"]
    for r in results:
        figure = next((f"{r[k]:,.1f} {unit}" for k, unit in (("tflops", "TFLOP/s"), ("gb_per_s", "GB/s"),
                                                                ("tokens_per_sec", "tokens/s")) if k in r), "")
        lines.append(f"| `{r['name']}` | {r['median_ms']:.3f} | {fmt(r.get('device_ms'), 3)} | {figure} |")
    return lines + [""]


def time_to_target(phase: dict, report: dict) -> list[str]:
    runs = phase.get("runs", [])
    if not runs:
        return []
    targets = report["targets"]
    lines = [f"## Time to target ({report['preset']})", "",
             "Training seconds before the first evaluation at or below each val loss (evaluation and compilation "
             "excluded).", "",
             "| kernels | status | " + " | ".join(f"to {t}" for t in targets) +
             " | best val | iters | tokens/s | ms/iter | MFU | compile s |",
             "|---|---|" + "---|" * len(targets) + "---|---|---|---|---|---|"]
    for r in runs:
        reached = [r["reached"].get(str(t)) for t in targets]
        cells = [f"{x['train_seconds']:.1f} s (iter {x['iter']})" if x else "not reached" for x in reached]
        lines.append(f"| {r['kernels']} | {r['status']} | " + " | ".join(cells) +
                     f" | {fmt(r['best_val_loss'], 4)} | {fmt(r['iters'])} | {fmt(r['tokens_per_sec'], 0)} | "
                     f"{fmt(r['ms_per_iter'], 2)} | {percent(r['mfu'])} | {fmt(r['compile_seconds'])} |")
    if len(runs) == 2 and runs[0]["tokens_per_sec"] and runs[1]["tokens_per_sec"]:
        lines += ["", f"Training tokens/s, kernels / reference: **{runs[0]['tokens_per_sec'] / runs[1]['tokens_per_sec']:.2f}x**"]
    return lines + [""] + [f"- `python {r['command']}`" for r in runs] + [""]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fastgpt GPU report: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; "
             f"fastgpt commit {env.get('commit') or 'unknown (no git)'}, sources {env.get('sources', '-')}. " + ("Command: " if len(report["commands"]) == 1 else "Made by: ")
             + "; ".join(f"`{c}`" for c in report["commands"]) + ".", "",
             f"Complete: **{'yes' if report['complete'] else 'no'}**.", ""]
    lines += phase_table(report)
    phases = report["phases"]
    for name, section in (("smoke", smoke), ("kernel_tests", kernel_tests), ("train_step", train_step),
                          ("kernel_bench", kernel_bench)):
        if name in phases:
            lines += section(phases[name])
    if "time_to_target" in phases:
        lines += time_to_target(phases["time_to_target"], report)
    return "\n".join(lines)
