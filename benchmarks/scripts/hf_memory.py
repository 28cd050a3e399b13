"""Peak memory and time of one forward + backward of a small transformers model: embedattn vs sdpa vs eager.

    python benchmarks/scripts/hf_memory.py --out reports/<gpu>/hf_memory.csv --max-seconds 240   # GPU, bf16
    python benchmarks/scripts/hf_memory.py --out /tmp/hf_memory.csv                              # CPU, fp32
    python benchmarks/scripts/hf_memory.py --dry-run                                             # tiny, minutes

One training step's forward and backward (``model(input_ids, labels=...).loss.backward()``) of a 2-layer Llama
(hidden 512, 8 query heads on 2 kv heads of 64, vocab 1024; the sliding scenario: the same shapes as a Mistral with
a 1024-token window) at 4k, 16k and 32k tokens per batch, with ``attn_implementation`` "embedattn"
(``embedattn.integrations.transformers.register()``, default backend), "sdpa" and "eager". Scenarios:

* ``causal``: one unpadded row (sdpa needs no mask; eager builds a float one);
* ``padded``: two rows of N/2 tokens, the second left-padded by a quarter (a padding mask);
* ``packed``: one row packing four sequences (position_ids restart, as DataCollatorWithFlattening makes it);
* ``sliding``: one unpadded row through a sliding-window model.

Rows (long-format CSV, benchmarks.harness.COLUMNS; suite "hf", kernel "<scenario>", mode "fwd+bwd"): ``ms``;
``peak_mem`` (MiB above what was allocated before the step: CUDA's allocator peak, or on the CPU the process's
peak resident set above its size before the step, read from /proc/self/status after resetting it through
/proc/self/clear_refs, glibc made to return freed blocks; after one warm-up step); ``mask_bytes``: the bytes of
the masks transformers' mask builder for that implementation
returns for one forward (built exactly as the model builds them, once per mask type), measured on every point,
also where the step itself does not fit. A step that runs out of memory is a note, not a row. On the CPU a step
runs only up to ``--cpu-max-step-tokens`` (4096) and where its N x N score matrices (eager's; embedattn's
reference road on the CPU computes its scores by chunks of query rows) fit ``--cpu-budget-gib``; the mask rows are
there for every point.
"""

from __future__ import annotations

import os
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # a fixed threshold: glibc then maps every large block and unmaps it when freed (its default threshold grows
    # with the blocks freed, after which they stay in the heap), so the CPU's resident set follows live memory
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    os.execv(sys.executable, [sys.executable, *sys.argv])

if "--dry-run" in sys.argv:  # before anything imports triton: the interpreter runs the kernels on the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a plain script

from benchmarks.harness import Context, Recorder, peak_memory_mib, run_points, time_fn, versions  # noqa: E402

SCENARIOS = ("causal", "padded", "packed", "sliding")
PROVIDERS = ("embedattn", "sdpa", "eager")
PROFILES = {
    # tokens per batch, model shapes (hidden, intermediate, layers, heads, kv heads, head dim, vocab), window
    "full": ((4096, 16384, 32768), (512, 1024, 2, 8, 2, 64, 1024), 1024),
    "tiny": ((64, 128), (32, 48, 2, 2, 1, 16, 64), 16),
}


def build_model(scenario: str, profile: str, dtype, device):
    import transformers

    _, (hidden, inter, layers, heads, kv, hd, vocab), window = PROFILES[profile]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, max_position_embeddings=65536)
    cfg = (transformers.MistralConfig(**kw, sliding_window=window) if scenario == "sliding"
           else transformers.LlamaConfig(**kw))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device, dtype)


def make_batch(scenario: str, tokens: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    if scenario == "padded":
        n = tokens // 2
        ids = torch.randint(1, vocab, (2, n), generator=g)
        am = torch.ones(2, n, dtype=torch.long)
        am[1, : n // 4] = 0
        batch = dict(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100))
    else:
        ids = torch.randint(1, vocab, (1, tokens), generator=g)
        batch = dict(input_ids=ids, labels=ids)
        if scenario == "packed":
            batch["position_ids"] = torch.arange(tokens).remainder(tokens // 4)[None]
    return {k: v.to(device) for k, v in batch.items()} | {"use_cache": False}


def mask_bytes(model, impl: str, batch: dict) -> int:
    """Bytes of the masks transformers builds for ``impl`` in one forward of ``batch`` (created as the model
    creates them: one per mask type), without running the model."""
    from transformers.masking_utils import create_masks_for_generate

    from embedattn.integrations.transformers import KernelMask

    model.config._attn_implementation = impl  # what set_attn_implementation records (masks only read this)
    ids = batch["input_ids"]
    masks = create_masks_for_generate(config=model.config, inputs_embeds=torch.empty(*ids.shape, 0, device=ids.device,
                                                                                      dtype=model.dtype),
                                      attention_mask=batch.get("attention_mask"), cache=None,
                                      position_ids=batch.get("position_ids", torch.arange(ids.shape[1])[None]))
    total = 0
    for m in (masks.values() if isinstance(masks, dict) else [masks]):
        if isinstance(m, torch.Tensor):
            total += m.numel() * m.element_size()
        elif isinstance(m, KernelMask):
            for t in (m.key_mask, None if m.varlen is None else m.varlen[0]):
                total += 0 if t is None else t.numel() * t.element_size()
    del masks
    return total


def scores_bytes(scenario: str, tokens: int, profile: str) -> int:
    """The N x N float32 score matrices a step keeps when attention is computed in full (eager): scores,
    probabilities and their gradient, per layer and head."""
    _, (_, _, layers, heads, _, _, _), _ = PROFILES[profile]
    rows, n = (2, tokens // 2) if scenario == "padded" else (1, tokens)
    return 3 * layers * heads * rows * n * n * 4


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib(ctx: Context, fn) -> float:
    """Peak memory of one call of ``fn`` above what was in use before it (MiB): CUDA's allocator, or the CPU
    process's resident set (its high-water mark reset first)."""
    gc.collect()
    if ctx.is_cuda:
        return peak_memory_mib(ctx, fn)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def run_point(ctx, rec, model, scenario, tokens, provider, impl, profile, args) -> None:
    base = dict(suite="hf", kernel=scenario, provider=provider, mode="fwd+bwd", dtype=str(model.dtype)[6:],
                shape=f"{model.config.model_type} L{model.config.num_hidden_layers} "
                      f"H{model.config.num_attention_heads}/{model.config.num_key_value_heads} "
                      f"D{model.config.head_dim}", x_name="tokens", x_value=tokens,
                config=f"backend={args.backend or 'auto'}" if provider == "embedattn" else "")
    batch = make_batch(scenario, tokens, model.config.vocab_size, ctx.device)
    mb = mask_bytes(model, impl, batch)
    rec.add([rec.row(**base, metric="mask_bytes", unit="bytes", p50=float(mb), p20=float(mb), p80=float(mb))])
    line = f"{scenario:8s} {tokens:6d} {provider:10s} mask {_human(mb):>10s}"
    need = scores_bytes(scenario, tokens, profile) if provider == "eager" else 0
    if not ctx.is_cuda and tokens > args.cpu_max_step_tokens:
        print(line, flush=True)
        return
    if not ctx.is_cuda and need + mb > args.cpu_budget_gib * 2**30:
        ctx.note(f"  {scenario} {tokens} {provider}: step not run on the CPU (its N x N scores and mask need "
                 f"~{(need + mb) / 2**30:.1f} GiB > --cpu-budget-gib {args.cpu_budget_gib})")
        print(line, flush=True)
        return
    model.set_attn_implementation(impl)

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    try:
        step()  # first-call work (lazy buffers, Triton's launch caches) out of the peak
        peak = peak_mib(ctx, step)
        t = time_fn(ctx, step)
    except torch.OutOfMemoryError:
        ctx.note(f"  {scenario} {tokens} {provider}: out of memory")
        print(line + "  out of memory", flush=True)
        return
    finally:
        model.zero_grad(set_to_none=True)
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    rec.add([rec.row(**base, metric="ms", unit="ms", p50=t.p50, p20=t.p20, p80=t.p80),
             rec.row(**base, metric="peak_mem", unit="MiB", p50=peak, p20=peak, p80=peak)])
    print(f"{line}  step {t.p50:9.1f} ms  peak {peak:9.1f} MiB", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="CSV path (default: print only)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 CPU")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default: the profile's)")
    ap.add_argument("--backend", default=None, help="embedattn's backend (default: its own choice)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop starting points after this many seconds")
    ap.add_argument("--cpu-budget-gib", type=float, default=6.0,
                    help="CPU: run a step only where its N x N scores and masks fit this many GiB")
    ap.add_argument("--cpu-max-step-tokens", type=int, default=4096,
                    help="CPU: time steps only up to this many tokens (2 cores: a 32k step takes minutes)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, embedattn on the Triton kernels "
                                                           "through the interpreter")
    args = ap.parse_args(argv)
    t_start = time.time()
    import embedattn.integrations.transformers as ea_hf

    profile = "tiny" if args.dry_run else "full"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    backend = args.backend or ("triton" if args.dry_run else None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    ctx = Context(device=device, profile=profile,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if device.type != "cuda":
        ctx.warmup_ms, ctx.rep_ms = 0.0, 1.0  # one untimed step, then three timed ones
    rec = Recorder(ctx, args.out)
    impls = {"embedattn": ea_hf.register("embedattn", backend=backend), "sdpa": "sdpa", "eager": "eager"}
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(PROFILES[profile][0])
    scenarios, providers = args.scenarios.split(","), args.providers.split(",")
    print(f"{ctx.device_name} torch {versions()['torch']} triton {versions()['triton']} {dtype}; "
          f"{len(scenarios)} scenarios x {len(tokens)} sizes x {len(providers)} providers", flush=True)
    todo = [(s, n, p) for n in tokens for s in scenarios for p in providers]
    models = {}

    def point(scenario, n, provider):
        kind = "sliding" if scenario == "sliding" else "llama"
        if kind not in models:
            models[kind] = build_model(scenario, profile, dtype, device)
        run_point(ctx, rec, models[kind], scenario, n, provider, impls[provider], profile, args)

    run_points(ctx, "hf_memory", todo, point, args.max_seconds, t_start)


if __name__ == "__main__":
    main()
