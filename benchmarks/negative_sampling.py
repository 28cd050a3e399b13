"""Negative-sampling sweep: the SGNS loss, the fused training step and word2vec end to end.

- ``sgns_loss``: embedattn.negative_sampling_loss vs a plain PyTorch SGNS (gathers a B x K x D tensor
  of negatives, as eager code does); fwd and fwd+bwd, in pairs/s (one pair = one (center, context)
  with its K negatives).
- ``sgns_step``: embedattn's fused forward + gradient + SGD update vs the same step in plain PyTorch
  (analytic gradient, ``index_add_`` into both tables), in pairs/s.
- ``word2vec``: embedattn.word2vec.Word2Vec vs gensim (CPU, Cython) on head500 from the gensim wheel, in
  one run: embedattn's kernel trainer on the run's device (and with shared negatives), on a CUDA run
  also its CPU path and the minibatch trainer (one ``sgns_step`` launch per 256 pairs); skip-gram and
  CBOW, negative sampling and hierarchical softmax (``word2vec_hs``, ``word2vec_cbow_hs``: hs=1,
  negative=0, against gensim's hs=1 in the same run). Words/s (corpus words x epochs / wall time of the
  constructor, vocabulary included; and of the training alone, ``train_words_per_s``) and the WordSim-353
  Spearman correlation, computed here the same way for all. ``word2vec_large`` (CUDA): the GPU trainer's
  speed on head500 repeated to >= 100M words (on the device, one epoch; variants: shared negatives,
  plain-store write-back, warps).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .harness import (
    DTYPES,
    Case,
    Context,
    Recorder,
    Timing,
    Workload,
    chosen_config,
    measurement_rows,
    probe,
    run_speed_benchmark,
    try_measure,
)

SUITE = "negative_sampling"
NEGATIVES = 5
LR = 0.025


def available(ctx: Context) -> str | None:
    """None when embedattn.negative_sampling_loss runs on this device, else why the suite is skipped."""
    import embedattn

    w = torch.randn(10, 8, device=ctx.device)
    c = torch.tensor([1, 2], device=ctx.device)
    return probe("embedattn.negative_sampling_loss", lambda: embedattn.negative_sampling_loss(c, c, c[:, None], w, w))


# ----------------------------------------------------------------------------- plain PyTorch peers


def torch_sgns_loss(center, context, negatives, in_weight, out_weight):
    """Eager SGNS loss (mean over pairs): -log s(u_ctx . v) - sum_k log s(-u_neg_k . v)."""
    v = F.embedding(center, in_weight)  # (B, D)
    u = F.embedding(context, out_weight)  # (B, D)
    n = F.embedding(negatives, out_weight)  # (B, K, D): the tensor the fused kernel never writes
    pos = F.logsigmoid((u * v).sum(-1))
    neg = F.logsigmoid(-torch.bmm(n, v.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return -(pos + neg).mean()


@torch.no_grad()
def torch_sgns_step(center, context, negatives, in_weight, out_weight, lr=LR):
    """One word2vec.c SGD step in plain PyTorch: analytic gradients, ``index_add_`` into the tables."""
    ids = torch.cat([context.unsqueeze(1), negatives], 1)  # (B, 1+K)
    v = in_weight[center]  # (B, D)
    u = out_weight[ids]  # (B, 1+K, D)
    label = torch.zeros(ids.shape, device=ids.device, dtype=v.dtype)
    label[:, 0] = 1
    g = (label - torch.sigmoid(torch.bmm(u, v.unsqueeze(-1)).squeeze(-1))) * lr  # (B, 1+K)
    grad_v = torch.bmm(g.unsqueeze(1), u).squeeze(1)
    out_weight.index_add_(0, ids.flatten(), (g.unsqueeze(-1) * v.unsqueeze(1)).flatten(0, 1))
    in_weight.index_add_(0, center, grad_v)


def fused_step(ctx: Context) -> Callable | None:
    """embedattn's training step, called ``(center, context, negatives, in_weight, out_weight, lr)``:
    the fused Triton ``sgns_step`` on CUDA; on CPU, where Triton kernels are not timed, the word2vec
    trainer's batched PyTorch step. None (with a note) when it cannot be imported."""
    try:
        if ctx.is_cuda:
            from embedattn.kernels.negative_sampling import sgns_step

            return sgns_step
        from embedattn.word2vec._train import torch_sgns_step

        ctx.note("  sgns_step: CPU run times the word2vec trainer's batched PyTorch step as 'embedattn'")
        return torch_sgns_step
    except Exception as e:
        ctx.note(f"  sgns_step unavailable: {type(e).__name__}: {e}")
        return None


# ----------------------------------------------------------------------------- loss and step sweep


@dataclass
class Spec:
    dtype: str
    vocab: int
    dim: int
    pairs: int
    negatives: int = NEGATIVES
    kernel: str = field(default="", init=False)

    @property
    def shape(self) -> str:
        return f"V={self.vocab} D={self.dim} B={self.pairs} K={self.negatives}"


def specs(ctx: Context) -> list[Spec]:
    if ctx.profile == "tiny":
        vocab, dims, pairs = 100, [16], [64, 256]
    elif ctx.is_cuda:
        vocab, dims = 100_000, [128, 300]
        pairs = [4096, 65536, 524288] if ctx.profile == "quick" else [4096, 16384, 65536, 262144, 1048576]
    else:
        vocab, dims = 30_000, [100, 300]
        pairs = [1024, 8192] if ctx.profile == "quick" else [1024, 4096, 16384, 65536]
    dtypes = ctx.pick_dtypes(["fp32"])
    return [Spec(dt, vocab, d, b) for dt in dtypes for d in dims for b in pairs]


def _inputs(ctx: Context, s: Spec):
    g = torch.Generator(device=ctx.device).manual_seed(s.pairs + s.dim)
    dtype = DTYPES[s.dtype]
    sets = []
    for _ in range(ctx.n_sets):
        c = torch.randint(0, s.vocab, (s.pairs,), device=ctx.device, generator=g)
        x = torch.randint(0, s.vocab, (s.pairs,), device=ctx.device, generator=g)
        n = torch.randint(0, s.vocab, (s.pairs, s.negatives), device=ctx.device, generator=g)
        sets.append((c, x, n))
    w_in = ((torch.rand(s.vocab, s.dim, device=ctx.device, generator=g) - 0.5) / s.dim).to(dtype)
    w_out = (torch.randn(s.vocab, s.dim, device=ctx.device, generator=g) * 0.1).to(dtype)
    return sets, w_in, w_out


def workload(ctx: Context, s: Spec) -> Workload:
    """embedattn's loss at ``s`` on the suite's inputs (what ``benchmarks.tune`` times; its backward is the loss's)."""
    import embedattn

    sets, w_in, w_out = _inputs(ctx, s)
    return Workload(embedattn.negative_sampling_loss, sets, params=(w_in, w_out))


def _rows(ctx, rec, kernel, name, mode, s, t, peak, config):
    base = dict(suite=SUITE, kernel=f"{kernel}_d{s.dim}", provider=name, mode=mode, dtype=s.dtype,
                shape=s.shape, x_name="pairs", x_value=s.pairs, config=config)  # fmt: skip
    return measurement_rows(rec, base, t, float(s.pairs), "pairs_per_s", peak_mib=peak)


def measure_loss(ctx, rec, name, loss_fn, s, inputs, mode) -> list[dict]:
    sets, w_in, w_out = inputs  # the loss is a scalar: its backward needs no upstream gradient
    t, peak = run_speed_benchmark(ctx, loss_fn, sets, mode, params=(w_in, w_out),
                                  op="negative_sampling" if name == "embedattn" else None)
    cfg = chosen_config("negative_sampling") if (name == "embedattn" and ctx.is_cuda) else (
        "backend=reference" if name == "embedattn" else "")  # fmt: skip
    return _rows(ctx, rec, "sgns_loss", name, mode, s, t, peak, cfg)


def measure_step(ctx, rec, name, step_fn, s, inputs) -> list[dict]:
    sets, w_in, w_out = inputs
    tables = (w_in.clone(), w_out.clone())  # updated in place; the tables start equal for every provider
    t, peak = run_speed_benchmark(ctx, lambda c, x, n, a, b: step_fn(c, x, n, a, b, LR), sets, "step",
                                  params=tables, op="negative_sampling" if name == "embedattn" else None)
    cfg = chosen_config("negative_sampling") if name == "embedattn" else ""
    return _rows(ctx, rec, "sgns_step", name, "step", s, t, peak, cfg)


def run_spec(ctx: Context, rec: Recorder, s: Spec, step: Callable | None) -> list[dict]:
    import embedattn

    inputs = _inputs(ctx, s)
    rows: list[dict] = []
    losses = {"embedattn": embedattn.negative_sampling_loss, "torch-eager": torch_sgns_loss}
    for name, fn in losses.items():
        for mode in ("fwd", "fwd+bwd"):
            rows += try_measure(
                ctx, f"sgns_loss {name} {mode}", ("loss", name, mode),
                lambda name=name, fn=fn, mode=mode: measure_loss(ctx, rec, name, fn, s, inputs, mode),
            )  # fmt: skip
    steps = {"embedattn": step, "torch-eager": torch_sgns_step}
    for name, fn in steps.items():
        if fn is not None:
            rows += try_measure(ctx, f"sgns_step {name}", ("step", name),
                                lambda name=name, fn=fn: measure_step(ctx, rec, name, fn, s, inputs))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- word2vec end to end


def gensim_data(name: str) -> str | None:
    """A file of gensim's test data (``name`` or ``name.bz2``): first in ``$EMBEDATTN_BENCH_DATA`` (for
    machines without gensim), then in the installed gensim wheel. None when neither has it."""
    dirs = [os.environ["EMBEDATTN_BENCH_DATA"]] if os.environ.get("EMBEDATTN_BENCH_DATA") else []
    try:
        from gensim.test.utils import datapath

        dirs.append(os.path.dirname(datapath(name)))
    except Exception:
        pass
    for d in dirs:
        for candidate in (name, name + ".bz2"):
            if os.path.exists(os.path.join(d, candidate)):
                return os.path.join(d, candidate)
    return None


def _open_text(path: str):
    import bz2

    return bz2.open(path, "rt", encoding="utf8") if path.endswith(".bz2") else open(path, encoding="utf8")


def ws353_spearman(lookup: Callable[[str], object], path: str) -> tuple[float, int]:
    """Spearman correlation of cosine similarities with WordSim-353 over the pairs whose both words
    ``lookup`` knows (lowercased, as gensim's evaluate_word_pairs does). Returns (rho, pairs used)."""
    import numpy as np

    gold, ours = [], []
    with _open_text(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            a, b, score = line.strip().split("\t")[:3]
            try:
                va, vb = lookup(a.lower()), lookup(b.lower())
            except KeyError:
                continue
            va = np.asarray(va.detach().cpu() if isinstance(va, torch.Tensor) else va, dtype=np.float64)
            vb = np.asarray(vb.detach().cpu() if isinstance(vb, torch.Tensor) else vb, dtype=np.float64)
            ours.append(float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12)))
            gold.append(float(score))
    if len(gold) < 3:
        return float("nan"), len(gold)
    return float(np.corrcoef(_ranks(gold), _ranks(ours))[0, 1]), len(gold)


def _ranks(x):
    """Ranks with ties averaged (Spearman = Pearson of ranks), without needing scipy."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # average the ranks of tied values
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


@dataclass
class W2VSettings:
    epochs: int
    vector_size: int = 100
    window: int = 5
    negative: int = 5
    min_count: int = 3
    workers: int = 2
    sg: int = 1
    hs: int = 0  # hierarchical softmax (with negative=0: alone)

    def shape(self, words: int, corpus: str = "head500") -> str:
        return (f"corpus={corpus} words={words} sg={self.sg} hs={self.hs} D={self.vector_size} window={self.window} "
                f"negative={self.negative} min_count={self.min_count} workers={self.workers}")  # fmt: skip


# embedattn providers: name -> (device: "run" for the run's device, or "cpu"; Word2Vec options)
_EMBEDATTN_CUDA = {"embedattn": ("run", {}), "embedattn-shared-negatives": ("run", {"shared_negatives": True}),
                   "embedattn-minibatch": ("run", {"trainer": "minibatch"}), "embedattn-cpu": ("cpu", {})}
_EMBEDATTN_CPU = {"embedattn": ("run", {}), "embedattn-shared-negatives": ("run", {"shared_negatives": True})}


def _options(opts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "trainer=kernel"


def _train_embedattn(ctx: Context, corpus: str, cfg: W2VSettings, device: str, opts: dict):
    from embedattn.word2vec import Word2Vec

    extra = dict(opts)
    if device == "cpu":
        extra["workers"] = cfg.workers  # the same CPU threads gensim gets
        if opts.get("trainer") == "minibatch":
            extra["compile"] = True  # its CPU fast path; the one-off compile counts in the wall time only
    return Word2Vec(corpus_file=corpus, sg=cfg.sg, hs=cfg.hs, vector_size=cfg.vector_size, window=cfg.window,
                    negative=cfg.negative, min_count=cfg.min_count, epochs=cfg.epochs, seed=0, device=device,
                    **extra)  # fmt: skip


def _train_gensim(ctx: Context, corpus: str, cfg: W2VSettings):
    from gensim.models import Word2Vec
    from gensim.models.word2vec import LineSentence

    return Word2Vec(LineSentence(corpus), sg=cfg.sg, hs=cfg.hs, vector_size=cfg.vector_size, window=cfg.window,
                    negative=cfg.negative, min_count=cfg.min_count, epochs=cfg.epochs, seed=0,
                    workers=cfg.workers)  # fmt: skip


def run_word2vec(ctx: Context, rec: Recorder, cfg: W2VSettings) -> list[dict]:
    corpus, ws = gensim_data("head500.noblanks.cor"), gensim_data("wordsim353.tsv")
    if corpus is None or ws is None:
        ctx.note("  word2vec: gensim's test data (head500.noblanks.cor, wordsim353.tsv) not found: skipped "
                 "(install gensim, or point EMBEDATTN_BENCH_DATA at a folder holding them)")  # fmt: skip
        return []
    with _open_text(corpus) as f:
        words = sum(len(line.split()) for line in f)
    providers = _EMBEDATTN_CUDA if ctx.is_cuda else _EMBEDATTN_CPU
    if not cfg.sg or cfg.hs:  # options of skip-gram with negative sampling only
        providers = {k: v for k, v in providers.items() if "shared" not in k and "minibatch" not in k}
    trainers: dict[str, tuple[str, str, Callable]] = {}
    for name, (where, opts) in providers.items():
        device = str(ctx.device) if where == "run" else "cpu"
        trainers[name] = (device, _options(opts),
                          lambda device=device, opts=opts: _train_embedattn(ctx, corpus, cfg, device, opts))
    trainers["gensim"] = ("cpu", "", lambda: _train_gensim(ctx, corpus, cfg))
    kernel = ("word2vec" if cfg.sg else "word2vec_cbow") + ("_hs" if cfg.hs else "")

    def one(name: str, device: str, config: str, train: Callable) -> list[dict]:
        torch.manual_seed(0)
        if ctx.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = train()
        if ctx.is_cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        rho, used = ws353_spearman(lambda w: model.wv[w], ws)
        base = dict(suite=SUITE, kernel=kernel, provider=name, mode="train", dtype="fp32",
                    shape=cfg.shape(words) + f" device={device}", x_name="epochs", x_value=cfg.epochs,
                    config=config)  # fmt: skip
        rows = measurement_rows(rec, base, Timing(ms, ms, ms), float(words * cfg.epochs), "words_per_s")
        rows.append(rec.row(**base, metric="ws353_spearman", unit="rho", p50=rho, p20=rho, p80=rho))
        # training alone (no vocabulary pass, no compile): gensim's total_train_time, our train_seconds
        train_s = getattr(model, "total_train_time", None) or getattr(model, "train_seconds", None)
        tw = words * cfg.epochs / train_s if train_s else float("nan")
        if train_s:
            rows.append(rec.row(**base, metric="train_words_per_s", unit="words/s", p50=tw, p20=tw, p80=tw))
        ctx.log(f"  {kernel} {name} ({device}): {words * cfg.epochs / ms * 1e3:,.0f} words/s "
                f"(training {tw:,.0f}), ws353 rho {rho:.3f} ({used} pairs)")  # fmt: skip
        return rows

    rows: list[dict] = []
    for name, (device, config, train) in trainers.items():
        rows += try_measure(ctx, f"{kernel} {name}", ("w2v", name, cfg.sg, cfg.hs),
                            lambda name=name, device=device, config=config, train=train: one(name, device, config,
                                                                                               train))  # fmt: skip
    return rows


def repeat_corpus(model, times: int) -> None:
    """Make the corpus ``model.build_vocab`` kept (ids on the model's device) ``times`` copies of itself,
    on the device (sentence ids shifted per copy), for speed runs on a large corpus without reading one."""
    ids, sent = model._ids, model._sent
    n_sent = int(sent[-1]) + 1
    shift = torch.arange(times, device=ids.device)[:, None] * n_sent
    model._ids = ids.repeat(times)
    model._sent = (sent[None, :] + shift).reshape(-1)
    model.corpus_count, model.corpus_total_words = n_sent * times, model._ids.numel()


# GPU speed variants: name -> (Word2Vec options, model attributes)
_LARGE = {"embedattn": ({}, {}), "embedattn-shared-negatives": ({"shared_negatives": True}, {}),
          "embedattn-store": ({}, {"_write_back": "store"})}
_LARGE_FULL = {f"embedattn-warps{w}": ({}, {"_num_warps": w}) for w in (2, 8)}


def run_word2vec_large(ctx: Context, rec: Recorder, cfg: W2VSettings, min_words: int) -> list[dict]:
    """The GPU trainer's words/s on head500 repeated to at least ``min_words`` words, one epoch."""
    from embedattn.word2vec import Word2Vec, line_sentences

    corpus = gensim_data("head500.noblanks.cor")
    if corpus is None:
        ctx.note("  word2vec_large: gensim's head500.noblanks.cor not found: skipped")
        return []
    sents = list(line_sentences(corpus))
    variants = dict(_LARGE, **(_LARGE_FULL if ctx.profile == "full" else {}))
    if not cfg.sg:
        variants = {k: v for k, v in variants.items() if "shared" not in k}

    def one(name: str, opts: dict, attrs: dict) -> list[dict]:
        model = Word2Vec(sg=cfg.sg, vector_size=cfg.vector_size, window=cfg.window, negative=cfg.negative,
                         min_count=cfg.min_count, epochs=1, seed=0, device=str(ctx.device), **opts)  # fmt: skip
        model.build_vocab(sents)
        repeat_corpus(model, -(-min_words // model._ids.numel()))
        for k, v in attrs.items():
            setattr(model, k, v)
        model.train()
        words = model.trained_words
        base = dict(suite=SUITE, kernel="word2vec_large" if cfg.sg else "word2vec_large_cbow", provider=name,
                    mode="train", dtype="fp32", shape=cfg.shape(words, "head500-repeated") + f" device={ctx.device}",
                    x_name="words", x_value=words, config=_options({**opts, **attrs}))  # fmt: skip
        ms = model.train_seconds * 1e3
        rows = measurement_rows(rec, base, Timing(ms, ms, ms), float(words), "words_per_s")  # training alone
        ctx.log(f"  word2vec_large {name}: {words / model.train_seconds:,.0f} words/s ({words:,} words, "
                f"mean pair loss {model.mean_pair_loss:.4f})")  # fmt: skip
        del model
        torch.cuda.empty_cache()
        return rows

    rows: list[dict] = []
    for name, (opts, attrs) in variants.items():
        rows += try_measure(ctx, f"word2vec_large {name}", ("w2v_large", name, cfg.sg),
                            lambda name=name, opts=opts, attrs=attrs: one(name, opts, attrs))  # fmt: skip
    return rows


def plan(ctx: Context) -> list[Case]:
    step = fused_step(ctx)
    cases = []
    if ctx.profile != "tiny":  # first: a time budget cuts from the end, and these are the end-to-end numbers
        epochs = 1 if ctx.profile == "quick" else 20  # 20: the quality target's setting (issues 4, 16)
        workers = 2 if not ctx.is_cuda else min(os.cpu_count() or 2, 16)
        if ctx.profile == "quick":
            ctx.note("  word2vec: --quick trains 1 epoch (words/s only; WordSim-353 needs the full sweep's 20)")
        for sg, hs in ((1, 0), (0, 0), (1, 1), (0, 1)):  # hs: hierarchical softmax alone (negative=0)
            cfg = W2VSettings(epochs=epochs, workers=workers, sg=sg, hs=hs, negative=0 if hs else 5)
            cases.append(Case(SUITE, f"word2vec head500 sg={sg} hs={hs} epochs={epochs}",
                              lambda c, r, cfg=cfg: run_word2vec(c, r, cfg), weight=20.0, dtype="fp32"))  # fmt: skip
        if ctx.is_cuda:  # the speed target is measured on >= 100M words
            for sg in (1, 0):
                cfg = W2VSettings(epochs=1, workers=workers, sg=sg)
                cases.append(Case(SUITE, f"word2vec head500x300 sg={sg}",
                                  lambda c, r, cfg=cfg: run_word2vec_large(c, r, cfg, 100_000_000),
                                  weight=20.0, dtype="fp32"))  # fmt: skip
    cases += [
        Case(SUITE, f"sgns d{s.dim} {s.dtype} B={s.pairs}", lambda c, r, s=s: run_spec(c, r, s, step), dtype=s.dtype)
        for s in specs(ctx)
    ]
    return cases
