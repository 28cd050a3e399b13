"""Tuned launch configs as data: one JSON table per device, looked up by the launchers (vLLM's fused-MoE pattern).

``<device key>.json`` in this folder (``device_key("NVIDIA H200") == "nvidia_h200"``) is written by
``python -m benchmarks.tune`` on that device and shipped as package data. Folders named in
``EMBEDATTN_CONFIGS_DIR`` (``os.pathsep``-separated) add tables, or override the shipped table's entries key by key
(the first folder wins). ``EMBEDATTN_TUNED_CONFIGS=0`` ignores every table (heuristic vs tuned A/B runs). Both are
read once per process, at the first lookup (``clear_cache()`` reads them again).

A launcher hands each kernel launch to ``run(kernel, key, heuristic, launch, autotune=..., device=...)``:

1. the table has ``key`` (exactly, else the nearest length/token bucket with the same dtype, head dim and flags):
   ``launch(tuned config)``, source ``tuned`` (``tuned(nearest)``). A tuned config that fails to compile or to load
   on this Triton (shared memory, registers) falls back to the heuristic with a ``TunedConfigWarning``, once per
   config and process, never an error;
2. a miss with ``EMBEDATTN_AUTOTUNE`` on: ``autotune()`` (the launcher's ``triton.autotune`` object), ``autotuned``;
3. otherwise ``launch(heuristic)``, ``heuristic``.

Under ``torch.compile`` the choice is made while tracing; the fallback then only covers configs already seen failing
in this process (Inductor compiles the traced launch later, out of this module's reach).

Each call records its (source, config) per kernel: ``records(op)`` is the live ``{kernel: "tuned BLOCK_M=128 ..."}``
dict the benchmark harness reads back through the kernel module's ``last_config()``.

Kernel names are ``<op>.<kernel>``: ``attention.fwd``, ``attention.bwd_dkdv``, ``attention.bwd_dq``,
``embedding.fwd``, ``embedding.bwd_atomic``, ``embedding.bwd_sorted``, ``embedding.bwd_pos``,
``negative_sampling.fwd``, ``negative_sampling.bwd``. Keys are flat dicts built by ``attention_key``,
``embedding_key`` and ``negative_sampling_key``; the bucket fields (``nq``, ``nk``, ``tokens``) are rounded up to a
power of two (at least 16) like the autotune keys, the others must match exactly.

Table format (``FORMAT`` 1)::

    {"format": 1, "device": "NVIDIA H200", "device_key": "nvidia_h200",
     "triton": "3.6.0", "torch": "2.11.0+cu130", "date": "2026-12-01T10:00:00Z", "command": "python -m ...",
     "kernels": {"attention.fwd": {"dtype=bf16,flags=causal,head_dim=128,nk=4096,nq=4096": {
         "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, "ms": 0.41,
         "runner_up": {...}, "runner_up_ms": 0.43, "heuristic": {...}, "heuristic_ms": 0.47,
         "tried": 11, "failed": 0, "shape": "b=4 causal=1 d=128 dtype=bf16 h=16 n=4096", "date": "...",
         "triton": "3.6.0"}}},
     "last_run": {"date": "...", "seconds": 118.2, "tuned": 40, "failed": [...], "skipped": [...]}}

Only ``kernels.<kernel>.<key>.config`` is read at launch; the rest documents how it was chosen.
Importing this module needs neither Triton nor a GPU.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._backend import autotune_enabled, env_flag

__all__ = [
    "BUCKET_FIELDS", "FORMAT", "Key", "PACKAGE_DIR", "TunedConfigWarning", "as_dict", "attention_key", "bucket",
    "clear_cache", "device_key", "embedding_key", "entries", "format_config", "guard", "key_string", "last",
    "load_table", "lookup", "merge_tables", "negative_sampling_key", "normalize_key", "now_utc", "parse_key",
    "point_source", "read_table", "record", "recorded", "records", "reset", "run", "table_path", "tuning",
    "write_table",
]  # fmt: skip

FORMAT = 1
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ENV_DIRS = "EMBEDATTN_CONFIGS_DIR"
ENV_ENABLED = "EMBEDATTN_TUNED_CONFIGS"

# key fields compared by nearness (log2 distance) rather than equality; rounded up to a power of two
BUCKET_FIELDS = ("nq", "nk", "tokens")

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
           "float64": "fp64", "double": "fp64"}  # fmt: skip


class TunedConfigWarning(UserWarning):
    """A tuned config failed on this Triton/device: the launcher ran its heuristic config instead."""


# ----------------------------------------------------------------------------------------------------------------
# device names


_DEVICE_SPEC = re.compile(r"^(cpu|cuda|meta|mps|xpu|hip)(:\d+)?$")
_NAMES: dict[int, str] = {}  # CUDA device index -> name (asked once per process)


def _normalize_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_") or "unknown"


_DEVICE_KEYS: dict[Any, str] = {}  # device (torch.device, str, int) -> key


def device_key(device: Any = None) -> str:
    """The table name of a device: its name lowercased, runs of other characters turned into ``_``.

    ``device``: a torch device (``"cuda:0"``, ``torch.device``, an index) whose CUDA name is asked once, or a
    device name (``"NVIDIA H200"`` -> ``"nvidia_h200"``; a key maps to itself). None: the current CUDA
    device, ``"cpu"`` without one. Non-CUDA devices are their type (``"cpu"``: no table ships for it)."""
    if device is not None:
        try:
            return _DEVICE_KEYS[device]
        except (KeyError, TypeError):
            pass
    if isinstance(device, str) and not _DEVICE_SPEC.match(device.strip().lower()):
        return _DEVICE_KEYS.setdefault(device, _normalize_name(device))
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return "cpu"
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        key = dev.type
    else:
        try:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            if index not in _NAMES:
                _NAMES[index] = torch.cuda.get_device_name(index)
            key = _normalize_name(_NAMES[index])
        except (AssertionError, RuntimeError):  # no CUDA runtime (fake CUDA tensors while tracing): no table
            return "cuda"
    if device is not None and (dev.type != "cuda" or dev.index is not None):  # bare "cuda" follows the current one
        _DEVICE_KEYS[device] = key
    return key


# ----------------------------------------------------------------------------------------------------------------
# keys


def bucket(n: int) -> int:
    """A length/token count's bucket: the next power of two, at least 16 (the autotune keys' rule)."""
    n = int(n)
    return 16 if n <= 16 else 1 << (n - 1).bit_length()


def _dtype_name(v: Any) -> str:
    s = str(v).replace("torch.", "").lower()
    return _DTYPES.get(s, s)


def _flags(v: Any) -> str:
    if isinstance(v, str):
        names = [p for p in v.split("+") if p and p != "none"]
    elif isinstance(v, Mapping):
        names = []
        for name, val in v.items():
            if isinstance(val, bool) or val in (0, 1):
                if val:
                    names.append(str(name).lower())
            elif val:
                names.append(f"{str(name).lower()}{val}")
    else:
        names = [str(p).lower() for p in v]
    return "+".join(sorted(set(names))) or "none"


def _value(name: str, v: Any) -> int | str:
    if name == "dtype":
        return _dtype_name(v)
    if name == "flags":
        f = _flags(v)
        if not re.fullmatch(r"[a-z0-9_+]+", f):
            raise ValueError(f"config key flags {v!r}: names of letters, digits and '_' only")
        return f
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return bucket(v) if name in BUCKET_FIELDS else v
    if isinstance(v, float) and v.is_integer():
        return _value(name, int(v))
    s = str(v)
    if re.fullmatch(r"-?\d+", s):
        return _value(name, int(s))
    if not s or any(c in s for c in ",= "):
        raise ValueError(f"config key field {name}={v!r}: a value may not be empty or hold ',', '=' or spaces")
    return s


class Key(dict):
    """A normalized key (``normalize_key``'s result): a read-only dict, hashable, its table spelling in ``text``."""

    __slots__ = ("text", "_hash")

    def __init__(self, items: Iterable[tuple[str, int | str]]):
        super().__init__(items)
        self.text = ",".join(f"{k}={v}" for k, v in self.items())
        self._hash = hash(self.text)

    def __hash__(self) -> int:  # type: ignore[override]
        return self._hash

    def _read_only(self, *args, **kwargs):
        raise TypeError("a config key is read-only (normalize_key({**key, ...}) makes another)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _read_only  # type: ignore

    def __reduce__(self):
        return Key, (list(self.items()),)


def normalize_key(key: Mapping[str, Any]) -> Key:
    """A key with canonical values: dtypes as ``bf16``/``fp16``/``fp32``, bools as 0/1, ``flags`` as the sorted
    ``+``-joined names of the true flags (``"none"`` when none), bucket fields rounded up to their bucket."""
    if isinstance(key, Key):
        return key
    out = {}
    for name, v in key.items():
        name = str(name).lower()
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"config key field name {name!r}: letters, digits and '_' only")
        out[name] = _value(name, v)
    return Key(sorted(out.items()))


def key_string(key: Mapping[str, Any]) -> str:
    """The table's spelling of a key: ``dtype=bf16,flags=causal,head_dim=128,nk=4096,nq=4096``."""
    return normalize_key(key).text


def parse_key(text: str) -> Key:
    """The key a ``key_string`` spells (ValueError when malformed)."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, sep, v = part.partition("=")
        if not sep or not name:
            raise ValueError(f"malformed config key {text!r}")
        out[name] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return normalize_key(out)


_ATTN_FLAGS = ("CAUSAL", "WINDOW", "SOFTCAP", "ALIBI", "DROPOUT", "VARLEN", "KLENS")


@functools.lru_cache(maxsize=4096)
def _attention_key(dtype: Any, head_dim: int, nq: int, nk: int, on: tuple[bool, ...], mask: int) -> Key:
    flags = {n.lower(): bool(v) for n, v in zip(_ATTN_FLAGS, on)}
    flags.update(mask_bool=mask == 1, mask_add=mask == 2)
    return normalize_key({"dtype": dtype, "head_dim": head_dim, "nq": bucket(nq), "nk": bucket(nk), "flags": flags})


def attention_key(dtype: Any, head_dim: int, nq: int, nk: int, flags: Mapping[str, Any]) -> Key:
    """The key of an attention launch. ``flags``: the launcher's constexpr flags (``Features.flags()`` plus
    VARLEN/KLENS); those that change the kernel's code path enter the key (MASK_KIND as ``mask_bool``/``mask_add``).
    Memoized: a launcher may call it at every launch."""
    g = flags.get
    on = (g("CAUSAL", False), g("WINDOW", False), g("SOFTCAP", False), g("ALIBI", False), g("DROPOUT", False),
          g("VARLEN", False), g("KLENS", False))  # _ATTN_FLAGS, spelled out: this runs at every launch
    return _attention_key(dtype, int(head_dim), bucket(nq), bucket(nk), on, int(g("MASK_KIND", 0) or 0))


@functools.lru_cache(maxsize=4096)
def _launch_key(fields: tuple[tuple[str, Any], ...]) -> Key:
    """Memoized ``normalize_key`` of (name, value) pairs, a None value leaving its field out."""
    return normalize_key({name: v for name, v in fields if v is not None})


def embedding_key(dtype: Any, d: int, tokens: int, pos_mode: int | None = None) -> Key:
    """The key of an embedding launch: table dtype, row width, token bucket (and the forward's position mode)."""
    return _launch_key((("dtype", dtype), ("d", int(d)), ("tokens", bucket(tokens)),
                        ("pos_mode", None if pos_mode is None else int(pos_mode))))


def negative_sampling_key(dtype: Any, d: int, k: int, sparse: bool | None = None) -> Key:
    """The key of a negative-sampling launch: table dtype, row width, negatives per pair (and sparse, backward)."""
    return _launch_key((("dtype", dtype), ("d", int(d)), ("k", int(k)),
                        ("sparse", None if sparse is None else bool(sparse))))


# ----------------------------------------------------------------------------------------------------------------
# configs


def as_dict(config: Any) -> dict[str, Any]:
    """A launch config as a plain dict: a ``triton.Config`` becomes its kwargs plus num_warps/num_stages
    (num_ctas and maxnreg only when set); a mapping is copied."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    out = dict(getattr(config, "kwargs", {}) or {})
    for attr in ("num_warps", "num_stages"):
        if getattr(config, attr, None) is not None:
            out[attr] = getattr(config, attr)
    if getattr(config, "num_ctas", 1) not in (None, 1):
        out["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None) is not None:
        out["maxnreg"] = config.maxnreg
    return out


def format_config(config: Any) -> str:
    """``BLOCK_M=128 BLOCK_N=64 warps=8 stages=3`` (the benchmark harness's spelling)."""
    c = as_dict(config)
    short = {"num_warps": "warps", "num_stages": "stages", "num_ctas": "ctas"}
    parts = [f"{k}={v}" for k, v in c.items() if k not in short]
    parts += [f"{short[k]}={c[k]}" for k in short if k in c]
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# tables


def table_path(device: Any, folder: str | None = None) -> str:
    """Where the table of ``device`` (a name, key or torch device) lives in ``folder`` (default: the package)."""
    return os.path.join(folder or PACKAGE_DIR, f"{device_key(device)}.json")


def _check_entry(kernel: str, ks: str, entry: Any) -> dict | None:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("config"), Mapping) or not entry["config"]:
        return None
    cfg = entry["config"]
    if not all(isinstance(k, str) and isinstance(v, (int, float, str)) and not isinstance(v, bool)
               for k, v in cfg.items()):  # fmt: skip
        return None
    try:
        parse_key(ks)
    except ValueError:
        return None
    return dict(entry)


def read_table(path: str) -> dict:
    """A table file as a dict with every malformed entry dropped (a ``TunedConfigWarning`` says which);
    an unreadable file warns and reads as an empty table. Never raises for bad content."""
    empty = {"format": FORMAT, "kernels": {}}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return empty
    except (OSError, UnicodeDecodeError, ValueError) as e:
        warnings.warn(f"embedattn: config table {path} cannot be read ({e}); ignoring it", TunedConfigWarning,
                      stacklevel=2)  # fmt: skip
        return empty
    if not isinstance(data, dict) or not isinstance(data.get("kernels", {}), dict):
        warnings.warn(f"embedattn: config table {path} is not a table (no 'kernels' object); ignoring it",
                      TunedConfigWarning, stacklevel=2)  # fmt: skip
        return empty
    if data.get("format", FORMAT) != FORMAT:
        warnings.warn(f"embedattn: config table {path} has format {data.get('format')!r}, this embedattn reads "
                      f"{FORMAT}; ignoring it", TunedConfigWarning, stacklevel=2)  # fmt: skip
        return empty
    kernels: dict[str, dict] = {}
    bad = 0
    for kernel, entries in data.get("kernels", {}).items():
        if not isinstance(entries, dict):
            bad += 1
            continue
        for ks, entry in entries.items():
            e = _check_entry(kernel, ks, entry)
            if e is None:
                bad += 1
            else:
                kernels.setdefault(kernel, {})[key_string(parse_key(ks))] = e
    if bad:
        warnings.warn(f"embedattn: config table {path}: {bad} malformed entr{'y' if bad == 1 else 'ies'} ignored",
                      TunedConfigWarning, stacklevel=2)  # fmt: skip
    return {**data, "format": FORMAT, "kernels": kernels}


def write_table(path: str, table: Mapping[str, Any]) -> None:
    """Write a table (sorted keys, one entry per line block: diff-friendly), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"format": FORMAT, **{k: v for k, v in table.items() if k not in ("format", "sources")}}
    data["kernels"] = {k: dict(sorted(v.items())) for k, v in sorted(table.get("kernels", {}).items())}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def merge_tables(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """``over``'s metadata and entries on top of ``base``'s (key by key)."""
    kernels = {k: dict(v) for k, v in base.get("kernels", {}).items()}
    for k, entries in over.get("kernels", {}).items():
        kernels.setdefault(k, {}).update(entries)
    meta = {**{k: v for k, v in base.items() if k != "kernels"}, **{k: v for k, v in over.items() if k != "kernels"}}
    return {**meta, "kernels": kernels}


def _env_dirs() -> list[str]:
    return [d for d in (_env_state()[0] or "").split(os.pathsep) if d.strip()]


_STATE: list[tuple] = []  # the environment the tables were read under (clear_cache() reads it again)


def _env_state() -> tuple:
    """What the tables depend on: EMBEDATTN_CONFIGS_DIR, EMBEDATTN_TUNED_CONFIGS and the package folder, read once
    per process (environment reads cost microseconds at every launch): ``clear_cache()`` after changing them."""
    if not _STATE:
        _STATE.append((os.environ.get(ENV_DIRS), os.environ.get(ENV_ENABLED), PACKAGE_DIR))
    return _STATE[0]


_TABLES: dict[tuple, dict] = {}
_LOOKUPS: dict[tuple, tuple[dict | None, str]] = {}


def load_table(device: Any = None) -> dict:
    """The merged table of ``device`` (a name, key or torch device): the shipped file, then each
    ``EMBEDATTN_CONFIGS_DIR`` folder's file over it (the first folder last, so it wins). Cached per process
    (``clear_cache()`` forgets); ``sources`` lists the files read. Empty when ``EMBEDATTN_TUNED_CONFIGS=0``."""
    key = device_key(device)
    state = _env_state()
    cache_key = (key, *state)
    if cache_key not in _TABLES:
        enabled = env_flag(ENV_ENABLED, True) if state[1] is not None else True
        dirs = tuple(_env_dirs())
        table: dict = {"format": FORMAT, "device_key": key, "kernels": {}, "sources": []}
        if enabled:
            for folder in (state[2], *reversed(dirs)):
                path = os.path.join(folder, f"{key}.json")
                if os.path.isfile(path):
                    table = merge_tables(table, read_table(path))
                    table["sources"] = [*table.get("sources", []), path]
        _TABLES[cache_key] = table
    return _TABLES[cache_key]


def clear_cache() -> None:
    """Forget the loaded tables, the lookups and the broken-config marks (tests; a table rewritten in-process)."""
    _STATE.clear()
    _TABLES.clear()
    _LOOKUPS.clear()
    _CHOICES.clear()
    _BROKEN.clear()


def _distance(a: Mapping, b: Mapping) -> float | None:
    """log2 distance over the bucket fields, None when another field differs or the field sets differ."""
    if a.keys() != b.keys():
        return None
    d = 0.0
    for name, v in a.items():
        if name in BUCKET_FIELDS:
            d += abs(math.log2(max(int(v), 1)) - math.log2(max(int(b[name]), 1)))
        elif v != b[name]:
            return None
    return d


def lookup(kernel: str, key: Mapping[str, Any], device: Any = None) -> tuple[dict | None, str]:
    """``(config, how)`` for ``kernel`` at ``key`` in ``device``'s table: ``how`` is ``"exact"``, ``"nearest"``
    (the entry with the same non-bucket fields whose buckets are nearest in log2 distance; ties go to the
    smaller key string) or ``"miss"`` (config None). The config is a fresh dict."""
    nkey = normalize_key(key)
    ks = nkey.text
    dk = device_key(device)
    cache_key = (kernel, ks, dk, *_env_state())
    if cache_key not in _LOOKUPS:
        entries = load_table(dk).get("kernels", {}).get(kernel, {})
        found: tuple[dict | None, str] = (None, "miss")
        if ks in entries:
            found = (dict(entries[ks]["config"]), "exact")
        else:
            best = None
            for other, entry in entries.items():
                d = _distance(nkey, parse_key(other))
                if d is not None and (best is None or (d, other) < best[:2]):
                    best = (d, other, entry)
            if best is not None:
                found = (dict(best[2]["config"]), "nearest")
        _LOOKUPS[cache_key] = found
    config, how = _LOOKUPS[cache_key]
    return (dict(config) if config is not None else None), how


# ----------------------------------------------------------------------------------------------------------------
# what ran: records the benchmark harness reads back


_RECORDS: dict[str, dict[str, str]] = {}  # op -> {kernel: "source config"} (live dicts, see records())
_LAST: dict[str, tuple[str, dict, Key | None]] = {}  # kernel -> (source, config, key)


def _split(kernel: str) -> tuple[str, str]:
    op, _, name = kernel.partition(".")
    return op, (name or op)


def records(op: str) -> dict[str, str]:
    """The live ``{kernel: "tuned BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"}`` dict of ``op``'s last launches.
    A kernel module binds it as its ``_LAST_CONFIG`` so ``benchmarks.harness.reset_configs`` clears it."""
    return _RECORDS.setdefault(op, {})


def recorded(op: str) -> dict[str, str]:
    """A copy of ``records(op)``: what a kernel module's ``last_config()`` returns."""
    return dict(records(op))


_TEXTS: dict[tuple, str] = {}  # (source, config items) -> the record's text
_SPLITS: dict[str, tuple[dict[str, str], str]] = {}  # kernel -> (its op's records, its short name)


def record(kernel: str, source: str, config: Any, key: Mapping[str, Any] | None = None) -> None:
    """Note that ``kernel`` (``op.name``) just ran ``config`` chosen by ``source`` (``tuned``, ``tuned(nearest)``,
    ``autotuned``, ``heuristic``, ``heuristic(fallback)``, ``forced``)."""
    cfg = config if type(config) is dict else as_dict(config)
    try:
        ident = (source, *cfg.items())
        text = _TEXTS.get(ident)
        if text is None:
            text = _TEXTS[ident] = f"{source} {format_config(cfg)}".strip()
    except TypeError:  # an unhashable value
        text = f"{source} {format_config(cfg)}".strip()
    split = _SPLITS.get(kernel)
    if split is None:
        op, name = _split(kernel)
        split = _SPLITS[kernel] = (records(op), name)
    split[0][split[1]] = text
    _LAST[kernel] = (source, cfg, key if key is None or type(key) is Key else normalize_key(key))


def last(kernel: str) -> tuple[str, dict, Key | None] | None:
    """``(source, config, key)`` of ``kernel``'s last launch through ``run`` (None if none since ``reset``)."""
    got = _LAST.get(kernel)
    return None if got is None else (got[0], dict(got[1]), got[2])


def reset(op: str | None = None) -> None:
    """Forget the records of ``op`` (every op when None)."""
    for o in ([op] if op is not None else list(_RECORDS)):
        records(o).clear()
    for k in [k for k in _LAST if op is None or _split(k)[0] == op]:
        del _LAST[k]


def point_source(config_cell: str) -> str:
    """How a benchmark row's config cell (``"fwd: tuned BLOCK_M=...; bwd_dq: heuristic ..."``) was chosen:
    ``tuned``/``autotuned``/``heuristic`` when every kernel of the point agrees, ``mixed`` otherwise,
    ``""`` when the cell names no source (a peer, a CPU row)."""
    found = set()
    for part in str(config_cell).split(";"):
        words = part.split(":", 1)[-1].split()
        if words:
            src = words[0].split("(")[0]
            if src in ("tuned", "autotuned", "heuristic", "forced"):
                found.add(src)
    if not found:
        return ""
    return found.pop() if len(found) == 1 else "mixed"


# ----------------------------------------------------------------------------------------------------------------
# launching


_BROKEN: set[tuple[str, str, str]] = set()  # (device key, kernel, config) that failed here: not retried
_TUNING: list[tuple[str | None, dict | None]] = []  # benchmarks.tune's forced config (a stack)


@contextlib.contextmanager
def tuning(kernel: str | None = None, config: Any = None):
    """For ``benchmarks.tune``: inside, ``kernel`` launches ``config`` (its errors propagate, so the tuner sees
    them) and every other kernel its heuristic; no table, no autotuning. ``tuning()``: every kernel heuristic."""
    _TUNING.append((kernel, as_dict(config) if kernel is not None else None))
    try:
        yield
    finally:
        _TUNING.pop()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def guard(kernel: str, config: Mapping[str, Any], launch: Callable[[dict], Any], fallback: Callable[[], Any],
          device: Any = None) -> tuple[Any, bool]:
    """``(launch(config), True)``; when that raises (a compile error, out of shared memory or registers on this
    Triton), a ``TunedConfigWarning`` naming the config and ``(fallback(), False)``. A config that failed once is not
    tried again in this process (no second warning). Errors of ``fallback`` propagate. (``run`` does this for the
    table's configs.)"""
    dk = device_key(device) if device is not None else ""
    if (dk, kernel, format_config(config)) not in _BROKEN:
        try:
            return launch(dict(config)), True
        except Exception as e:  # any failure of a tuned config: the heuristic decides
            _warn_broken(dk, kernel, config, e)
    return fallback(), False


# (kernel, key, device key, env state) -> (config, source, the op's records, kernel name, record text)
_CHOICES: dict[tuple, tuple] = {}


def run(kernel: str, key: Mapping[str, Any] | None, heuristic: Mapping[str, Any], launch: Callable[[dict], Any], *,
        autotune: Callable[[], Any] | None = None, device: Any = None) -> Any:
    """Launch ``kernel`` (``op.name``) with the config chosen for ``key`` and record which; returns what ``launch``
    returned (None after autotuning).

    ``launch(config)`` launches the plain ``@triton.jit`` kernel with ``**config``; ``heuristic`` is the launcher's
    own config; ``autotune()`` launches the ``triton.autotune`` object and returns its ``best_config`` (None: no
    autotuning for this launch). ``key=None``: no table, no autotuning (a path the table does not describe).
    ``device``: the inputs' device, whose table is read. A table hit costs a few dict lookups per launch."""
    if _TUNING:
        forced_kernel, forced = _TUNING[-1]
        if forced_kernel == kernel and forced is not None:
            out = launch(dict(forced))
            record(kernel, "forced", forced, key)
            return out
        out = launch(heuristic)
        record(kernel, "heuristic", heuristic, key)
        return out
    if key is not None:
        key = normalize_key(key)
        dk = device_key(device)
        choice_key = (kernel, key, dk, *_env_state())
        choice = _CHOICES.get(choice_key)
        if choice is None:
            config, how = lookup(kernel, key, dk)
            source = "tuned" if how == "exact" else "tuned(nearest)"
            op, name = _split(kernel)
            text = f"{source} {format_config(config)}" if config is not None else ""
            choice = _CHOICES[choice_key] = (config, source, records(op), name, text)
        config, source, recs, name, text = choice
        if config is not None:
            if not _BROKEN or (dk, kernel, format_config(config)) not in _BROKEN:
                try:
                    out = launch(dict(config))
                except Exception as e:  # any failure of a tuned config: the heuristic decides
                    _warn_broken(dk, kernel, config, e)
                else:
                    recs[name] = text
                    _LAST[kernel] = (source, config, key)
                    return out
            out = launch(heuristic)
            record(kernel, "heuristic(fallback)", heuristic, key)
            return out
        if autotune is not None and autotune_enabled():
            record(kernel, "autotuned", autotune(), key)
            return None
    out = launch(heuristic)
    record(kernel, "heuristic", heuristic, key)
    return out


def _warn_broken(dk: str, kernel: str, config: Mapping[str, Any], e: BaseException) -> None:
    _BROKEN.add((dk, kernel, format_config(config)))
    msg = f"embedattn: tuned config {format_config(config)} of {kernel} failed here ({_first_line(e)})"
    warnings.warn(f"{msg}; using the heuristic config (once per config and process)", TunedConfigWarning,
                  stacklevel=4)  # fmt: skip


def now_utc() -> str:
    """The table's date format."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def entries(table: Mapping[str, Any]) -> Iterable[tuple[str, str, dict]]:
    """``(kernel, key string, entry)`` for every entry of a table."""
    for kernel, es in table.get("kernels", {}).items():
        for ks, e in es.items():
            yield kernel, ks, e
