"""Attention kernels compiled for sm_90 where there is no GPU (ptxas runs here): what the interpreter cannot show.

A test hands ``run_rows`` a script and its specs; the script runs in a fresh Python (this process interprets, and
the Triton asked for may be another environment's), imports this module (``build``, ``ptxas_usage``,
``attention_signature``) and prints one JSON row per spec. ``ATTENTION`` is that script for kernels/attention.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# kernels/attention.py's arguments: pointers, tensors (bf16; split-KV decoding writes float32 partials to O) and
# floats; every other argument that is not a constexpr is an i32
POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "SLOPES": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "K_LENS": "*i32",
            "M": "*u8", "BLOCK_TABLE": "*i32", "SINKS": "*fp32", "SEED": "*i64"}
TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
FLOATS = {"qk_scale", "sm_scale", "sc_scale", "sc_log2e", "drop_p", "drop_scale"}
UNIT = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dqd", "stride_dkd", "stride_dvd"}


def attention_signature(fn, consts: dict, split: bool = False) -> tuple[dict, dict, dict]:
    """(constexprs, signature, attrs) of a kernels/attention.py kernel as its launcher calls it: the constexprs
    ``consts`` does not name off, unit head-dim strides, 16-divisible pointers and row strides."""
    consts = dict({fn.arg_names[i]: 0 for i in fn.constexprs}, **consts)
    consts.update({a: 1 for a in fn.arg_names if a in UNIT})  # as the launchers' unit head-dim strides specialize
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a in POINTERS:
            sig[a] = POINTERS[a]
        elif a in TENSORS:
            sig[a] = "*fp32" if (a == "O" and split) else "*bf16"
        else:
            sig[a] = "fp32" if a in FLOATS else "i32"
        if sig[a].startswith("*") or a.startswith("stride") and sig[a] == "i32":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return consts, sig, attrs


def build(fn, sig: dict, consts: dict, attrs: dict, warps: int, stages: int, source=None):
    """``fn`` compiled for sm_90 (``source``: ASTSource, or Gluon's); returns (the kernel, ptxas's -v log)."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # every build runs ptxas, whose -v log (registers, spills) we read
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log here
        k = triton.compile((source or ASTSource)(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return k, log.getvalue()


def ptxas_usage(log: str) -> dict:
    """Registers and spill bytes (loads + stores) from a ptxas -v log (-1 where it says nothing)."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs[0]) if regs else -1,
                spill_bytes=sum(int(a) + int(b) for a, b in spills) if spills else -1)


def error_row(row: dict, e: Exception) -> dict:
    """A kernel that does not build is a row, not a crash."""
    return dict(row, error=(type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[-1])[:300])


def attention_rows(specs: list[dict]) -> None:
    """Script side of ``ATTENTION``: for each spec {"kernel": "fwd" | "dkdv" | "dq", "config": [BLOCK_M, BLOCK_N,
    warps, stages], "consts": {...}} one JSON row: the spec with triton, regs, spill_bytes, smem, wgmma, mma_sync
    (or error). ``consts["SPLIT"]``: the split-KV forward (float32 partials)."""
    import triton

    import embedattn.kernels.attention as K

    for s in specs:
        fn = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq}[s["kernel"]]
        bm, bn, warps, stages = s["config"]
        row = dict(s, triton=triton.__version__)
        try:
            consts, sig, attrs = attention_signature(fn, dict(s["consts"], BLOCK_M=bm, BLOCK_N=bn),
                                                     s["consts"].get("SPLIT", False))
            k, log = build(fn, sig, consts, attrs, warps, stages)
        except Exception as e:
            row = error_row(row, e)
        else:
            ptx = k.asm["ptx"]
            row.update(ptxas_usage(log), smem=k.metadata.shared, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                       mma_sync=len(re.findall(r"\bmma\.sync", ptx)))
        print(json.dumps(row), flush=True)


ATTENTION = "import json, sys, sm90; sm90.attention_rows(json.loads(sys.argv[1]))"


def run_rows(script: str, specs: list[dict], python: str = sys.executable, timeout: float = 1200) -> list[dict]:
    """Run ``script`` with the JSON ``specs`` as its argument in ``python`` without TRITON_INTERPRET, the repository
    and this folder first on its path; its JSON rows, one per spec. Skips where that Python cannot compile for
    sm_90 (no Triton, ptxas or CUDA backend); any other failure raises with the script's stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([python, "-c", script, json.dumps(specs)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or len(rows) != len(specs):
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        if any(x in tail for x in ("ImportError", "ModuleNotFoundError", "ptxas", "FileNotFoundError", "backend")):
            pytest.skip(f"cannot compile for sm_90 with {python}: {tail}")
        raise AssertionError(r.stderr[-3000:])
    return rows
