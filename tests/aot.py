"""Ahead-of-time compilation of a kernel module's Triton kernels for NVIDIA GPUs, with no GPU present.

    python tests/aot.py fastgpt.kernels.layer_norm [fastgpt.kernels.linear_gelu ...]   ->  one JSON object per line

Each kernel module lists, in `aot_specs(arch)`, every configuration its launchers or tuner may pick there:
dicts with `fn` (the @triton.jit kernel), `signature` (argument name -> Triton type, "constexpr" for
compile-time arguments, which is also how the JIT passes integer arguments equal to 1), `constexprs`,
`num_warps`, `num_stages`, optionally `divisible` (integer arguments the JIT would see as multiples of
16) and free-form `tags` (n_embd, dtype, preset, ...). Every spec is compiled for sm_90 (H100) and sm_80
(A100), the presets' also for sm_75, sm_86, sm_89 and sm_100 (FULL_ARCHS, PRESET_ARCHS), and reported with its shared memory and the registers, stack and local memory (spills) that
`cuobjdump --dump-resource-usage` reads off the cubin. It runs as a subprocess because the Triton interpreter, which the tests switch on when there is
no GPU, replaces the kernels with objects that cannot be compiled.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Every configuration for the H100/H200 and the A100; the presets' for the T4 (sm_75, fp16: it has no
# bf16), the RTX 30xx/A10 (sm_86), the L4/RTX 40xx (sm_89) and the B200 (sm_100), in bf16, which keeps the
# suite's compile time in check. Each module's aot_specs(arch) is what its launchers pick on that arch.
FULL_ARCHS = (90, 80)
PRESET_ARCHS = {75: "fp16", 86: "bf16", 89: "bf16", 100: "bf16"}
ARCHS = (*FULL_ARCHS, *PRESET_ARCHS)
# ptxas sometimes parks a single 64-bit value in local memory while registers are to spare (seen at 64
# and 168 of 255 registers), and which kernels it does it for changes between Triton releases (3.6 and 3.9
# differ here): one cached load per loop, not register pressure. More than that is a spill.
INCIDENTAL_SPILL_BYTES = 8


def spilling(rows: list[dict]) -> list[dict]:
    """The compiled configurations that spill registers (beyond ptxas' incidental 8 bytes)."""
    return [r for r in rows if r.get("spills", 0) > INCIDENTAL_SPILL_BYTES]


def wanted(tags: dict, arch: int) -> bool:
    """Whether a spec is compiled for `arch`: all of them for FULL_ARCHS, the presets' in the arch's
    autocast dtype for the others."""
    return arch in FULL_ARCHS or (tags.get("preset", False) and tags.get("dtype") == PRESET_ARCHS[arch])


def assert_clean(rows: list[dict]) -> None:
    """Every configuration compiled, within its architecture's shared memory, without register spills."""
    errors = [r for r in rows if "error" in r]
    assert not errors, errors[:3]
    too_big = [r for r in rows if r["shared"] > r["shared_limit"]]
    assert not too_big, too_big[:3]
    assert not spilling(rows), f"register spills: {spilling(rows)}"


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED of the one kernel in `cubin`, as cuobjdump reports them."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {key.lower(): int(value) for key, value in found.items()}


def compile_spec(spec: dict, arch: int) -> dict:
    import triton

    from fastgpt.kernels.core import shared_memory
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # What the JIT specialises at launch: pointers from the caching allocator are 16-byte aligned, and so
    # are the integer arguments a spec lists in `divisible` (strides, sizes) for the shapes it stands for.
    names = spec["fn"].arg_names
    hinted = [k for k, t in spec["signature"].items() if t.startswith("*")] + list(spec.get("divisible", ()))
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in hinted}
    source = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    usage = resource_usage(compiled.asm["cubin"])
    return {
        "kernel": spec["fn"].__name__, "arch": arch, **spec["tags"],
        "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
        "constexprs": {k: v for k, v in spec["constexprs"].items() if not isinstance(v, bool) or v},
        "shared": compiled.metadata.shared, "shared_limit": shared_memory(arch),
        "regs": usage.get("reg", 0), "spills": usage.get("stack", 0) + usage.get("local", 0),
    }


_jobs: list[tuple[str, dict, int]] = []  # (module, spec, arch); forked workers inherit it


def _compile_job(index: int) -> dict:
    module, spec, arch = _jobs[index]
    try:
        row = compile_spec(spec, arch)
    except Exception as error:  # report every failure, keep compiling the rest
        row = {"kernel": spec["fn"].__name__, "arch": arch, **spec["tags"], "constexprs": spec["constexprs"],
               "num_warps": spec["num_warps"], "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    return {"module": module, **row}


def main(modules: list[str]) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for name in modules:
        module = importlib.import_module(name)
        for arch in ARCHS:
            _jobs.extend((name, spec, arch) for spec in module.aot_specs(arch) if wanted(spec["tags"], arch))
    # compilation is CPU-bound and independent per job: one worker per core
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for row in pool.imap(_compile_job, range(len(_jobs))):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
