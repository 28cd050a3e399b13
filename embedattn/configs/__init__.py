"""Tuned launch configs as data: one JSON table per device, read once, looked up at launch (vLLM's fused-MoE
pattern). docs/tuning.md says where tables are found, what an entry means and how ``python -m benchmarks.tune``
writes one; this module holds only what a launch needs.

A launcher hands each launch to ``run(kernel, key, heuristic, launch, autotune=..., device=...)``, one road:

1. the device's table has ``key`` (exactly, else the nearest bucket with the same other fields): ``launch`` of
   that config, source ``tuned`` (``tuned(nearest)``). A tuned config that fails here (a compile error, out of
   shared memory on this Triton) warns once per config and process (``TunedConfigWarning``) and the launch goes
   on at step 3 as ``heuristic(fallback)``: never an error;
2. a miss with ``EMBEDATTN_AUTOTUNE`` on: ``autotune()`` (the launcher's ``triton.autotune`` object), ``autotuned``;
3. ``launch(heuristic)``, ``heuristic``.

Under ``torch.compile`` the choice is made while tracing; the fallback then covers only configs already seen
failing in this process (Inductor compiles the traced launch later, out of this module's reach).

Kernels are named ``<op>.<kernel>`` (``attention.fwd``, ``embedding.bwd_sorted``, ...). A key is a flat dict built
by the kernel's ``tuning_key`` beside it (``embedattn.kernels.embedding.tuning_key``, ...) through ``key()``: the
bucket fields (``nq``, ``nk``, ``tokens``) rounded up to a power of two (at least 16), the others compared exactly.
``last(kernel)`` is what the kernel's last launch ran, for the benchmark harness. Needs neither Triton nor a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .._backend import autotune_enabled, env_flag

__all__ = [
    "BUCKET_FIELDS", "ENV_DIRS", "ENV_ENABLED", "FORMAT", "Key", "PACKAGE_DIR", "TunedConfigWarning", "as_dict",
    "bucket", "clear_cache", "device_key", "forget", "format_config", "key", "last", "load_table", "lookup",
    "normalize_key", "parse_key", "read_table", "run", "tuning",
]  # fmt: skip

FORMAT = 1
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ENV_DIRS = "EMBEDATTN_CONFIGS_DIR"
ENV_ENABLED = "EMBEDATTN_TUNED_CONFIGS"
BUCKET_FIELDS = ("nq", "nk", "tokens")  # compared by log2 distance, rounded up to a power of two

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
           "float64": "fp64", "double": "fp64"}  # fmt: skip


class TunedConfigWarning(UserWarning):
    """A table could not be read, or a tuned config failed here: the launcher ran its heuristic config instead."""


# ---------------------------------------------------------------------------------------------------- devices

_DEVICE_SPEC = re.compile(r"^(cpu|cuda|meta|mps|xpu|hip)(:\d+)?$")
_DEVICE_KEYS: dict[Any, str] = {}  # device (torch.device, str, int) -> key, the CUDA name asked once


def _normalize_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_") or "unknown"


def device_key(device: Any = None) -> str:
    """The table name of a device: its name lowercased, runs of other characters turned into ``_``.

    ``device``: a torch device (``"cuda:0"``, ``torch.device``, an index) whose CUDA name is asked once, or a
    device name (``"NVIDIA H200"`` -> ``"nvidia_h200"``; a key maps to itself). None: the current CUDA device,
    ``"cpu"`` without one. Non-CUDA devices are their type (no table ships for ``"cpu"``)."""
    try:
        return _DEVICE_KEYS[device]
    except (KeyError, TypeError):
        pass
    if isinstance(device, str) and not _DEVICE_SPEC.match(device.strip().lower()):
        return _DEVICE_KEYS.setdefault(device, _normalize_name(device))
    import torch

    if device is None and not torch.cuda.is_available():
        return "cpu"
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if dev.type != "cuda":
        key = dev.type
    else:
        try:
            key = _normalize_name(torch.cuda.get_device_name(dev.index))
        except (AssertionError, RuntimeError):  # no CUDA runtime (fake CUDA tensors while tracing): no table
            return "cuda"
    if device is not None and (dev.type != "cuda" or dev.index is not None):  # a bare "cuda" follows the current one
        _DEVICE_KEYS[device] = key
    return key


# ---------------------------------------------------------------------------------------------------- keys


def bucket(n: int) -> int:
    """A length/token count's bucket: the next power of two, at least 16 (the autotune keys' rule). By comparisons
    only, so that while torch.compile traces a dynamic length it guards on the bucket rather than reading the
    length (``embedattn.attention._kernel_impls``)."""
    b = 16
    while b < n:
        b *= 2
    return b


def _flags(v: Any) -> str:
    if isinstance(v, str):
        names = [p for p in v.split("+") if p and p != "none"]
    elif isinstance(v, Mapping):  # {name: value}: true bools by name, other true values as name + value
        names = [f"{str(n).lower()}{'' if isinstance(x, bool) or x in (0, 1) else x}" for n, x in v.items() if x]
    else:
        names = [str(p).lower() for p in v]
    return "+".join(sorted(set(names))) or "none"


def _value(name: str, v: Any) -> int | str:
    if name == "dtype":
        s = str(v).replace("torch.", "").lower()
        return _DTYPES.get(s, s)
    if name == "flags":
        f = _flags(v)
        if not re.fullmatch(r"[a-z0-9_+]+", f):
            raise ValueError(f"config key flags {v!r}: names of letters, digits and '_' only")
        return f
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v):
        v = int(v)
    if isinstance(v, int):
        return bucket(v) if name in BUCKET_FIELDS else v
    s = str(v)
    if not s or any(c in s for c in ",= "):
        raise ValueError(f"config key field {name}={v!r}: a value may not be empty or hold ',', '=' or spaces")
    return s


class Key(dict):
    """A normalized key: a read-only, hashable dict; ``text`` is its table spelling
    (``dtype=bf16,flags=causal,head_dim=128,nk=4096,nq=4096``)."""

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


def normalize_key(fields: Mapping[str, Any]) -> Key:
    """``fields`` with canonical values, sorted by name: dtypes as ``bf16``/``fp16``/``fp32``, bools as 0/1,
    ``flags`` as the sorted ``+``-joined names of the true flags (``"none"`` when none), bucket fields rounded up."""
    if isinstance(fields, Key):
        return fields
    out = {}
    for name, v in fields.items():
        name = str(name).lower()
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"config key field name {name!r}: letters, digits and '_' only")
        out[name] = _value(name, v)
    return Key(sorted(out.items()))


@functools.lru_cache(maxsize=4096)
def _key(items: tuple[tuple[str, Any], ...]) -> Key:
    return normalize_key({n: v for n, v in items if v is not None})


def key(**fields: Any) -> Key:
    """The key of a launch from its fields (a None field is left out); memoized, so a launcher may build it at
    every launch. ``flags``: a ``+``-joined string, an iterable of the true flags' names, or ``{name: value}``."""
    try:
        return _key(tuple(fields.items()))
    except TypeError:  # an unhashable value (a flags dict): normalized without the memo
        return normalize_key({n: v for n, v in fields.items() if v is not None})


def parse_key(text: str) -> Key:
    """The key ``text`` spells (ValueError when malformed)."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, sep, v = part.partition("=")
        if not sep or not name:
            raise ValueError(f"malformed config key {text!r}")
        out[name] = v
    return normalize_key(out)


# ---------------------------------------------------------------------------------------------------- configs


def as_dict(config: Any) -> dict[str, Any]:
    """A launch config as a plain dict: a ``triton.Config`` becomes its kwargs plus num_warps/num_stages
    (num_ctas and maxnreg only when set); a mapping is copied; None is ``{}``."""
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
    """``BLOCK_M=128 BLOCK_N=64 warps=8 stages=3``."""
    c = as_dict(config)
    short = {"num_warps": "warps", "num_stages": "stages", "num_ctas": "ctas"}
    return " ".join([f"{k}={v}" for k, v in c.items() if k not in short] +
                    [f"{short[k]}={c[k]}" for k in short if k in c])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- tables


def _warn(msg: str) -> None:
    warnings.warn(f"embedattn: {msg}", TunedConfigWarning, stacklevel=3)


def _entry_ok(ks: str, entry: Any) -> bool:
    cfg = entry.get("config") if isinstance(entry, Mapping) else None
    if not isinstance(cfg, Mapping) or not cfg:
        return False
    if not all(isinstance(k, str) and isinstance(v, (int, float, str)) and not isinstance(v, bool)
               for k, v in cfg.items()):  # fmt: skip
        return False
    try:
        parse_key(ks)
    except ValueError:
        return False
    return True


def read_table(path: str) -> dict:
    """The table file at ``path`` with every malformed entry dropped (a ``TunedConfigWarning`` says how many);
    a missing file is an empty table, an unreadable one or another format warns and reads as empty. Never
    raises for bad content. Entry keys are respelled canonically."""
    empty = {"format": FORMAT, "kernels": {}}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return empty
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _warn(f"config table {path} cannot be read ({e}); ignoring it")
        return empty
    if not isinstance(data, dict) or not isinstance(data.get("kernels", {}), dict):
        _warn(f"config table {path} is not a table (no 'kernels' object); ignoring it")
        return empty
    if data.get("format", FORMAT) != FORMAT:
        _warn(f"config table {path} has format {data.get('format')!r}, this embedattn reads {FORMAT}; ignoring it")
        return empty
    kernels: dict[str, dict] = {}
    bad = 0
    for kernel, entries in data.get("kernels", {}).items():
        if not isinstance(entries, dict):
            bad += 1
            continue
        for ks, entry in entries.items():
            if _entry_ok(ks, entry):
                kernels.setdefault(kernel, {})[parse_key(ks).text] = dict(entry)
            else:
                bad += 1
    if bad:
        _warn(f"config table {path}: {bad} malformed entr{'y' if bad == 1 else 'ies'} ignored")
    return {**data, "format": FORMAT, "kernels": kernels}


_ENV: list[tuple] = []  # (EMBEDATTN_CONFIGS_DIR, tables enabled, package folder), read once per process
_TABLES: dict[str, dict] = {}  # device key -> merged table
_CHOICES: dict[tuple, tuple] = {}  # (kernel, key, device key) -> (config or None, source)
_BROKEN: set[tuple[str, str, str]] = set()  # (device key, kernel, config) that failed here: not tried again
_LAST: dict[str, tuple[str, dict, Key | None]] = {}  # kernel -> (source, config, key) of its last launch


def _env() -> tuple:
    """The environment the tables depend on, read once (environment reads would cost every launch)."""
    if not _ENV:
        _ENV.append((os.environ.get(ENV_DIRS) or "", env_flag(ENV_ENABLED, True), PACKAGE_DIR))
    return _ENV[0]


def load_table(device: Any = None) -> dict:
    """The merged table of ``device`` (a name, key or torch device), read once per process: the package's file,
    then each ``EMBEDATTN_CONFIGS_DIR`` folder's over it key by key (the first folder wins); ``sources`` lists the
    files read. Empty when ``EMBEDATTN_TUNED_CONFIGS=0``. ``clear_cache()`` reads again."""
    dk = device_key(device)
    if dk not in _TABLES:
        dirs, enabled, package = _env()
        table: dict = {"format": FORMAT, "device_key": dk, "kernels": {}, "sources": []}
        folders = [package, *reversed([d for d in dirs.split(os.pathsep) if d.strip()])] if enabled else []
        for folder in folders:
            path = os.path.join(folder, f"{dk}.json")
            if os.path.isfile(path):
                data = read_table(path)
                for kernel, entries in data.pop("kernels").items():
                    table["kernels"].setdefault(kernel, {}).update(entries)
                table.update({k: v for k, v in data.items() if k not in ("format", "sources")})
                table["sources"].append(path)
        _TABLES[dk] = table
    return _TABLES[dk]


def clear_cache() -> None:
    """Forget the tables, the choices made from them and the failed configs; the environment is read again."""
    for cache in (_ENV, _TABLES, _CHOICES, _BROKEN):
        cache.clear()


def _distance(a: Mapping, b: Mapping) -> float | None:
    """log2 distance over the bucket fields; None when another field differs or the field sets differ."""
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
    (the entry with the same non-bucket fields whose buckets are nearest in log2 distance; ties go to the smaller
    key string) or ``"miss"`` (config None). The config is a fresh dict."""
    k = normalize_key(key)
    entries = load_table(device)["kernels"].get(kernel, {})
    if k.text in entries:
        return dict(entries[k.text]["config"]), "exact"
    near = [(d, ks) for ks in entries if (d := _distance(k, parse_key(ks))) is not None]
    if not near:
        return None, "miss"
    return dict(entries[min(near)[1]]["config"]), "nearest"


# ---------------------------------------------------------------------------------------------------- launching

_FORCED: list[tuple[str | None, dict | None]] = []  # benchmarks.tune's forced config (a stack)


@contextlib.contextmanager
def tuning(kernel: str | None = None, config: Any = None) -> Iterator[None]:
    """For ``benchmarks.tune``: inside, ``kernel`` launches ``config`` (its errors propagate, so the tuner sees
    them) and every other kernel its heuristic; no table, no autotuning. ``tuning()``: every kernel heuristic."""
    _FORCED.append((kernel, as_dict(config) if kernel is not None else None))
    try:
        yield
    finally:
        _FORCED.pop()


def _choice(kernel: str, k: Key, dk: str) -> tuple[dict | None, str]:
    ident = (kernel, k, dk)
    got = _CHOICES.get(ident)
    if got is None:
        config, how = lookup(kernel, k, dk)
        if config is not None and (dk, kernel, format_config(config)) in _BROKEN:
            got = (None, "heuristic(fallback)")
        else:
            got = (config, "tuned" if how == "exact" else "tuned(nearest)" if config is not None else "")
        _CHOICES[ident] = got
    return got


def run(kernel: str, key: Mapping[str, Any] | None, heuristic: dict, launch: Callable[[dict], Any], *,
        autotune: Callable[[], Any] | None = None, device: Any = None) -> Any:
    """Launch ``kernel`` with the config chosen for ``key`` (the module docstring's three steps); returns what
    ``launch`` returned (None after autotuning).

    ``launch(config)`` launches the plain ``@triton.jit`` kernel with ``**config`` (it must not change the dict);
    ``heuristic`` is the launcher's own config; ``autotune()`` launches the ``triton.autotune`` object and returns
    its ``best_config``. ``key=None``: no table, no autotuning (a path no table describes). ``device``: the
    inputs' device, whose table is read. A table hit costs a few dict lookups."""
    if _FORCED:
        forced_kernel, forced = _FORCED[-1]
        source, config = ("forced", forced) if forced_kernel == kernel else ("heuristic", heuristic)
        out = launch(dict(config))
        _LAST[kernel] = (source, config, None if key is None else normalize_key(key))
        return out
    source = "heuristic"
    if key is not None:
        key = normalize_key(key)
        dk = device_key(device)
        config, source = _choice(kernel, key, dk)
        if config is not None:
            try:
                out = launch(config)
            except Exception as e:  # any failure of a tuned config: the heuristic decides, with one warning
                _BROKEN.add((dk, kernel, format_config(config)))
                _CHOICES[(kernel, key, dk)] = (None, "heuristic(fallback)")
                _warn(f"tuned config {format_config(config)} of {kernel} failed here ({_first_line(e)}); using the "
                      "heuristic config (once per config and process)")
                source = "heuristic(fallback)"
            else:
                _LAST[kernel] = (source, config, key)
                return out
        elif not source and autotune is not None and autotune_enabled():
            _LAST[kernel] = ("autotuned", as_dict(autotune()), key)
            return None
    out = launch(heuristic)
    _LAST[kernel] = (source or "heuristic", heuristic, key)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def last(kernel: str | None = None) -> Any:
    """``(source, config, key)`` of ``kernel``'s last launch through ``run`` (None if none since ``forget``);
    with no ``kernel``, ``{kernel: (source, config, key)}`` of every kernel, in first-launch order. ``source``:
    ``tuned``, ``tuned(nearest)``, ``autotuned``, ``heuristic``, ``heuristic(fallback)`` or ``forced``."""
    if kernel is None:
        return dict(_LAST)
    return _LAST.get(kernel)


def forget(op: str | None = None) -> None:
    """Forget the last launches of ``op``'s kernels (``"attention"``: ``attention.*``; None: every kernel)."""
    for k in [k for k in _LAST if op is None or k.partition(".")[0] == op]:
        del _LAST[k]


# ---------------------------------------------------------------------------------------------------- transitional
# kernels/attention.py's last_config() reads recorded() and binds records() as its _LAST_CONFIG (which nothing
# reads); both go when it reads last() as the benchmark harness does (issue 22, item 4).


def recorded(op: str) -> dict[str, str]:
    """``{kernel name: "source config"}`` of ``op``'s last launches."""
    p = f"{op}."
    return {k[len(p):]: f"{s} {format_config(c)}".strip() for k, (s, c, _) in _LAST.items() if k.startswith(p)}


records = recorded
