"""``Word2Vec``: CBOW and skip-gram with negative sampling and/or hierarchical softmax, gensim's argument
names, defaults, methods, return types, warnings and exceptions."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._backend import resolve
from ..negative_sampling import UnigramSampler
from . import _cpu
from ._corpus import huffman_tree, keep_vocab_item, line_sentences, read_corpus, scan_vocab
from ._keyedvectors import REAL, KeyedVectors, WordPairsResult, _argsort, _ClassOnly, load_npz, save_npz
from ._train import (
    CompiledStep,
    autograd_sgns_step,
    chunk_bounds,
    skipgram_pairs,
    torch_sgns_step,
    train_chunks_reference,
)

logger = logging.getLogger(__name__)

# the settings save() keeps and load() passes back to the constructor
_PARAMS = ("vector_size", "window", "negative", "hs", "min_count", "sample", "alpha", "min_alpha", "epochs",
           "ns_exponent", "max_vocab_size", "max_final_vocab", "sorted_vocab", "batch_words", "shrink_windows",
           "compute_loss", "seed", "workers", "backend", "fused", "compile", "in_flight", "deterministic", "sg",
           "cbow_mean", "trainer", "shared_negatives", "comment")
_TRAINERS = (None, "kernel", "minibatch")
_STATE = ("effective_min_count", "corpus_count", "corpus_total_words", "train_count", "total_train_time",
          "running_training_loss", "min_alpha_yet_reached")
# the gensim Word2Vec attributes from_gensim/to_gensim carry over (the constructor's, then the state's)
_GENSIM_PARAMS = ("vector_size", "alpha", "window", "min_count", "max_vocab_size", "sample", "seed", "min_alpha",
                  "sg", "hs", "negative", "ns_exponent", "cbow_mean", "epochs", "sorted_vocab", "batch_words",
                  "compute_loss", "max_final_vocab", "shrink_windows", "comment")


class VocabularyError(RuntimeError, ValueError):
    """No vocabulary to train: an empty corpus, or every word cut by ``min_count``/``trim_rule`` (gensim
    raises RuntimeError for it; a ValueError too)."""


_ANNOUNCED: set = set()


def _announce(road: str, why: str) -> None:
    """Say once per process which road trains and why, when it is not the fast one (gensim's FAST_VERSION
    warning): a slow road is never taken silently."""
    if (road, why) not in _ANNOUNCED:
        _ANNOUNCED.add((road, why))
        msg = f"word2vec trains with {road}: {why}"
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device (None: CUDA when available, else the CPU); a CUDA device that is
    not there raises ValueError here, before any work."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available here (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(device)!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


@contextlib.contextmanager
def _deterministic_algorithms(on: bool):
    """torch's deterministic algorithms (``index_add_`` on CUDA without atomics) while training, then
    the caller's setting back; ops without a deterministic version warn rather than fail."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _batch_bounds(n: int, n_batches: int) -> list[int]:
    """``n_batches + 1`` increasing positions from 0 to ``n``: batch i covers [b[i], b[i+1])."""
    # integer arithmetic: float32 bounds (linspace's default) overshot n above 2**24 words
    return [(i * n + n_batches // 2) // n_batches for i in range(n_batches + 1)]


def _chunked(step, chunk: int, inputs, targets, negatives, w_in, w_out, lr):
    """Apply ``step`` to consecutive slices of at most ``chunk`` pairs; the summed loss."""
    total = 0.0
    for s in range(0, inputs.numel(), chunk):
        sl = slice(s, s + chunk)
        total = total + step(inputs[sl], targets[sl], negatives[sl], w_in, w_out, lr)
    return total


def _check_int(name: str, val, lo: int, optional: bool = False) -> None:
    if optional and val is None:
        return
    if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= {lo}, got {val!r}")


def _plain(v):
    """A setting as a JSON value (numpy scalars as Python ones)."""
    return v.item() if isinstance(v, np.generic) else v


def _check_corpus_args(corpus_iterable, corpus_file) -> None:
    if corpus_iterable is not None and corpus_file is not None:
        raise TypeError("Both corpus_file and corpus_iterable must not be provided at the same time")
    if corpus_file is not None and not isinstance(corpus_file, (str, os.PathLike)):
        raise TypeError(f"corpus_file must be a path, got {type(corpus_file).__name__}")


def _keep_probs(counts: np.ndarray, sample: float, total: float) -> np.ndarray:
    """gensim's downsampling (``prepare_vocab``): P(keep) = (sqrt(v / t) + 1) * t / v capped at 1, with
    t = sample * total retained words, or int(sample * (3 + sqrt 5) / 2) for gensim's ``sample >= 1``."""
    v = np.asarray(counts, dtype=np.float64)
    if not sample:
        t = total
    elif sample < 1.0:
        t = sample * total
    else:
        t = int(sample * (3 + np.sqrt(5)) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (np.sqrt(v / t) + 1) * (t / v)
    return np.where(v > 0, np.minimum(p, 1.0), 1.0)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -(np.maximum(-z, 0) + np.log1p(np.exp(-np.abs(z))))


class Word2Vec:
    """word2vec (CBOW or skip-gram; negative sampling, hierarchical softmax or both) on embedattn's kernels,
    with gensim 4's API: its argument names, order and defaults (CBOW ``sg=0``, ``negative=5``, ``hs=0``,
    ``seed=1``, ...), methods, return types, logged warnings and exception types, so that gensim's own
    test file passes against it (docs/word2vec.md lists what differs).

    Give ``sentences`` (an iterable of token lists; a one-pass generator is fine) or ``corpus_file`` (one
    sentence per line, UTF-8; .bz2/.gz fine) and training runs in the constructor; or call
    ``build_vocab`` and ``train`` yourself. The vocabulary is gensim's, word for word and in the same
    order: counted with ``max_vocab_size`` pruning during the scan, cut at ``min_count`` (raised by
    ``max_final_vocab``) and ``trim_rule``, sorted by descending count with equal counts in gensim's
    order; ``build_vocab(update=True)`` grows it (online training). Hierarchical softmax (``hs=1``) uses
    gensim's Huffman tree, so ``syn1``'s rows are gensim's inner nodes. The learning rate decays linearly
    from ``alpha`` to ``min_alpha`` with the words processed, over all epochs of a ``train`` call.
    ``wv`` (a ``KeyedVectors``) holds the vectors as a numpy array, ``syn1neg`` (negative sampling) and
    ``syn1`` (hierarchical softmax) the output tables, None when their objective is off;
    ``wv.vectors_lockf`` (gensim's) scales each word's input-vector updates (0 freezes a word). The
    training loss (``get_latest_training_loss``) is computed by the kernels on the GPU and by the minibatch
    trainer always, on the CPU path only with ``compute_loss=True`` or ``progress`` (it costs a fifth of
    the time there; gensim computes it only with ``compute_loss``).

    Files: ``save``/``load`` write and read an .npz with a JSON header (no pickle, so loading cannot run
    code); large arrays in their own .npy files (``sep_limit``), memory-mapped with ``load(mmap="r")``.
    gensim's own pickled models are converted in memory: ``Word2Vec.from_gensim(model)`` and
    ``model.to_gensim()`` (gensim installed); nothing is unpickled by embedattn.

    Two trainers (``trainer``; None picks ``"kernel"`` unless ``fused=False`` or ``in_flight`` asks for
    the minibatch one):

    - ``"kernel"``: word2vec.c's algorithm in one kernel call per slice of about 1M corpus words (the
      Triton kernel ``kernels/word2vec.py`` on CUDA; on the CPU the same algorithm in C, ``_w2v.c``,
      built once with the system compiler, run by ``workers`` threads). Subsampling, dynamic windows
      and negative draws happen inside; each sentence (cut into pieces of at most 10000 words, gensim's
      limit, or 1000 on a GPU, word2vec.c's, for parallelism) is walked word by word, sequential SGD
      within it, Hogwild across sentences; like gensim's jobs of ``batch_words`` words, a slice of the
      corpus gets one thread per ``batch_words`` words at most (a corpus smaller than that trains in one
      thread, deterministically). ``shared_negatives=True`` draws one set of negatives per centre word
      for its whole window (skip-gram; Wombat / word2vec-acc's reuse). Every objective and architecture.
    - ``"minibatch"`` (skip-gram with negative sampling only): pairs and negatives drawn for
      ``batch_words`` words at a time, updates applied 256 pairs at a time from one snapshot:
      ``fused=True`` with the fused step (Triton ``sgns_step`` on CUDA; on the CPU chunked PyTorch,
      torch.compile'd when ``compile`` allows, None: when epochs x corpus words >= 1M, as compiling costs
      ~10-30 s once), ``fused=False`` with the autograd ``negative_sampling_loss`` + SGD; ``in_flight``
      (fused Triton): one Hogwild launch per batch with about that many pairs in flight.

    The road is decided once per ``train`` through ``embedattn._backend.resolve(..., op="word2vec")``
    (None: Triton on CUDA, the C path on the CPU; ``backend="triton"`` on the CPU runs the Triton kernel
    through the interpreter, for tests; ``EMBEDATTN_BACKEND`` applies). Where the fast road cannot run
    (no C compiler), the model says once, with the reason, which road trains instead.

    embedattn's own arguments (keyword-only): ``device`` (default CUDA when available); ``backend``;
    ``trainer``, ``shared_negatives``, ``fused``, ``compile``, ``in_flight`` (above); ``workers`` (CPU,
    default min(2, torch.get_num_threads()); gensim's is 3) threads train concurrently, Hogwild like
    gensim's workers; ``progress``: True shows a progress bar on stderr (words/s, loss, learning rate), a
    callable gets the same numbers as a dict; epochs are also logged at INFO level like gensim's.
    ``deterministic=True`` gives the same vectors bit for bit for the same ``seed`` on the same device:
    the kernel trainer with one program (one thread), the minibatch trainer with the PyTorch step. On the
    CPU ``workers=1`` alone is enough (gensim's advice too).

    gensim arguments with no effect here are refused rather than ignored: ``hashfxn`` other than ``hash``
    (gensim 4 no longer uses it either), ``null_word=1``.
    """

    def __init__(self, sentences: Iterable[list[str]] | None = None, corpus_file=None, vector_size: int = 100,
                 alpha: float = 0.025, window: int = 5, min_count: int = 5, max_vocab_size: int | None = None,
                 sample: float = 1e-3, seed: int = 1, workers: int | None = None, min_alpha: float = 0.0001,
                 sg: int = 0, hs: int = 0, negative: int = 5, ns_exponent: float = 0.75, cbow_mean: int = 1,
                 hashfxn: Callable = hash, epochs: int = 5, null_word: int = 0, trim_rule: Callable | None = None,
                 sorted_vocab: int = 1, batch_words: int = 10000, compute_loss: bool = False,
                 callbacks: Iterable = (), comment: str | None = None, max_final_vocab: int | None = None,
                 shrink_windows: bool = True, *, device=None, backend: str | None = None,
                 trainer: str | None = None, shared_negatives: bool = False, fused: bool = True,
                 compile: bool | None = None, in_flight: int | None = None, deterministic: bool = False,
                 progress: bool | Callable[[dict], None] | None = None) -> None:
        if sg not in (0, 1):
            raise ValueError(f"sg must be 1 (skip-gram) or 0 (CBOW), got {sg!r}")
        if hs not in (0, 1):
            raise ValueError(f"hs must be 1 (hierarchical softmax) or 0, got {hs!r}")
        if trainer not in _TRAINERS:
            raise ValueError(f"trainer must be one of {_TRAINERS}, got {trainer!r}")
        for name, val, lo in (("vector_size", vector_size, 1), ("window", window, 1), ("negative", negative, 0),
                              ("min_count", min_count, 0), ("epochs", epochs, 1), ("batch_words", batch_words, 1)):
            _check_int(name, val, lo)
        if not hs and not negative:
            raise ValueError("You must set either 'hs' or 'negative' to be positive for proper training. "
                             "When both 'hs=0' and 'negative=0', there will be no training.")
        if hashfxn is not hash:
            raise ValueError("hashfxn: gensim 4 no longer uses it, nor does embedattn (vectors are seeded by seed)")
        if null_word:
            raise ValueError("null_word=1 (gensim's padding word for its removed dm_concat mode) is not supported")
        _check_int("max_vocab_size", max_vocab_size, 0, optional=True)
        _check_int("max_final_vocab", max_final_vocab, 1, optional=True)
        _check_int("workers", workers, 1, optional=True)
        _check_int("in_flight", in_flight, 1, optional=True)
        eff = trainer or ("minibatch" if (not fused or in_flight is not None) else "kernel")
        if eff == "minibatch" and (not sg or hs or not negative):
            raise ValueError("the minibatch trainer (trainer='minibatch'; fused=False and in_flight select it) "
                             "trains skip-gram with negative sampling only: CBOW (sg=0) and hierarchical softmax "
                             "(hs=1) need the kernel trainer")
        if eff == "kernel" and (not fused or in_flight is not None):
            raise ValueError("fused=False and in_flight are options of trainer='minibatch'")
        if shared_negatives and (eff != "kernel" or not sg or not negative):
            raise ValueError("shared_negatives is an option of the kernel trainer's skip-gram with negative sampling")
        if deterministic and (workers or 1) > 1:
            raise ValueError(f"deterministic=True trains with one worker, not workers={workers}")
        if deterministic and backend == "triton" and eff == "minibatch":
            raise ValueError("deterministic=True runs the minibatch trainer's PyTorch step: the Triton step's atomic "
                             "adds land in a varying order (use backend=None or 'reference', or trainer='kernel')")
        if sample < 0 or alpha <= 0 or min_alpha < 0:
            raise ValueError("sample and min_alpha must be >= 0 and alpha > 0")
        _check_corpus_args(sentences, corpus_file)
        self.vector_size, self.window, self.negative, self.min_count = vector_size, window, negative, min_count
        self.layer1_size = vector_size
        self.sample, self.alpha, self.min_alpha, self.epochs = sample, alpha, min_alpha, epochs
        self.ns_exponent, self.max_vocab_size, self.max_final_vocab = ns_exponent, max_vocab_size, max_final_vocab
        self.sorted_vocab, self.batch_words, self.shrink_windows = sorted_vocab, batch_words, shrink_windows
        self.sg, self.hs, self.cbow_mean, self.compute_loss = int(sg), int(hs), int(cbow_mean), compute_loss
        self.trainer, self.shared_negatives, self.comment = trainer, bool(shared_negatives), comment
        self.seed, self.backend, self.fused, self.workers, self.in_flight = seed, backend, fused, workers, in_flight
        self.deterministic = deterministic
        self.progress = print_progress if progress is True else (progress or None)
        self.compile, self.compile_seconds = compile, 0.0
        self.device = resolve_device(device)
        # a backend that cannot run here fails now, not after the vocabulary pass
        resolve(backend, torch.empty(0, device=self.device), op="word2vec", dtype=torch.float32)
        # pairs per minibatch (per sgns_step launch on a GPU, where all pairs of a launch are in
        # flight at once): updates inside one are summed from a common snapshot, so a frequent word
        # drawn as a negative n times moves n stale steps at once. 2048 diverged on head500 (CPU,
        # same sum-of-stale-updates semantics as a GPU launch); 256 matches gensim's quality.
        self._chunk = 256
        # corpus words whose pairs and negatives are drawn at once (one host sync each, see _train)
        self._group_words = 1 << 18
        # the kernel trainer: chunks of at most this many words (windows stop at a chunk's ends; on the CPU
        # gensim's sentence limit, on a GPU word2vec.c's, for more programs), about this many corpus words
        # per kernel call (a GPU launch: one program per chunk), and how rows go back to the tables ("add"
        # their change, or "store" their value)
        self._chunk_words = 1000 if self.device.type == "cuda" else 10000
        self._slice_words = (1 << 20) if self.device.type == "cuda" else (1 << 17)
        self._write_back = "add"
        self._num_warps = None  # the GPU kernel's warps per program (None: its config's)
        self.wv = KeyedVectors(vector_size)
        self.wv.vectors_lockf = np.ones(1, dtype=REAL)  # gensim's: one factor for every word (1: all train)
        self.syn1neg: np.ndarray | None = None
        self.syn1: np.ndarray | None = None
        self.raw_vocab: dict[str, int] = {}
        self.effective_min_count = min_count
        self.corpus_count = self.corpus_total_words = 0
        self.train_count, self.total_train_time = 0, 0.0
        self.running_training_loss = self.mean_pair_loss = 0.0
        self.min_alpha_yet_reached = float(alpha)
        self.train_seconds, self.trained_words = 0.0, 0
        self._corpus = None  # the corpus read by scan_vocab, until build_vocab encodes it
        self._ids = self._sent = None  # the corpus given to build_vocab, encoded, on the device
        self._keep_prob = np.zeros(0)  # per word, P(keep) of the downsampling (gensim's sample_int / 2**32-1)
        self._hs = None  # the Huffman paths, flattened (huffman_tree)
        self._empty_why = None  # why build_vocab left no word, said again by train
        if sentences is not None or corpus_file is not None:
            self.build_vocab(sentences, corpus_file=corpus_file, trim_rule=trim_rule)
            self.train(epochs=self.epochs, callbacks=callbacks)

    def __str__(self) -> str:
        return f"{self.__class__.__name__}<vocab={len(self.wv)}, vector_size={self.vector_size}, alpha={self.alpha}>"

    __repr__ = __str__

    # ----------------------------------------------------------------------------- vocabulary
    def scan_vocab(self, corpus_iterable: Iterable[list[str]] | None = None, corpus_file=None,
                   progress_per: int = 10000, trim_rule: Callable | None = None) -> tuple[int, int]:
        """Read the corpus once and count its words into ``raw_vocab`` (gensim's ``_scan_vocab``, its
        ``max_vocab_size`` pruning included; ``progress_per``: log every that many sentences). Returns
        (total words, sentences), as gensim; ``build_vocab`` keeps the corpus for ``train()``."""
        _check_corpus_args(corpus_iterable, corpus_file)
        if corpus_iterable is None and corpus_file is None:
            raise TypeError("Either one of corpus_file or corpus_iterable value must be provided")
        _check_int("progress_per", progress_per, 1)
        corpus = read_corpus(line_sentences(corpus_file) if corpus_file is not None else corpus_iterable,
                             progress_per=progress_per)
        self._corpus = corpus
        self.raw_vocab = scan_vocab(corpus, self.max_vocab_size, trim_rule)
        self.corpus_count, self.corpus_total_words = corpus.n_sentences, corpus.raw_words
        logger.info("collected %i word types from a corpus of %i raw words and %i sentences", len(self.raw_vocab),
                    corpus.raw_words, corpus.n_sentences)
        return corpus.raw_words, corpus.n_sentences

    def prepare_vocab(self, update: bool = False, keep_raw_vocab: bool = False, trim_rule: Callable | None = None,
                      min_count: int | None = None, sample: float | None = None, dry_run: bool = False) -> dict:
        """gensim's ``prepare_vocab`` on ``raw_vocab``: keep the words that pass ``min_count`` (raised by
        ``max_final_vocab``) and ``trim_rule``, compute their downsampling, sort them by descending count
        (``sorted_vocab``), build the Huffman tree (``hs``) and the negative-sampling table. ``update``:
        add the new words after the existing ones and add the counts (online training). ``dry_run``:
        change nothing, only report. Returns gensim's report: ``drop_unique``, ``retain_total``,
        ``downsample_unique``, ``downsample_total``, ``num_retained_words``."""
        min_count = min_count or self.min_count
        sample = sample or self.sample
        raw = self.raw_vocab
        if update and not dry_run and not len(self.wv.vectors):
            raise RuntimeError("You cannot do an online vocabulary-update of a model which has no prior vocabulary. "
                               "First build the vocabulary of your model with a corpus before doing an online "
                               "update.")
        self.effective_min_count = min_count
        if self.max_final_vocab is not None:
            ranked = sorted(raw.values(), reverse=True)
            calc = ranked[self.max_final_vocab] + 1 if self.max_final_vocab < len(ranked) else 1
            self.effective_min_count = max(calc, min_count)
        kept = [(w, c) for w, c in raw.items() if keep_vocab_item(w, c, self.effective_min_count, trim_rule)]
        drop_unique = len(raw) - len(kept)
        retain_total = sum(c for _, c in kept)
        p = _keep_probs(np.array([c for _, c in kept], dtype=np.int64), sample, retain_total)
        report = {"drop_unique": drop_unique, "retain_total": retain_total,
                  "downsample_unique": int((p < 1.0).sum()),
                  "downsample_total": int(sum(pi * c for pi, (_, c) in zip(p.tolist(), kept))),
                  "num_retained_words": len(kept)}
        if dry_run:
            return report
        if not update:
            self.min_count, self.sample = min_count, sample  # the stored settings are the applied ones
            counts = np.array([c for _, c in kept], dtype=np.int64)
            order = np.arange(len(kept))
            if self.sorted_vocab and kept:
                # descending count, equal counts in reverse first-seen order (gensim's lexsort)
                order = np.lexsort((-order, -counts))
            words = [kept[i][0] for i in order]
            self.wv = KeyedVectors._from_arrays(words, np.zeros((0, self.vector_size), dtype=REAL), counts[order])
            self.wv.vectors_lockf = np.ones(1, dtype=REAL)
            self._keep_prob = p[order]
        else:
            new = [w for w, _ in kept if w not in self.wv.key_to_index]
            logger.info("added %i new unique words and increased the count of %i pre-existing words", len(new),
                        len(kept) - len(new))
            for w in new:
                self.wv.key_to_index[w] = len(self.wv.index_to_key)
                self.wv.index_to_key.append(w)
            self.wv.next_index = len(self.wv.index_to_key)
            counts = np.concatenate([self.wv.expandos["count"], np.zeros(len(new), dtype=np.int64)])
            counts += np.array([raw.get(w, 0) for w in self.wv.index_to_key], dtype=np.int64)
            self.wv.expandos = {"count": counts}
            # as gensim: the words of this corpus get its downsampling, the others keep theirs
            keep = np.concatenate([self._keep_prob, np.ones(len(new))])
            keep[[self.wv.key_to_index[w] for w, _ in kept]] = p
            self._keep_prob = keep
        self.wv.expandos["sample_int"] = (self._keep_prob * (2**32 - 1)).astype(np.uint32)
        if not keep_raw_vocab:
            self.raw_vocab = {}
        self._init_sampling()
        return report

    def prepare_weights(self, update: bool = False) -> None:
        """The tables for the vocabulary: ``wv.vectors`` uniform in [-1/D, 1/D) (gensim's init; seeded by
        ``seed``), ``syn1neg``/``syn1`` zeros; ``update``: rows for the words added since, the rest kept."""
        V, D = len(self.wv), self.vector_size
        if not update:
            gen = torch.Generator().manual_seed(self.seed)
            # gensim's width (prep_vectors; word2vec.c's is half of it): CBOW's WordSim-353 on head500 gains ~0.01
            self.wv.vectors = torch.empty(V, D).uniform_(-1.0 / D, 1.0 / D, generator=gen).numpy()
            self.syn1neg = np.zeros((V, D), dtype=REAL) if self.negative else None
            self.syn1 = np.zeros((V, D), dtype=REAL) if self.hs else None
        else:
            old = len(self.wv.vectors)
            if not old:
                raise RuntimeError("You cannot do an online vocabulary-update of a model which has no prior "
                                   "vocabulary. First build the vocabulary of your model with a corpus before doing "
                                   "an online update.")
            rng = np.random.default_rng(self.seed + old)
            fresh = ((rng.random((V - old, D), dtype=np.float32) * 2 - 1) / D).astype(REAL)
            self.wv.vectors = np.vstack([self.wv.vectors, fresh])
            pad = np.zeros((V - old, D), dtype=REAL)
            if self.negative:
                self.syn1neg = np.vstack([self.syn1neg, pad]) if self.syn1neg is not None else np.zeros((V, D), REAL)
            if self.hs:
                self.syn1 = np.vstack([self.syn1, pad]) if self.syn1 is not None else np.zeros((V, D), REAL)
        self.wv.vectors_lockf = np.ones(1, dtype=REAL)  # gensim's: an update trains every word again
        self.wv.norms = None

    def build_vocab(self, corpus_iterable: Iterable[list[str]] | None = None, corpus_file=None, update: bool = False,
                    progress_per: int = 10000, keep_raw_vocab: bool = False, trim_rule: Callable | None = None) -> None:
        """Read the corpus once (``scan_vocab``), keep the words that pass ``min_count``/``max_final_vocab``/
        ``trim_rule`` (``prepare_vocab``), initialise the tables (``prepare_weights``), and keep the corpus
        (as ids) for ``train()`` without arguments. ``update=True`` adds the corpus's new words to a trained
        model's vocabulary, as gensim's online training. ``raw_vocab`` keeps the raw counts when
        ``keep_raw_vocab``."""
        self.scan_vocab(corpus_iterable, corpus_file, progress_per=progress_per, trim_rule=trim_rule)
        corpus, self._corpus = self._corpus, None
        self._prepare(update, trim_rule, keep_raw_vocab)
        self.prepare_weights(update=update)
        ids, sent = corpus.encode(self.wv.key_to_index)
        self._ids, self._sent = ids.to(self.device), sent.to(self.device)

    def _prepare(self, update: bool, trim_rule, keep_raw_vocab: bool) -> None:
        """prepare_vocab; an empty result is said now and raised by ``train`` (gensim's order)."""
        raw = dict(self.raw_vocab)
        self.prepare_vocab(update=update, keep_raw_vocab=keep_raw_vocab, trim_rule=trim_rule)
        self._empty_why = None
        if not len(self.wv):
            top = max(raw.values(), default=0)
            self._empty_why = ("the corpus is empty" if not self.corpus_total_words else
                               f"the vocabulary is empty: no word occurs min_count={self.effective_min_count} times "
                               f"or more (most frequent: {top} times); lower min_count")
            logger.warning("word2vec: %s", self._empty_why)

    def build_vocab_from_freq(self, word_freq: dict[str, int], keep_raw_vocab: bool = False,
                              corpus_count: int | None = None, trim_rule: Callable | None = None,
                              update: bool = False) -> None:
        """The vocabulary from ``{word: count}`` (gensim's); ``train`` then needs a corpus argument."""
        self.raw_vocab = dict(word_freq)
        self.corpus_count = corpus_count or 0
        self.corpus_total_words = int(sum(word_freq.values()))
        self._prepare(update, trim_rule, keep_raw_vocab)
        self.prepare_weights(update=update)
        self._ids = self._sent = None

    def _init_sampling(self) -> None:
        counts = np.array(self.wv.expandos["count"], dtype=np.int64)  # a copy: a memory-mapped file is read-only
        self._hs = huffman_tree(counts) if self.hs else None
        if self._hs is not None:  # gensim's per-word attributes, views of the flat arrays
            off, pts, cds = self._hs
            self.wv.expandos["code"] = np.array([cds[off[i]:off[i + 1]] for i in range(len(counts))] + [None],
                                                dtype=object)[:-1]
            self.wv.expandos["point"] = np.array([pts[off[i]:off[i + 1]] for i in range(len(counts))] + [None],
                                                 dtype=object)[:-1]
        self._sampler = UnigramSampler(torch.from_numpy(counts), self.ns_exponent, device=self.device) \
            if len(counts) else None
        self._keep = torch.from_numpy(self._keep_prob).float().to(self.device)
        # a loaded model continues with fresh random streams, not the ones its first training used
        seed = self.seed + 1_000_003 * self.train_count
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self._worker_gens = [torch.Generator(device=self.device).manual_seed(seed + 1 + i)
                             for i in range(self._n_workers())]

    def reset_from(self, other_model: Word2Vec) -> None:
        """Take ``other_model``'s vocabulary (and corpus) with fresh tables (gensim's ``reset_from``)."""
        self.wv = KeyedVectors._from_arrays(other_model.wv.index_to_key, np.zeros((0, self.vector_size), REAL))
        self.wv.key_to_index = other_model.wv.key_to_index
        self.wv.expandos = {k: v for k, v in other_model.wv.expandos.items() if k not in ("code", "point")}
        self._keep_prob = other_model._keep_prob.copy()
        self.corpus_count, self.corpus_total_words = other_model.corpus_count, other_model.corpus_total_words
        self._ids = None if other_model._ids is None else other_model._ids.to(self.device)
        self._sent = None if other_model._sent is None else other_model._sent.to(self.device)
        self._init_sampling()
        self.prepare_weights()

    # ----------------------------------------------------------------------------- training
    def _step_fn(self):
        backend = "reference" if self.deterministic else self.backend
        be = resolve(backend, self._w_out, op="negative_sampling", dtype=torch.float32)
        if not self.fused:
            return lambda *a: _chunked(lambda *c: autograd_sgns_step(*c, backend=be), self._chunk, *a)
        if be == "triton":
            from ..kernels.negative_sampling import sgns_hogwild, sgns_step

            if self.in_flight is not None:
                return lambda *a: sgns_hogwild(*a, in_flight=self.in_flight).sum(dtype=torch.float64)

            # one launch per chunk and nothing else per chunk: the per-pair losses land in one buffer
            # summed once per batch (slicing, casting and adding per chunk cost more than the launch)
            return lambda *a: sgns_step(*a, chunk=self._chunk).sum(dtype=torch.float64)
        compile_ = self.compile
        if compile_ is None:  # compiling costs ~10-20 s once: worth it for longer runs only
            compile_ = self.epochs * self._ids_train.numel() >= 1_000_000
        if compile_ and self.device.type == "cpu":  # CompiledStep is the CPU path (C++ codegen, CPU ids)
            t = time.perf_counter()
            step = CompiledStep(self._w_in, self._w_out, self.negative, self._chunk)
            self.compile_seconds = time.perf_counter() - t
            if step.ok:
                return step
        return lambda *a: torch_sgns_step(*a, chunk=self._chunk)

    def _road(self, locked: bool) -> str:
        """How ``train`` runs here, decided once through ``resolve(..., op="word2vec")``: ``"triton"`` (the
        kernel trainer's Triton kernel: CUDA, or the CPU interpreter with backend='triton'), ``"c"`` (its CPU
        path), ``"minibatch"`` (asked for, or skip-gram with negative sampling where C cannot be built) or
        ``"numpy"`` (its NumPy reference, where C cannot be built: slow). A road other than the fast one
        is announced once, with the reason."""
        want = self.trainer or ("minibatch" if (not self.fused or self.in_flight is not None) else None)
        if want == "minibatch":
            if locked:
                raise ValueError("wv.vectors_lockf locks rows, which only the kernel trainer honours: use "
                                 "trainer='kernel' (or set every factor back to 1)")
            return "minibatch"
        be = resolve(self.backend, torch.empty(0, device=self.device), op="word2vec", dtype=torch.float32)
        if be == "triton":
            return "triton"
        if self.device.type != "cpu":
            raise ValueError(f"the kernel trainer on {self.device} runs the Triton kernel, and "
                             f"backend={self.backend!r} resolves to the reference: use backend=None/'triton', or "
                             "trainer='minibatch' (skip-gram with negative sampling)")
        if _cpu.load() is not None:
            return "c"
        why = f"the C kernel of the CPU path could not be built ({_cpu.build_error()})"
        if want is None and self.sg and not self.hs and not locked:
            _announce("the minibatch trainer's PyTorch step (slower, another update order)", why)
            return "minibatch"
        _announce("the kernel trainer's NumPy reference (a hundred times slower)", why)
        return "numpy"

    def _n_workers(self) -> int:
        be = resolve(self.backend, torch.empty(0, device=self.device), op="word2vec", dtype=torch.float32)
        if self.device.type != "cpu" or be != "reference":
            return 1  # Triton's CPU interpreter patches global state per launch: one thread only
        if self.deterministic:
            return 1
        return self.workers if self.workers is not None else max(1, min(2, torch.get_num_threads()))

    def _lockf(self) -> np.ndarray | None:
        """``wv.vectors_lockf`` as one float32 factor per word (gensim's modular indexing), or None when
        every factor is 1."""
        lock = np.asarray(self.wv.vectors_lockf, dtype=REAL).ravel()
        if lock.size == 0:
            raise ValueError("wv.vectors_lockf is empty: give one factor, or one per word")
        if not np.isfinite(lock).all():
            raise ValueError("wv.vectors_lockf must be finite")
        if (lock == 1).all():
            return None
        return np.ascontiguousarray(lock[np.arange(len(self.wv)) % lock.size])

    def _device_tables(self):
        """The tables as float32 tensors on the device (None for an objective that is off): on the CPU
        views of ``wv.vectors``, ``syn1neg`` and ``syn1`` (training updates them in place, like gensim),
        elsewhere copies written back."""
        shape = (len(self.wv), self.vector_size)
        need = [("wv.vectors", True), ("syn1neg", bool(self.negative)), ("syn1", bool(self.hs))]
        out = []
        for name, used in need:
            arr = self.wv.vectors if name == "wv.vectors" else getattr(self, name)
            if not used:
                out.append(None)
                continue
            if arr is None:
                raise RuntimeError(f"{name} is missing (it is built by build_vocab): train a model whose vocabulary "
                                   "it built, or load one saved with save()")
            if np.shape(arr) != shape:
                raise ValueError(f"{name} has shape {np.shape(arr)}, the vocabulary needs {shape}")
            arr = np.require(arr, np.float32, ["C", "W"])
            if name == "wv.vectors":
                self.wv.vectors = arr
            else:
                setattr(self, name, arr)
            out.append(torch.from_numpy(arr).to(self.device))
        return out

    def train(self, corpus_iterable: Iterable[list[str]] | None = None, corpus_file=None,
              total_examples: int | None = None, total_words: int | None = None, epochs: int | None = None,
              start_alpha: float | None = None, end_alpha: float | None = None, *, report_delay: float = 1.0,
              compute_loss: bool | None = None, callbacks: Iterable = ()) -> tuple[int, int]:
        """Train for ``epochs`` passes over ``corpus_iterable``/``corpus_file`` (gensim's checks: then
        ``epochs`` and one of ``total_examples``/``total_words`` are required, ValueError otherwise), or,
        with neither, over the corpus given to ``build_vocab`` (``epochs`` defaults to ``self.epochs``).
        A given ``epochs`` becomes ``self.epochs``, as in gensim. Words outside the vocabulary are skipped.
        The learning rate decays linearly from ``start_alpha`` (``alpha``) to ``end_alpha`` (``min_alpha``)
        over ``epochs`` x ``total_words`` raw words (or ``total_examples`` sentences), gensim's schedule;
        the corpus is counted as it is read, so for the corpus itself the totals change nothing.
        ``callbacks``: objects with gensim's ``on_train_begin``, ``on_epoch_begin``, ``on_epoch_end``,
        ``on_train_end`` (each called with the model); progress is reported every ``report_delay``
        seconds. gensim's warnings are logged: both objectives on, and an ``alpha`` higher than the last
        training's. Returns (effective words trained, i.e. kept after subsampling, raw words), summed over
        the epochs, as gensim."""
        _check_corpus_args(corpus_iterable, corpus_file)
        given = corpus_iterable is not None or corpus_file is not None
        if not self.hs and not self.negative:
            raise ValueError("You must set either 'hs' or 'negative' to be positive for proper training. "
                             "When both 'hs=0' and 'negative=0', there will be no training.")
        if self.hs and self.negative:
            logger.warning("Both hierarchical softmax and negative sampling are activated. This is probably a "
                           "mistake. You should set either 'hs=0' or 'negative=0' to disable one of them. ")
        alpha, min_alpha = start_alpha or self.alpha, end_alpha or self.min_alpha
        if alpha > self.min_alpha_yet_reached:
            logger.warning("Effective 'alpha' higher than previous training cycles")
        if not self.wv.key_to_index:
            why = getattr(self, "_empty_why", None)
            raise VocabularyError("you must first build vocabulary before training the model" +
                                  (f" ({why})" if why else ""))
        if not len(self.wv.vectors):
            raise RuntimeError("you must initialize vectors before training the model")
        if given and total_words is None and total_examples is None:
            raise ValueError("You must specify either total_examples or total_words, for proper learning-rate and "
                             "progress calculations. If you've just built the vocabulary using the same corpus, "
                             "using the count cached in the model is sufficient: total_examples=model.corpus_count.")
        if given and (epochs is None or epochs <= 0):
            raise ValueError("You must specify an explicit epochs count. The usual value is epochs=model.epochs.")
        if epochs is not None:
            _check_int("epochs", epochs, 1)
            self.epochs = epochs
        _check_int("total_examples", total_examples, 0, optional=True)
        _check_int("total_words", total_words, 0, optional=True)
        self.alpha, self.min_alpha = alpha, min_alpha
        if compute_loss is not None:
            self.compute_loss = compute_loss
        scale = 1.0  # the schedule's length over this corpus's (gensim's totals)
        if given:
            corpus = read_corpus(line_sentences(corpus_file) if corpus_file is not None else corpus_iterable)
            ids, sent = corpus.encode(self.wv.key_to_index)
            ids, sent, raw_words = ids.to(self.device), sent.to(self.device), corpus.raw_words
            if total_words:
                scale = total_words / max(raw_words, 1)
            elif total_examples:
                scale = total_examples / max(corpus.n_sentences, 1)
        elif self._ids is not None:
            ids, sent, raw_words = self._ids, self._sent, self.corpus_total_words
        else:
            raise ValueError("no corpus to train on: pass corpus_iterable or corpus_file (a loaded model, or one "
                             "built with build_vocab_from_freq, does not keep a corpus)")
        lock = self._lockf()
        road = self._road(lock is not None)
        callbacks = list(callbacks)
        self._w_in, self._w_out, self._w_hs = self._device_tables()
        self._ids_train = ids
        self.wv.norms = None
        n_workers = self._n_workers()
        on_cpu = self.device.type == "cpu"
        # the ops are small: intra-op threads cost more than they give (a lot on a loaded machine),
        # so every worker runs its ops inline on one thread; the setting is per thread (OpenMP)
        pool = ThreadPoolExecutor(n_workers, initializer=torch.set_num_threads, initargs=(1,)) \
            if n_workers > 1 else None
        threads = torch.get_num_threads()
        if on_cpu:
            torch.set_num_threads(1)
        lr_total = max(self.epochs * ids.numel() * scale, 1.0)
        for cb in callbacks:
            cb.on_train_begin(self)
        try:
            if road == "minibatch":
                step = self._step_fn()
                with _deterministic_algorithms(self.deterministic and not on_cpu):
                    effective = self._train(self.epochs, step, n_workers, pool, ids, sent, raw_words, callbacks,
                                            report_delay, lr_total)
            else:
                effective = self._train_kernel(road, self.epochs, n_workers, pool, ids, sent, raw_words, callbacks,
                                               report_delay, lr_total, lock)
        finally:
            if pool is not None:
                pool.shutdown()
            if on_cpu:
                torch.set_num_threads(threads)
            if not on_cpu:  # the device copies back into the numpy tables
                for arr, t in ((self.wv.vectors, self._w_in), (self.syn1neg, self._w_out), (self.syn1, self._w_hs)):
                    if t is not None:
                        np.copyto(arr, t.cpu().numpy())
            self._w_in = self._w_out = self._w_hs = self._ids_train = None
            self.wv.norms = None
        done = min(1.0, self.epochs * ids.numel() / lr_total)
        self.min_alpha_yet_reached = max(self.min_alpha, self.alpha - (self.alpha - self.min_alpha) * done)
        self.train_count += 1
        self.total_train_time += self.train_seconds
        for cb in callbacks:
            cb.on_train_end(self)
        return effective, self.epochs * raw_words

    def _train(self, epochs, step, n_workers, pool, ids_all, sent_all, raw_words, callbacks, report_delay,
               lr_total: float) -> int:
        w_in, w_out, gen = self._w_in, self._w_out, self._gen
        n_all = ids_all.numel()
        total = lr_total
        done, loss_acc, loss_pairs, effective = 0, 0.0, 0, 0
        t0 = last = time.perf_counter()
        lr = self.alpha
        self.running_training_loss = 0.0

        def negatives(tgt, g):
            # the fused steps skip a negative equal to the target (word2vec.c); the autograd loss
            # cannot, so it draws negatives that avoid the target instead
            return self._sampler.sample(tgt.numel(), self.negative, exclude=None if self.fused else tgt,
                                        generator=g)

        def work(inp, tgt, lr, g):
            return step(inp, tgt, negatives(tgt, g), w_in, w_out, lr)

        for epoch in range(epochs):
            for cb in callbacks:
                cb.on_epoch_begin(self)
            t_epoch = time.perf_counter()
            keep = torch.rand(n_all, device=self.device, generator=gen) < self._keep[ids_all]
            ids, sent = ids_all[keep], sent_all[keep]
            n = ids.numel()
            effective += n
            # batches cover batch_words corpus words each; their kept words become centres
            n_batches = max(1, math.ceil(n_all / self.batch_words))
            bounds = _batch_bounds(n, n_batches)
            # Pairs and negatives are drawn for a group of batches at once: one host sync (the pair
            # count) per group, not per batch, so a GPU is not left idle while the host prepares
            # each batch. The updates still apply batch by batch, each with its learning rate.
            group = 1 if pool is not None else max(1, self._group_words // self.batch_words)
            for g0 in range(0, n_batches, group):
                g1 = min(n_batches, g0 + group)
                s, e = bounds[g0], bounds[g1]
                offs = [0] * (g1 - g0 + 1)
                if e > s:
                    inp_g, tgt_g, offs = skipgram_pairs(ids, sent, s, e, self.window, gen, bounds[g0:g1 + 1],
                                                        shrink_windows=self.shrink_windows)
                    if pool is None and inp_g.numel():
                        neg_g = negatives(tgt_g, self._worker_gens[0])
                for bi in range(g0, g1):
                    # gensim's schedule: linear in the words processed over all epochs, floored at min_alpha
                    lr = max(self.min_alpha, self.alpha - (self.alpha - self.min_alpha) * (done / total))
                    a, b = offs[bi - g0], offs[bi - g0 + 1]
                    if b > a:
                        loss_pairs += b - a
                        inp, tgt = inp_g[a:b], tgt_g[a:b]
                        if pool is None:
                            loss_acc = loss_acc + step(inp, tgt, neg_g[a:b], w_in, w_out, lr)
                        else:  # Hogwild: workers update the shared tables concurrently
                            parts = zip(inp.chunk(n_workers), tgt.chunk(n_workers), self._worker_gens)
                            futs = [pool.submit(work, x, y, lr, g) for x, y, g in parts]
                            loss_acc = loss_acc + sum(f.result() for f in futs)
                    done = epoch * n_all + min(n_all, (bi + 1) * self.batch_words)
                now = time.perf_counter()
                if self.progress is not None and (now - last >= report_delay or g1 == n_batches):
                    last = now
                    self.progress({"epoch": epoch + 1, "epochs": epochs, "words": done, "total_words": total,
                                   "loss": float(loss_acc) / max(loss_pairs, 1), "lr": lr,
                                   "words_per_s": done / max(now - t0, 1e-9) * raw_words / max(n_all, 1)})
            self.running_training_loss = float(loss_acc)
            elapsed = time.perf_counter() - t_epoch
            logger.info("EPOCH %i: training on %i raw words (%i effective words) took %.1fs, %.0f effective words/s",
                        epoch, raw_words, n, elapsed, n / max(elapsed, 1e-9))
            for cb in callbacks:
                cb.on_epoch_end(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_seconds = time.perf_counter() - t0
        self.trained_words = epochs * raw_words
        self.running_training_loss = float(loss_acc)
        self.mean_pair_loss = float(loss_acc) / max(loss_pairs, 1)
        return effective

    def _train_kernel(self, road, epochs, n_workers, pool, ids_all, sent_all, raw_words, callbacks, report_delay,
                      lr_total: float, lock: np.ndarray | None) -> int:
        """The kernel trainer: per epoch, one kernel call per slice of about ``_slice_words`` corpus words
        (whole chunks); the host only enqueues slices (on CUDA at most two ahead of the device, so the
        progress report is current) and reports progress. The kernel draws everything from the seed and
        the corpus position, so slicing changes nothing but the Hogwild schedule. On the C path a slice
        gets one thread per ``batch_words`` of its words, at most ``workers`` (gensim's jobs)."""
        dev, on_cuda = self.device, self.device.type == "cuda"
        n_all = ids_all.numel()
        bounds_np = chunk_bounds(sent_all.cpu().numpy(), self._chunk_words)
        n_chunks = len(bounds_np) - 1
        firsts = np.searchsorted(bounds_np[:-1], np.arange(0, max(n_all, 1), self._slice_words))
        cuts = np.unique(np.r_[firsts, n_chunks]).tolist()
        slices = list(zip(cuts[:-1], cuts[1:]))
        # a loaded model continues with fresh random streams, not the ones its first training used
        seed = (self.seed + 1_000_003 * self.train_count) % (1 << 63)
        kw = dict(seed=seed, lr_start=self.alpha, lr_end=self.min_alpha, total_words=float(lr_total),
                  window=self.window, negative=self.negative, sg=bool(self.sg), cbow_mean=bool(self.cbow_mean),
                  shared_negatives=self.shared_negatives, shrink_windows=self.shrink_windows)
        aprob, alias = self._sampler._alias_prob.float(), self._sampler._alias.to(torch.int32)
        # the loss costs the C path a fifth of its time: computed there when asked for or shown (gensim
        # computes it only with compute_loss)
        want_loss = road != "c" or bool(self.compute_loss or self.progress is not None)
        hs_np = self._hs if self.hs else None
        if road == "triton":
            from ..kernels.word2vec import word2vec_train

            tokens = ids_all.to(torch.int32)
            bounds = torch.from_numpy(bounds_np).to(dev)
            kept = torch.empty(max(n_all, 1), dtype=torch.int32, device=dev)  # the kernel's scratch
            stats = torch.zeros(3, dtype=torch.float64, device=dev)
            extra = {"lockf": None if lock is None else torch.from_numpy(lock).to(dev)}
            if hs_np is not None:
                off, pts, cds = (torch.from_numpy(a).to(dev) for a in hs_np)
                extra.update(w_hs=self._w_hs, hs_off=off, hs_points=pts, hs_codes=cds,
                             max_code=int(np.diff(hs_np[0]).max(initial=0)))
        else:
            tokens = ids_all.cpu().numpy().astype(np.int32)
            arrays = dict(keep_prob=self._keep.cpu().numpy(), alias_prob=aprob.cpu().numpy(),
                          alias=alias.cpu().numpy())
            w_in = self._w_in.numpy()
            w_out = self._w_out.numpy() if self._w_out is not None else None
            extra = {"lockf": lock}
            if hs_np is not None:
                extra.update(w_hs=self._w_hs.numpy(), hs_off=hs_np[0], hs_points=hs_np[1], hs_codes=hs_np[2])
            stats = np.zeros(3)
            fn = _cpu.load() if road == "c" else None
            max_chunk = int(np.diff(bounds_np).max(initial=0))

        def run_slice(ca, cb, pos_base):
            nonlocal stats
            if road == "triton":
                st = word2vec_train(tokens, bounds, kept, self._keep, aprob, alias, self._w_in, self._w_out, c0=ca,
                                    n_chunks=cb - ca, grid=cb - ca, pos_base=pos_base, write_back=self._write_back,
                                    deterministic=self.deterministic, num_warps=self._num_warps, **kw, **extra)
                stats += st.sum(0)
            elif road == "c":
                # gensim's jobs: one thread per batch_words words of the slice, at most n_workers
                n_threads = max(1, min(n_workers, -(-int(bounds_np[cb] - bounds_np[ca]) // self.batch_words)))

                def part(w):
                    return _cpu.train_chunks(fn, tokens, bounds_np, ca + w, cb, n_threads, arrays["keep_prob"],
                                             arrays["alias_prob"], arrays["alias"], w_in, w_out, pos_base=pos_base,
                                             max_chunk=max_chunk, want_loss=want_loss, **kw, **extra)
                stats = stats + (sum(f.result() for f in [pool.submit(part, w) for w in range(n_threads)])
                                 if pool is not None and n_threads > 1 else part(0))
            else:
                stats = stats + train_chunks_reference(tokens, bounds_np, range(ca, cb), arrays["keep_prob"],
                                                       arrays["alias_prob"], arrays["alias"], w_in, w_out,
                                                       pos_base=pos_base, **kw, **extra)

        def host_stats():  # [loss, pairs, kept words] so far (a device sync on CUDA)
            return stats.tolist()

        t0 = last = time.perf_counter()
        queued: list = []
        self.running_training_loss = 0.0
        kept_before = 0.0
        for epoch in range(epochs):
            for cb_ in callbacks:
                cb_.on_epoch_begin(self)
            t_epoch = time.perf_counter()
            pos_base = epoch * n_all
            for si, (ca, cb) in enumerate(slices):
                run_slice(ca, cb, pos_base)
                if on_cuda:  # at most two slices queued ahead of the device
                    ev = torch.cuda.Event()
                    ev.record()
                    queued.append(ev)
                    if len(queued) > 2:
                        queued.pop(0).synchronize()
                now = time.perf_counter()
                if self.progress is not None and (now - last >= report_delay or si == len(slices) - 1):
                    last = now
                    done = pos_base + int(bounds_np[cb])
                    loss, pairs, _ = host_stats()
                    lr = max(self.min_alpha, self.alpha - (self.alpha - self.min_alpha) * done / lr_total)
                    self.progress({"epoch": epoch + 1, "epochs": epochs, "words": done, "total_words": epochs * n_all,
                                   "loss": loss / max(pairs, 1), "lr": lr,
                                   "words_per_s": done / max(now - t0, 1e-9) * raw_words / max(n_all, 1)})
            loss, pairs, kept_total = host_stats()
            self.running_training_loss = loss
            elapsed = time.perf_counter() - t_epoch
            n_kept = kept_total - kept_before
            logger.info("EPOCH %i: training on %i raw words (%i effective words) took %.1fs, %.0f effective words/s",
                        epoch, raw_words, n_kept, elapsed, n_kept / max(elapsed, 1e-9))
            kept_before = kept_total
            for cb_ in callbacks:
                cb_.on_epoch_end(self)
        if on_cuda:
            torch.cuda.synchronize(dev)
        self.train_seconds = time.perf_counter() - t0
        self.trained_words = epochs * raw_words
        loss, pairs, kept_total = host_stats()
        self.running_training_loss = loss
        self.mean_pair_loss = loss / max(pairs, 1) if want_loss else float("nan")
        return int(kept_total)

    def get_latest_training_loss(self) -> float:
        """The summed loss of the pairs (CBOW: of the centre words) trained so far in the latest ``train``
        call, updated per epoch; 0 on the kernel trainer's CPU path unless ``compute_loss`` or ``progress``."""
        return self.running_training_loss

    # ----------------------------------------------------------------------------- saving
    def save(self, fname, separately=None, sep_limit: int = 10 * 1024**2) -> None:
        """Write the model (settings, vocabulary with counts and downsampling, the tables, training state)
        to ``fname``: an .npz with a JSON header, no pickle. Arrays of ``sep_limit`` bytes or more (or those
        named in ``separately``: "vectors", "syn1neg", "syn1", ...) go to ``{fname}.{name}.npy`` files beside
        it, as gensim's ``save``, which ``load(fname, mmap="r")`` maps. ``Word2Vec.load(fname)`` reads it back
        and can train on; the corpus is not saved (pass one to ``train``)."""
        if not len(self.wv.vectors):
            raise ValueError("nothing to save: build the vocabulary (or train) first")
        meta = {"params": {k: _plain(getattr(self, k)) for k in _PARAMS},
                "state": {k: _plain(getattr(self, k)) for k in _STATE},
                "index_to_key": self.wv.index_to_key, "device": str(self.device)}
        arrays = {"vectors": self.wv.vectors, "syn1neg": self.syn1neg, "syn1": self.syn1,
                  "count": np.asarray(self.wv.expandos["count"], dtype=np.int64),
                  "keep": np.asarray(self._keep_prob, dtype=np.float64),
                  "vectors_lockf": np.asarray(self.wv.vectors_lockf, dtype=REAL)}
        save_npz(fname, "Word2Vec", meta, arrays, separately, sep_limit)

    @_ClassOnly
    def load(cls, fname, mmap: str | None = None, device=None) -> Word2Vec:
        """A model written by ``save``, on ``device`` (default: CUDA when available); ``mmap="r"`` maps the
        arrays saved in their own files (read-only until training copies them). A file of another class
        raises gensim's AttributeError (a ``WrongModelTypeError``, also a TypeError); a gensim pickle
        is refused (convert it with ``from_gensim``). Called on an instance, AttributeError (gensim's)."""
        meta, arrays = load_npz(fname, "Word2Vec", mmap)
        model = cls(**meta["params"], device=device)
        for k, v in meta["state"].items():
            setattr(model, k, v)
        model.wv = KeyedVectors._from_arrays(meta["index_to_key"], arrays["vectors"], arrays["count"])
        model.wv.vectors_lockf = arrays.get("vectors_lockf", np.ones(1, dtype=REAL))
        model.syn1neg, model.syn1 = arrays.get("syn1neg"), arrays.get("syn1")
        keep = arrays.get("keep")
        if keep is None:  # files of embedattn 0.1 (no downsampling stored): recomputed from the counts
            keep = _keep_probs(arrays["count"], model.sample, float(arrays["count"].sum()))
        model._keep_prob = np.array(keep, dtype=np.float64)  # a copy: a map is read-only
        model.wv.expandos["sample_int"] = (model._keep_prob * (2**32 - 1)).astype(np.uint32)
        model._init_sampling()
        return model

    # ----------------------------------------------------------------------------- gensim, in memory
    @classmethod
    def from_gensim(cls, model, *, device=None, backend: str | None = None) -> Word2Vec:
        """An embedattn model equal to gensim's ``model`` (a ``gensim.models.Word2Vec``, e.g. one loaded
        with gensim's own ``Word2Vec.load``): its settings, vocabulary in its order with counts,
        downsampling and Huffman tree, vectors, output tables, ``vectors_lockf`` and training state,
        copied in memory (nothing is unpickled here). It trains on with embedattn's kernels."""
        params = {k: getattr(model, k) for k in _GENSIM_PARAMS if hasattr(model, k)}
        workers = getattr(model, "workers", None)
        m = cls(**params, workers=workers if isinstance(workers, int) and workers > 0 else None, device=device,
                backend=backend)
        gwv = model.wv
        counts = np.array([gwv.get_vecattr(i, "count") for i in range(len(gwv))], dtype=np.int64)
        m.wv = KeyedVectors._from_arrays(list(gwv.index_to_key), np.array(gwv.vectors, dtype=REAL), counts)
        m.wv.vectors_lockf = np.array(getattr(gwv, "vectors_lockf", np.ones(1)), dtype=REAL)
        if "sample_int" in gwv.expandos:
            m._keep_prob = np.asarray(gwv.expandos["sample_int"], dtype=np.float64) / (2**32 - 1)
        else:
            m._keep_prob = _keep_probs(counts, m.sample, float(counts.sum()))
        m.wv.expandos["sample_int"] = (m._keep_prob * (2**32 - 1)).astype(np.uint32)
        m.syn1neg = np.array(model.syn1neg, dtype=REAL) if m.negative and hasattr(model, "syn1neg") else None
        m.syn1 = np.array(model.syn1, dtype=REAL) if m.hs and hasattr(model, "syn1") else None
        for k in _STATE:
            v = getattr(model, k, None)
            if v is not None:
                setattr(m, k, type(getattr(m, k))(v))
        m._init_sampling()
        if m.hs and "code" in gwv.expandos:  # the tree is gensim's by construction; its rows index syn1
            same = all(np.array_equal(m.wv.expandos["point"][i], gwv.expandos["point"][i]) for i in range(len(m.wv)))
            if not same:
                raise ValueError("this gensim model's Huffman tree differs from the one its counts give: syn1's rows "
                                 "would not match; retrain from its vocabulary instead")
        return m

    def to_gensim(self):
        """This model as a ``gensim.models.Word2Vec`` (gensim installed), copied in memory: settings,
        vocabulary and counts, downsampling, Huffman tree and negative-sampling table (gensim's own,
        rebuilt from the counts, which gives the same tree), vectors, output tables, ``vectors_lockf``
        and training state; gensim can query it, save it and train on."""
        try:
            from gensim.models import Word2Vec as GensimWord2Vec
        except ImportError as e:
            raise ImportError("to_gensim needs gensim (pip install gensim)") from e
        if not len(self.wv.vectors):
            raise ValueError("nothing to convert: build the vocabulary (or train) first")
        params = {k: getattr(self, k) for k in _GENSIM_PARAMS}
        g = GensimWord2Vec(**params, workers=self.workers or 3)
        kv = g.wv
        kv.index_to_key = list(self.wv.index_to_key)
        kv.key_to_index = {k: i for i, k in enumerate(kv.index_to_key)}
        kv.next_index = len(kv.index_to_key)
        kv.vectors = np.array(self.wv.vectors, dtype=REAL)
        kv.expandos = {}
        kv.allocate_vecattrs(attrs=["count", "sample_int"], types=[np.int64, np.uint32])
        kv.expandos["count"][:] = self.wv.expandos["count"]
        kv.expandos["sample_int"][:] = (self._keep_prob * (2**32 - 1)).astype(np.uint32)
        kv.vectors_lockf = np.array(self.wv.vectors_lockf, dtype=REAL)
        kv.norms = None
        if self.hs:
            g.create_binary_tree()
            g.syn1 = np.array(self.syn1, dtype=REAL)
        if self.negative:
            g.make_cum_table()
            g.syn1neg = np.array(self.syn1neg, dtype=REAL)
        for k in _STATE:
            setattr(g, k, getattr(self, k))
        return g

    # ----------------------------------------------------------------------------- queries
    def predict_output_word(self, context_words_list, topn: int = 10):
        """The ``topn`` most probable centre words for the context words (keys or indices), with their
        probabilities under the negative-sampling output layer: softmax of syn1neg @ (mean, or sum, of the
        context vectors), as gensim. None (and a warning) when no context word is in the vocabulary."""
        if not self.negative:
            raise RuntimeError("We have currently only implemented predict_output_word for the negative sampling "
                               "scheme, so you need to have run word2vec with negative > 0 for this to work.")
        if self.syn1neg is None or not len(self.wv.vectors):
            raise RuntimeError("Parameters required for predicting the output words not found.")
        idx = [self.wv.get_index(w) for w in context_words_list if w in self.wv]
        if not idx:
            logger.warning("All the input context words are out-of-vocabulary for the current model.")
            return None
        l1 = np.sum(self.wv.vectors[idx], axis=0)
        if self.cbow_mean:
            l1 /= len(idx)
        prob = np.exp(np.dot(l1, self.syn1neg.T))
        prob /= np.sum(prob)
        return [(self.wv.index_to_key[i], prob[i]) for i in _argsort(prob, topn=topn, reverse=True)]

    def score(self, sentences: Iterable[list[str]], total_sentences: int = int(1e6)) -> np.ndarray:
        """The log probability of each sentence under the hierarchical-softmax output layer (Taddy,
        "Document Classification by Inversion of Distributed Language Representations", as gensim's
        ``score``): CBOW sums log P(word | its full window), skip-gram log P(word | each window word).
        Words outside the vocabulary are skipped; at most ``total_sentences`` sentences. float32 array."""
        if not len(self.wv.vectors):
            raise RuntimeError("you must first build vocabulary before scoring new data")
        if not self.hs or self.syn1 is None:
            raise RuntimeError("We have currently only implemented score for the hierarchical softmax scheme, so "
                               "you need to have run word2vec with hs=1 and negative=0 for this to work.")
        off, pts, cds = self._hs
        vec, syn1 = self.wv.vectors.astype(np.float64), self.syn1.astype(np.float64)
        scores = []
        for n, sentence in enumerate(sentences):
            if n >= total_sentences:
                break
            ids = [self.wv.key_to_index[w] for w in sentence if w in self.wv.key_to_index][:10000]
            total = 0.0
            for i, w in enumerate(ids):
                sl = slice(off[w], off[w + 1])
                sign = 1.0 - 2.0 * cds[sl]  # code 0: log sigmoid(f), code 1: log sigmoid(-f)
                ctx = [ids[j] for j in range(max(0, i - self.window), min(len(ids), i + self.window + 1)) if j != i]
                if not ctx:
                    continue
                if self.sg:
                    total += _log_sigmoid((vec[ctx] @ syn1[pts[sl]].T) * sign).sum()
                else:
                    h = vec[ctx].sum(0) / (len(ctx) if self.cbow_mean else 1)
                    total += _log_sigmoid((syn1[pts[sl]] @ h) * sign).sum()
            scores.append(total)
        return np.array(scores, dtype=REAL)

    def most_similar(self, *args, **kwargs):
        """``wv.most_similar`` (gensim 4 keeps queries on ``wv``; this shortcut stays for convenience)."""
        return self.wv.most_similar(*args, **kwargs)

    def evaluate_word_pairs(self, *args, **kwargs) -> WordPairsResult:
        return self.wv.evaluate_word_pairs(*args, **kwargs)

    def save_word2vec_format(self, *args, **kwargs) -> None:
        self.wv.save_word2vec_format(*args, **kwargs)


def print_progress(info: dict, stream=None) -> None:
    """A one-line progress bar (``progress=True``, the CLI's): epoch, % done, words/s, mean pair loss,
    current learning rate."""
    stream = sys.stderr if stream is None else stream
    frac = info["words"] / max(info["total_words"], 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    stream.write(f"\repoch {info['epoch']}/{info['epochs']} [{bar}] {100 * frac:5.1f}%  "
                 f"{info['words_per_s']:,.0f} words/s  loss {info['loss']:.4f}  lr {info['lr']:.6f}")
    if info["words"] >= info["total_words"]:
        stream.write("\n")
    stream.flush()
