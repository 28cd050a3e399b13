"""The CPU path of the kernel trainer: ``_w2v.c`` (the algorithm of ``train_chunks_reference`` in C),
built once with the system C compiler into a cache keyed by the source's hash, the compiler and the
target it compiles for, and called through ctypes with one ``W2VArgs`` struct. ctypes releases the GIL,
so ``workers`` Python threads train their chunks concurrently (Hogwild, like gensim's and word2vec.c's
threads). ``load()`` returns None where no compiler works; ``build_error()`` then says why, and the
model says once which road trains instead (gensim's ``FAST_VERSION`` warning, in words).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("_w2v.c")
ABI_VERSION = 3  # W2V_ABI_VERSION in _w2v.c

# -ffast-math is avoided on purpose: linked into a shared library it sets flush-to-zero for the whole
# process. The reassociation flags alone let the compiler vectorize the dot products.
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-ffp-contract=fast")

_p, _i64, _i32, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double


class W2VArgs(ctypes.Structure):
    """``w2v_args`` of ``_w2v.c``, field for field (the library reports its size and ABI version, checked
    at load)."""

    _fields_ = [
        ("tokens", _p), ("bounds", _p), ("c_begin", _i64), ("c_end", _i64), ("c_step", _i64),
        ("keep", _p), ("aprob", _p), ("alias", _p), ("w_in", _p), ("w_out", _p), ("w_hs", _p), ("lockf", _p),
        ("hs_off", _p), ("hs_points", _p), ("hs_codes", _p), ("stats", _p),
        ("V", _i64), ("D", _i64), ("K", _i64), ("W", _i64), ("seed", ctypes.c_uint64), ("pos_base", _i64),
        ("lr_start", _f64), ("lr_end", _f64), ("total", _f64), ("max_chunk", _i64),
        ("sg", _i32), ("cbow_mean", _i32), ("shared", _i32), ("shrink", _i32), ("want_loss", _i32), ("hs", _i32),
    ]


_state: dict = {}


def _cache_dir() -> str:
    d = os.environ.get("EMBEDATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "embedattn")
    os.makedirs(d, exist_ok=True)
    return d


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH, and CC is not set")
    return cc


def _run(cmd: list[str], stdin: str = "") -> str:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {r.stderr.strip()[-2000:]}")
    return r.stdout


@functools.cache
def cache_key(cc: str) -> str:
    """The build's identity: the source, the compiler (its path and version) and the target it compiles
    for: the predefined macros under the flags, which spell out what ``-march=native`` means on this CPU
    (so a home directory shared by machines with different CPUs keeps one library per target)."""
    version = _run([cc, "--version"])
    target = _run([cc, *[f for f in FLAGS if f.startswith(("-m", "-f"))], "-dM", "-E", "-x", "c", "-"])
    parts = [SOURCE.read_text(), cc, version, " ".join(FLAGS), "\n".join(sorted(target.splitlines()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def build() -> str:
    """The compiled library's path (built now unless the cache holds it)."""
    if not SOURCE.exists():
        raise RuntimeError(f"{SOURCE} is missing (a broken install: reinstall embedattn)")
    cc = _compiler()
    path = os.path.join(_cache_dir(), f"w2v_{cache_key(cc)}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "w2v.so")
        _run([cc, *FLAGS, "-o", out, str(SOURCE), "-lm"])
        tmp_final = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, tmp_final)
        os.replace(tmp_final, path)  # atomic: concurrent builders never load a half-written file
    return path


def load():
    """The compiled ``w2v_train`` (a ctypes function taking a ``W2VArgs`` pointer), or None when it cannot
    be built or loaded (``build_error()`` says why). Tried once per process."""
    if "fn" not in _state:
        _state["fn"], _state["error"] = None, None
        try:
            lib = ctypes.CDLL(build())
            lib.w2v_abi.restype = ctypes.c_int64
            abi = lib.w2v_abi()
            if (abi >> 32, abi & 0xFFFFFFFF) != (ABI_VERSION, ctypes.sizeof(W2VArgs)):
                raise RuntimeError(f"the library's ABI ({abi >> 32}, {abi & 0xFFFFFFFF} bytes) is not the binding's "
                                   f"({ABI_VERSION}, {ctypes.sizeof(W2VArgs)} bytes)")
            fn = lib.w2v_train
            fn.argtypes = [ctypes.POINTER(W2VArgs)]
            fn.restype = ctypes.c_int
            _state["fn"] = fn
        except Exception as e:  # noqa: BLE001 (no compiler, a failed build: the model names the road it takes)
            _state["error"] = str(e)
    return _state["fn"]


def build_error() -> str | None:
    """Why ``load()`` returned None (None when it did not, or was not tried)."""
    return _state.get("error")


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def train_chunks(fn, tokens: np.ndarray, bounds: np.ndarray, c_begin: int, c_end: int, c_step: int,
                 keep_prob: np.ndarray, alias_prob: np.ndarray, alias: np.ndarray, w_in: np.ndarray,
                 w_out: np.ndarray | None, *, seed: int, pos_base: int, lr_start: float, lr_end: float,
                 total_words: float, window: int, negative: int, sg: bool, cbow_mean: bool, shared_negatives: bool,
                 shrink_windows: bool, max_chunk: int, want_loss: bool = True, w_hs: np.ndarray | None = None,
                 hs_off: np.ndarray | None = None, hs_points: np.ndarray | None = None,
                 hs_codes: np.ndarray | None = None, lockf: np.ndarray | None = None) -> np.ndarray:
    """Chunks ``c_begin, c_begin + c_step, ... < c_end`` through the C kernel, in place on the float32
    tables (C-contiguous numpy arrays; int32 tokens/alias/hs_points, int64 bounds/hs_off, uint8 hs_codes,
    float32 probabilities and lockf). ``w_hs`` (with the Huffman arrays): hierarchical softmax; ``lockf``
    None: every input row trains. Returns [summed loss (0 unless ``want_loss``), pairs, kept words]."""
    stats = np.zeros(3)
    V, D = w_in.shape
    hs = w_hs is not None
    args = W2VArgs(
        tokens=_ptr(tokens), bounds=_ptr(bounds), c_begin=c_begin, c_end=c_end, c_step=c_step, keep=_ptr(keep_prob),
        aprob=_ptr(alias_prob), alias=_ptr(alias), w_in=_ptr(w_in), w_out=_ptr(w_out) if negative else None,
        w_hs=_ptr(w_hs), lockf=_ptr(lockf), hs_off=_ptr(hs_off) if hs else None,
        hs_points=_ptr(hs_points) if hs else None, hs_codes=_ptr(hs_codes) if hs else None, stats=_ptr(stats),
        V=V, D=D, K=negative, W=window, seed=seed, pos_base=pos_base, lr_start=lr_start, lr_end=lr_end,
        total=total_words, max_chunk=max_chunk, sg=int(sg), cbow_mean=int(cbow_mean),
        shared=int(shared_negatives), shrink=int(shrink_windows), want_loss=int(want_loss), hs=int(hs))
    if fn(ctypes.byref(args)):
        raise MemoryError("word2vec C kernel: out of memory")
    return stats
