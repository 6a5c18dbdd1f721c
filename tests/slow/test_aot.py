"""Ahead-of-time compilation of every op's Triton kernels for NVIDIA GPUs, with no GPU present
(tests/aot.py): every configuration a launcher or the tuner may pick compiles for sm_90 and sm_80 (and
the presets' for sm_75, sm_86, sm_89, sm_100) within shared memory and without register spills."""

from __future__ import annotations

import importlib

import aot
from fastgpt.kernels.attention import HEAD_DIMS
from fastgpt.kernels.layer_norm import MAX_N, _tile

linear_gelu_module = importlib.import_module("fastgpt.kernels.linear_gelu")  # kernels.linear_gelu is the op
lce_module = importlib.import_module("fastgpt.kernels.linear_cross_entropy")  # kernels.linear_cross_entropy is the op


def test_layer_norm_compiles_every_configuration_for_sm90_and_sm80(aot_compile):
    rows = aot_compile("fastgpt.kernels.layer_norm")
    aot.assert_clean(rows)
    # every row tile the launcher picks for a width from 64 to MAX_N is among them, forward and backward
    for kernel, backward in (("_layer_norm_fwd_kernel", False), ("_layer_norm_bwd_kernel", True)):
        needed = {_tile(n, backward) for n in range(64, MAX_N + 1)}
        for dtype in ("fp32", "bf16"):
            for arch in (90, 80):
                compiled = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"])
                            for r in rows if (r["kernel"], r["dtype"], r["arch"]) == (kernel, dtype, arch)}
                assert needed <= compiled, (kernel, dtype, arch, needed - compiled)


def test_linear_gelu_compiles_every_configuration_for_sm90_and_sm80(aot_compile):
    rows = aot_compile("fastgpt.kernels.linear_gelu")
    aot.assert_clean(rows)
    # every tuner candidate, with and without bias, for bf16 and fp32, and the backward, on both
    expected = {(2 if dtype == "bf16" else 3) * len(configs) for dtype, configs in
                (("bf16", linear_gelu_module._CONFIGS_16BIT), ("fp32", linear_gelu_module._CONFIGS_FP32))}
    for dtype in ("fp32", "bf16"):
        for arch in (90, 80):
            found = [r["kernel"] for r in rows if (r["dtype"], r["arch"]) == (dtype, arch)]
            assert set(found) == {"_linear_gelu_fwd_kernel", "_linear_gelu_bwd_kernel"}, (dtype, arch)
            assert found.count("_linear_gelu_fwd_kernel") in expected, (dtype, arch)
    # on every other architecture, each candidate the tuner may time there, in the presets' dtype
    for arch, dtype in aot.PRESET_ARCHS.items():
        tiles = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["constexprs"]["BLOCK_K"], r["num_warps"],
                  r["num_stages"]) for r in rows if (r["arch"], r["dtype"], r["kernel"]) ==
                 (arch, dtype, "_linear_gelu_fwd_kernel")}
        assert tiles == set(linear_gelu_module._candidates(2, arch)), arch


def test_attention_compiles_every_configuration(aot_compile):
    rows = aot_compile("fastgpt.kernels.attention")
    # no register spills anywhere, the presets' head dims (cpu: 32, shakespeare_char: 64) included
    aot.assert_clean(rows)
    kinds = {(r["kernel"], r["arch"], r["head_dim"], r["dtype"]) for r in rows}
    parts = {(r["kernel"], r["arch"], r["head_dim"], r["dtype"], r.get("part")) for r in rows}
    for kernel, part in (("_attention_fwd_kernel", None), ("_attention_bwd_preprocess_kernel", None),
                         ("_attention_bwd_kernel", "dkdv"), ("_attention_bwd_kernel", "dq")):
        for arch in (90, 80):
            for d in HEAD_DIMS:
                for dtype in ("fp16", "bf16"):
                    assert (kernel, arch, d, dtype) in kinds and (kernel, arch, d, dtype, part) in parts
    for arch, dtype in aot.PRESET_ARCHS.items():  # the presets' head dims on the other architectures
        assert {(r["head_dim"], r.get("part"), r.get("regime")) for r in rows if (r["arch"], r["dtype"]) == (arch, dtype)
                } == {(d, part, regime) for d in (32, 64) for part, regime in
                      ((None, "train"), (None, "decode"), ("dkdv", None), ("dq", None), (None, None))}, arch


def test_linear_cross_entropy_compiles_every_configuration(aot_compile):
    rows = aot_compile("fastgpt.kernels.linear_cross_entropy")
    aot.assert_clean(rows)
    for arch in (90, 80):  # every block the launcher picks, with and without the gradient, in each dtype
        for dtype in ("bf16", "fp16", "fp32"):
            found = {(r["block"], r["grad"]) for r in rows if (r["arch"], r["dtype"]) == (arch, dtype)}
            assert found == {(b, g) for b, _ in lce_module._BLOCKS for g in (True, False)}, (arch, dtype)
    for arch, dtype in aot.PRESET_ARCHS.items():  # GPT-2's vocabulary on the other architectures
        assert {(r["block"], r["grad"]) for r in rows if r["arch"] == arch} == {
            (lce_module._BLOCKS[-1][0], g) for g in (True, False)}, arch
