"""word2vec for the GPU lease (issue #27 item 4): words/s on the ~100M-word corpus, WordSim-353 quality against gensim.

    python benchmarks/gpu/w2v_bench.py --out DIR/w2v.csv --max-seconds 40          # on the GPU machine
    python benchmarks/gpu/w2v_bench.py --dry-run --out /tmp/w2v.csv                 # the same code path, CPU, tiny
    python benchmarks/gpu/w2v_bench.py --write-gensim-reference benchmarks/gpu/gensim_reference.json   # CPU machine

The settings are benchmarks/negative_sampling.py's (``W2VSettings``: D 100, window 5, negative 5, min_count 3) on
gensim's head500 corpus (331k words). In order, each step only when the time left allows it (a step's cost is
predicted from the rate the previous one measured, so the command ends inside ``--max-seconds``):

1. quality, skip-gram: embedattn's kernel trainer on the run's device, 20 epochs of head500 (gensim's quality
   setting, issues 4 and 16): WordSim-353 Spearman beside gensim's at the same settings. gensim is not on the GPU
   machine: its rho comes from ``gensim_reference.json`` (measured on the CPU machine by
   ``--write-gensim-reference``: quality does not depend on the device), or from gensim itself where it is installed;
2. speed, skip-gram: head500 repeated on the device (``benchmarks.negative_sampling.repeat_corpus``) to ~10M words
   (calibration), then to 100M words, one epoch: training words/s (``model.train_seconds``), the WordSim-353 rho of
   that model beside it; then the shared-negatives variant;
3. the same for CBOW (sg=0, gensim's default).

Rows: benchmarks.harness's long format, kernels ``word2vec`` / ``word2vec_cbow`` (quality runs) and
``word2vec_large`` / ``word2vec_large_cbow`` (speed runs), as the negative_sampling suite writes them, so
``benchmarks.summary`` and benchmarks/gpu/lease_report.py read them beside the sweep's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import negative_sampling as NS  # noqa: E402
from benchmarks.harness import Context, Recorder, Timing, measurement_rows, versions  # noqa: E402

REFERENCE = Path(__file__).with_name("gensim_reference.json")
TARGET_WORDS = 100_000_000
CALIBRATION_WORDS = 10_000_000


def log(msg: str) -> None:
    print(msg, flush=True)


def corpus_paths() -> tuple[str | None, str | None]:
    return NS.gensim_data("head500.noblanks.cor"), NS.gensim_data("wordsim353.tsv")


def settings(sg: int, epochs: int, workers: int) -> NS.W2VSettings:
    return NS.W2VSettings(epochs=epochs, workers=workers, sg=sg)


def train_gensim(corpus: str, cfg: NS.W2VSettings):
    """gensim's Word2Vec at ``cfg`` (seed 0, as the suite); None where gensim is not installed."""
    try:
        import gensim  # noqa: F401
    except ImportError:
        return None
    return NS._train_gensim(None, corpus, cfg)


def write_gensim_reference(path: str, workers: int) -> None:
    """gensim's WordSim-353 rho and words/s at the quality settings, sg=1 and sg=0 (run on the CPU machine)."""
    import gensim

    corpus, ws = corpus_paths()
    if corpus is None or ws is None:
        sys.exit("gensim's head500.noblanks.cor / wordsim353.tsv not found")
    out = {"what": "gensim's WordSim-353 Spearman on head500 at benchmarks/negative_sampling.py's quality settings; "
                   "the GPU machine has no gensim, so the lease compares embedattn's rho with these",
           "command": "python benchmarks/gpu/w2v_bench.py --write-gensim-reference " + path,
           "gensim": gensim.__version__, "workers": workers, "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for sg in (1, 0):
        cfg = settings(sg, 20, workers)
        t0 = time.perf_counter()
        model = train_gensim(corpus, cfg)
        wall = time.perf_counter() - t0
        rho, used = NS.ws353_spearman(model.wv.__getitem__, ws)
        words = model.corpus_total_words * cfg.epochs
        out["runs"][f"sg={sg}"] = {"settings": cfg.shape(model.corpus_total_words), "epochs": cfg.epochs,
                                   "ws353_spearman": round(rho, 4), "pairs_used": used,
                                   "words_per_s": round(words / wall), "train_words_per_s":
                                   round(words / model.total_train_time)}
        log(f"gensim sg={sg}: rho {rho:.4f} ({used} pairs), {words / wall:,.0f} words/s with {workers} workers")
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {path}")


class Run:
    """The bench's state: the recorder, the deadline, and the rates measured so far (for the next predictions)."""

    def __init__(self, ctx: Context, rec: Recorder, deadline: float, dry: bool):
        self.ctx, self.rec, self.deadline, self.dry = ctx, rec, deadline, dry
        self.rate: dict[int, float] = {}  # sg -> training words/s of the last run (the predictions' basis)
        self.summary: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, what: str, words: float, sg: int, overhead: float = 3.0) -> bool:
        """Whether training ``words`` more words (plus ``overhead`` s) fits in the time left, by the last rate."""
        rate = self.rate.get(sg)
        need = overhead + (words / rate if rate else 0.0)
        if need * 1.3 < self.left():
            return True
        self.ctx.note(f"  {what}: skipped, ~{need:.0f} s predicted and {self.left():.0f} s left")
        return False

    def rows(self, kernel: str, provider: str, cfg: NS.W2VSettings, words: int, corpus: str, seconds: float,
             wall: float | None, rho: float, config: str, x_name: str, x_value: float) -> None:
        base = dict(suite=NS.SUITE, kernel=kernel, provider=provider, mode="train", dtype="fp32",
                    shape=cfg.shape(words, corpus) + f" device={self.ctx.device}", x_name=x_name, x_value=x_value,
                    config=config)
        t = Timing(seconds * 1e3, seconds * 1e3, seconds * 1e3)
        rows = measurement_rows(self.rec, base, t, float(words), "words_per_s")
        if wall is not None:
            w = words / wall
            rows.append(self.rec.row(**base, metric="wall_words_per_s", unit="words/s", p50=w, p20=w, p80=w))
        rows.append(self.rec.row(**base, metric="ws353_spearman", unit="rho", p50=rho, p20=rho, p80=rho))
        self.rec.add(rows)


def quality(run: Run, sg: int, corpus: str, ws: str, epochs: int, reference: dict, opts: dict) -> None:
    """embedattn (kernel trainer; ``opts``: more Word2Vec options) on head500 for ``epochs`` epochs; gensim's rho
    beside it."""
    cfg = settings(sg, epochs, workers=min(os.cpu_count() or 2, 16))
    kernel = "word2vec" if sg else "word2vec_cbow"
    words_corpus = sum(len(line.split()) for line in NS._open_text(corpus))
    if not run.fits(f"{kernel} quality", words_corpus * epochs, sg, overhead=15.0):
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = NS._train_embedattn(run.ctx, corpus, cfg, str(run.ctx.device), opts)
    if run.ctx.is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rho, used = NS.ws353_spearman(model.wv.__getitem__, ws)
    words = model.trained_words
    run.rate[sg] = words / model.train_seconds
    run.rows(kernel, "embedattn", cfg, words, "head500", model.train_seconds, wall, rho, NS._options(opts),
             "epochs", epochs)
    ref = reference.get("runs", {}).get(f"sg={sg}")
    g = train_gensim(corpus, cfg) if not run.dry and run.left() > 30 else None
    if g is not None:  # gensim on this machine: its own number, same run
        grho, _ = NS.ws353_spearman(g.wv.__getitem__, ws)
        src = "gensim on this machine"
    elif ref and ref.get("epochs") == epochs:
        grho, src = float(ref["ws353_spearman"]), f"gensim {reference.get('gensim')} reference ({REFERENCE.name})"
    else:
        grho, src = float("nan"), "no gensim reference at these settings"
    if grho == grho:
        run.rec.add([run.rec.row(suite=NS.SUITE, kernel=kernel, provider="gensim", mode="train", dtype="fp32",
                                 shape=cfg.shape(words_corpus), x_name="epochs", x_value=epochs,
                                 metric="ws353_spearman", unit="rho", p50=grho, p20=grho, p80=grho, config=src,
                                 device="cpu" if g is None else run.ctx.device_name)])
    line = (f"{kernel}: embedattn {words / model.train_seconds:,.0f} words/s training ({words / wall:,.0f} wall), "
            f"rho {rho:.3f} ({used} pairs) vs gensim {grho:.3f} [{src}]")
    run.summary.append(line)
    log("  " + line)


def speed(run: Run, sg: int, corpus_sents: list, ws: str, target: int, calibration: int) -> None:
    """The kernel trainer's training words/s on head500 repeated on the device to ``target`` words, one epoch."""
    from embedattn.word2vec import Word2Vec

    cfg = settings(sg, 1, workers=min(os.cpu_count() or 2, 16))
    kernel = "word2vec_large" if sg else "word2vec_large_cbow"
    variants = [("embedattn", {})] + ([("embedattn-shared-negatives", {"shared_negatives": True})] if sg else [])
    for i, (name, opts) in enumerate(variants):
        sizes = [calibration, target] if i == 0 else [target]
        for words_goal in sizes:
            if not run.fits(f"{kernel} {name} {words_goal:,} words", words_goal, sg, overhead=4.0):
                break
            model = Word2Vec(sg=cfg.sg, vector_size=cfg.vector_size, window=cfg.window, negative=cfg.negative,
                             min_count=cfg.min_count, epochs=1, seed=0, device=str(run.ctx.device), **opts)
            model.build_vocab(corpus_sents)
            times = max(1, -(-words_goal // model._ids.numel()))
            NS.repeat_corpus(model, times)
            model.train()
            words, secs = model.trained_words, model.train_seconds
            run.rate[sg] = words / secs
            rho, _ = NS.ws353_spearman(model.wv.__getitem__, ws)
            run.rows(kernel, name, cfg, words, f"head500x{times}", secs, None, rho,
                     NS._options(opts), "words", words)
            line = f"{kernel} {name}: {words / secs:,.0f} words/s on {words:,} words ({secs:.2f} s), rho {rho:.3f}"
            run.summary.append(line)
            log("  " + line)
            model = None  # the tables' device memory goes before the next run
            if run.ctx.is_cuda:
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="CSV path (long format)")
    ap.add_argument("--max-seconds", type=float, default=40.0)
    ap.add_argument("--device", default=None, help="default: cuda when available (the dry run: cpu)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: quality runs on a 100-word slice through the Triton interpreter (with TRITON_INTERPRET=1"
                         "), speed runs of 20k words on the C path, 1 epoch: the code path in a minute")
    ap.add_argument("--write-gensim-reference", metavar="PATH", help="run gensim here and write its reference")
    ap.add_argument("--workers", type=int, default=2, help="gensim's workers for --write-gensim-reference")
    args = ap.parse_args(argv)
    if args.write_gensim_reference:
        write_gensim_reference(args.write_gensim_reference, args.workers)
        return 0
    if not args.out:
        ap.error("--out is required")
    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    ctx = Context(device=device, profile="tiny" if args.dry_run else "full",
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    rec = Recorder(ctx, args.out)
    run = Run(ctx, rec, t_start + args.max_seconds, args.dry_run)
    corpus, ws = corpus_paths()
    if corpus is None or ws is None:
        log("w2v_bench: head500.noblanks.cor / wordsim353.tsv not found (gensim's test data; on the GPU machine "
            "EMBEDATTN_BENCH_DATA points at the carried copy, benchmarks/gpu/gpu_session.sh prepare makes it)")
        return 2
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    from embedattn.word2vec import line_sentences

    sents = list(line_sentences(corpus))
    epochs, target, calibration, opts = 20, TARGET_WORDS, CALIBRATION_WORDS, {}
    if args.dry_run:  # a slice of the corpus in a file of its own (the quality run reads a corpus file)
        corpus = str(Path(args.out).with_suffix(".corpus.txt"))
        Path(corpus).write_text(" ".join(sents[0][:100]) + "\n")
        sents = [sents[0][:2000]]
        epochs, target, calibration = 1, 20_000, 5_000
        # the kernel trainer's Triton road through the interpreter (seconds per 100 words); the speed runs take the
        # C road (the interpreter would need minutes for their 20k words)
        opts = {"backend": "triton"} if os.environ.get("TRITON_INTERPRET") == "1" else {}
    log(f"word2vec on {ctx.device_name}: torch {versions()['torch']}, triton {versions()['triton']}; "
        f"{sum(map(len, sents)):,} corpus words; budget {args.max_seconds:.0f} s")
    try:
        for sg in (1, 0):  # skip-gram first: the speed target's mode
            quality(run, sg, corpus, ws, epochs, reference, opts)
            speed(run, sg, sents, ws, target, calibration)
    except KeyboardInterrupt:
        log("w2v_bench: interrupted (the phase's time limit): rows so far are in the CSV")
    log(f"w2v_bench: done in {time.time() - t_start:.0f} s -> {args.out}")
    for line in run.summary:
        log(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
