"""``Word2Vec``: skip-gram and CBOW with negative sampling, gensim's argument names, defaults and methods."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._backend import resolve
from ..negative_sampling import UnigramSampler
from . import _cpu
from ._corpus import line_sentences, prepare_vocab, read_corpus, scan_vocab
from ._keyedvectors import KeyedVectors, WordPairsResult, load_npz, save_npz
from ._train import (
    CompiledStep,
    autograd_sgns_step,
    chunk_bounds,
    keep_probability,
    skipgram_pairs,
    torch_sgns_step,
    train_chunks_reference,
)

logger = logging.getLogger(__name__)

# the settings save() keeps and load() passes back to the constructor
_PARAMS = ("vector_size", "window", "negative", "min_count", "sample", "alpha", "min_alpha", "epochs",
           "ns_exponent", "max_vocab_size", "max_final_vocab", "sorted_vocab", "batch_words", "shrink_windows",
           "compute_loss", "seed", "workers", "backend", "fused", "compile", "in_flight", "deterministic", "sg",
           "cbow_mean", "trainer", "shared_negatives")
_TRAINERS = (None, "kernel", "minibatch")
_STATE = ("effective_min_count", "corpus_count", "corpus_total_words", "train_count", "total_train_time",
          "running_training_loss")


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


class Word2Vec:
    """word2vec with negative sampling (skip-gram, or CBOW with ``sg=0``) on embedattn's kernels, gensim's API.

    Arguments follow gensim's ``Word2Vec`` (skip-gram is the default here, gensim's is CBOW: pass ``sg``
    explicitly to get the same model from both): give ``sentences`` (an iterable of token lists; a
    one-pass generator is fine) or ``corpus_file`` (one sentence per line, UTF-8; .bz2/.gz fine) and
    training runs in the constructor; or call ``build_vocab`` and ``train`` yourself. The vocabulary is
    gensim's: counted with ``max_vocab_size`` pruning during the scan, cut at ``min_count`` (raised by
    ``max_final_vocab``) and ``trim_rule``, sorted by descending count with equal counts in gensim's
    order. The learning rate decays linearly from ``alpha`` to ``min_alpha`` with the words processed,
    over all epochs of a ``train`` call. ``wv`` (a ``KeyedVectors``) holds the vectors as a numpy
    array, ``syn1neg`` the output table. Hierarchical softmax is not implemented (``hs=0``).
    ``cbow_mean`` (CBOW): train on the mean of the context vectors (1, gensim's default) or their sum.
    The training loss (``get_latest_training_loss``, ``mean_pair_loss``) is computed on the GPU and by the
    minibatch trainer always, by the kernel trainer's CPU path only with ``compute_loss=True`` or
    ``progress`` (it costs a fifth of the time there; gensim computes it only with ``compute_loss``).

    Two trainers (``trainer``; None picks ``"kernel"`` unless ``fused=False`` or ``in_flight`` asks for
    the minibatch one):

    - ``"kernel"``: word2vec.c's algorithm in one kernel call per slice of about 1M corpus words (the
      Triton kernel ``kernels/word2vec.py`` on CUDA; on the CPU the same algorithm in C, built once
      with the system compiler, run by ``workers`` threads). Subsampling, dynamic windows and negative
      draws happen inside; each sentence (cut into pieces of at most 10000 words, gensim's limit, or
      1000 on a GPU, word2vec.c's, for parallelism) is walked word by word, sequential SGD within it,
      Hogwild across sentences. ``shared_negatives=True`` draws one set
      of negatives per centre word for its whole window (skip-gram; Wombat / word2vec-acc's reuse:
      less memory traffic, slightly different updates). Skip-gram and CBOW. ``batch_words`` is unused.
    - ``"minibatch"`` (skip-gram only): pairs and negatives drawn for ``batch_words`` words at a time,
      updates applied 256 pairs at a time from one snapshot: ``fused=True`` with the fused step (Triton
      ``sgns_step`` on CUDA; on the CPU chunked PyTorch, torch.compile'd when ``compile`` allows, None:
      when epochs x corpus words >= 1M, as compiling costs ~10-30 s once), ``fused=False`` with the
      autograd ``negative_sampling_loss`` + SGD; ``in_flight`` (fused Triton): one Hogwild launch per
      batch with about that many pairs in flight.

    embedattn's own arguments: ``device`` (default CUDA when available); ``backend`` as everywhere in
    embedattn (None: Triton on CUDA, the CPU path elsewhere; ``"triton"`` on the CPU runs the kernel
    through Triton's interpreter, for tests). ``workers`` (CPU, default min(2, torch.get_num_threads()))
    threads train concurrently, Hogwild like gensim's workers. ``progress``: True shows a progress bar
    on stderr (words/s, loss, learning rate), a callable gets the same numbers as a dict; epochs are
    also logged at INFO level like gensim's.

    Determinism: ``deterministic=True`` gives the same vectors bit for bit for the same ``seed`` on the
    same device (for tests): the kernel trainer with one program (one thread), the minibatch trainer
    with the PyTorch step. On the CPU ``workers=1`` alone is enough (gensim's advice too); more
    workers (or GPU programs) update the tables Hogwild, in an order that varies run to run.
    """

    def __init__(self, sentences: Iterable[list[str]] | None = None, *, corpus_file=None,
                 vector_size: int = 100, window: int = 5, negative: int = 5, min_count: int = 5,
                 sample: float = 1e-3, alpha: float = 0.025, min_alpha: float = 1e-4, epochs: int = 5,
                 ns_exponent: float = 0.75, max_vocab_size: int | None = None, max_final_vocab: int | None = None,
                 trim_rule: Callable | None = None, sorted_vocab: int = 1, batch_words: int = 10000,
                 shrink_windows: bool = True, sg: int = 1, hs: int = 0, cbow_mean: int = 1,
                 compute_loss: bool = False, callbacks: Iterable = (), seed: int = 0, workers: int | None = None,
                 device=None, backend: str | None = None, trainer: str | None = None,
                 shared_negatives: bool = False, fused: bool = True, compile: bool | None = None,
                 in_flight: int | None = None, deterministic: bool = False,
                 progress: bool | Callable[[dict], None] | None = None) -> None:
        if sg not in (0, 1):
            raise ValueError(f"sg must be 1 (skip-gram) or 0 (CBOW), got {sg!r}")
        if hs:
            raise ValueError("hierarchical softmax is not implemented: hs must be 0 (negative sampling)")
        if trainer not in _TRAINERS:
            raise ValueError(f"trainer must be one of {_TRAINERS}, got {trainer!r}")
        for name, val, lo in (("vector_size", vector_size, 1), ("window", window, 1), ("negative", negative, 1),
                              ("min_count", min_count, 0), ("epochs", epochs, 1), ("batch_words", batch_words, 1)):
            _check_int(name, val, lo)
        _check_int("max_vocab_size", max_vocab_size, 0, optional=True)
        _check_int("max_final_vocab", max_final_vocab, 1, optional=True)
        _check_int("workers", workers, 1, optional=True)
        _check_int("in_flight", in_flight, 1, optional=True)
        eff = trainer or ("minibatch" if (not fused or in_flight is not None) else "kernel")
        if eff == "minibatch" and not sg:
            raise ValueError("CBOW (sg=0) is trained by the kernel trainer only, not trainer='minibatch' "
                             "(fused=False and in_flight select the minibatch trainer)")
        if eff == "kernel" and (not fused or in_flight is not None):
            raise ValueError("fused=False and in_flight are options of trainer='minibatch'")
        if shared_negatives and (eff != "kernel" or not sg):
            raise ValueError("shared_negatives is an option of the kernel trainer's skip-gram")
        if deterministic and (workers or 1) > 1:
            raise ValueError(f"deterministic=True trains with one worker, not workers={workers}")
        if deterministic and backend == "triton" and eff == "minibatch":
            raise ValueError("deterministic=True runs the minibatch trainer's PyTorch step: the Triton step's atomic "
                             "adds land in a varying order (use backend=None or 'reference', or trainer='kernel')")
        if sample < 0 or alpha <= 0 or min_alpha < 0:
            raise ValueError("sample and min_alpha must be >= 0 and alpha > 0")
        _check_corpus_args(sentences, corpus_file)
        self.vector_size, self.window, self.negative, self.min_count = vector_size, window, negative, min_count
        self.sample, self.alpha, self.min_alpha, self.epochs = sample, alpha, min_alpha, epochs
        self.ns_exponent, self.max_vocab_size, self.max_final_vocab = ns_exponent, max_vocab_size, max_final_vocab
        self.sorted_vocab, self.batch_words, self.shrink_windows = sorted_vocab, batch_words, shrink_windows
        self.sg, self.hs, self.cbow_mean, self.compute_loss = int(sg), 0, int(cbow_mean), compute_loss
        self.trainer, self.shared_negatives = trainer, bool(shared_negatives)
        self.seed, self.backend, self.fused, self.workers, self.in_flight = seed, backend, fused, workers, in_flight
        self.deterministic = deterministic
        self.progress = print_progress if progress is True else (progress or None)
        self.compile, self.compile_seconds = compile, 0.0
        self.device = resolve_device(device)
        # a backend that cannot run here fails now, not after the vocabulary pass
        resolve(backend, torch.empty(0, device=self.device), op="negative_sampling", dtype=torch.float32)
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
        self.wv: KeyedVectors | None = None
        self.syn1neg: np.ndarray | None = None
        self.raw_vocab: dict[str, int] = {}
        self.effective_min_count = min_count
        self.corpus_count = self.corpus_total_words = 0
        self.train_count, self.total_train_time = 0, 0.0
        self.running_training_loss = self.mean_pair_loss = 0.0
        self.train_seconds, self.trained_words = 0.0, 0
        self._ids = self._sent = None  # the corpus given to build_vocab, encoded, on the device
        if sentences is not None or corpus_file is not None:
            self.build_vocab(sentences, corpus_file=corpus_file, trim_rule=trim_rule)
            self.train(epochs=self.epochs, callbacks=callbacks)

    def __str__(self) -> str:
        n = len(self.wv) if self.wv is not None else 0
        return f"{self.__class__.__name__}<vocab={n}, vector_size={self.vector_size}, alpha={self.alpha}>"

    __repr__ = __str__

    # ----------------------------------------------------------------------------- vocabulary
    def build_vocab(self, corpus_iterable: Iterable[list[str]] | None = None, corpus_file=None, update: bool = False,
                    progress_per: int = 10000, keep_raw_vocab: bool = False, trim_rule: Callable | None = None) -> None:
        """Read the corpus once: count the words (gensim's scan, ``max_vocab_size`` pruning included),
        keep those that pass ``min_count``/``max_final_vocab``/``trim_rule``, initialise the tables,
        and keep the corpus (as ids) for ``train()`` without arguments. ``raw_vocab`` keeps the raw
        counts when ``keep_raw_vocab``; ``progress_per`` is accepted for gensim compatibility."""
        if update:
            raise NotImplementedError("build_vocab(update=True) (growing a trained vocabulary) is not implemented")
        _check_corpus_args(corpus_iterable, corpus_file)
        if corpus_iterable is None and corpus_file is None:
            raise TypeError("Either one of corpus_file or corpus_iterable value must be provided")
        corpus = read_corpus(line_sentences(corpus_file) if corpus_file is not None else corpus_iterable)
        if corpus.raw_words == 0:
            raise ValueError("the corpus is empty: no words to train on")
        raw = scan_vocab(corpus, self.max_vocab_size, trim_rule)
        self.corpus_count, self.corpus_total_words = corpus.n_sentences, corpus.raw_words
        self._prepare_vocab(raw, trim_rule, keep_raw_vocab)
        ids, sent = corpus.encode(self.wv.key_to_index)
        self._ids, self._sent = ids.to(self.device), sent.to(self.device)

    def build_vocab_from_freq(self, word_freq: dict[str, int], keep_raw_vocab: bool = False,
                              corpus_count: int | None = None, trim_rule: Callable | None = None,
                              update: bool = False) -> None:
        """The vocabulary from ``{word: count}`` (gensim's); ``train`` then needs a corpus argument."""
        if update:
            raise NotImplementedError("build_vocab_from_freq(update=True) is not implemented")
        self.corpus_count = corpus_count or 0
        self.corpus_total_words = int(sum(word_freq.values()))
        self._prepare_vocab(dict(word_freq), trim_rule, keep_raw_vocab)
        self._ids = self._sent = None

    def _prepare_vocab(self, raw: dict[str, int], trim_rule, keep_raw_vocab: bool) -> None:
        words, counts, self.effective_min_count = prepare_vocab(raw, self.min_count, self.max_final_vocab,
                                                                trim_rule, bool(self.sorted_vocab))
        if not words:
            top = max(raw.values(), default=0)
            raise ValueError(f"the vocabulary is empty: no word occurs min_count={self.effective_min_count} times "
                             f"or more (most frequent: {top} times); lower min_count")
        self.raw_vocab = raw if keep_raw_vocab else {}
        V, D = len(words), self.vector_size
        gen = torch.Generator().manual_seed(self.seed)
        # gensim's init (prep_vectors: uniform in [-1/D, 1/D); word2vec.c's is half as wide): CBOW's WordSim-353
        # on head500 gains ~0.01 with it
        vectors = torch.empty(V, D).uniform_(-1.0 / D, 1.0 / D, generator=gen).numpy()
        self.wv = KeyedVectors._from_arrays(words, vectors, counts)
        self.syn1neg = np.zeros((V, D), dtype=np.float32)
        self._init_sampling()

    def _init_sampling(self) -> None:
        counts = torch.from_numpy(np.asarray(self.wv.expandos["count"], dtype=np.int64))
        self._sampler = UnigramSampler(counts, self.ns_exponent, device=self.device)
        self._keep = keep_probability(counts, self.sample).float().to(self.device)
        # a loaded model continues with fresh random streams, not the ones its first training used
        seed = self.seed + 1_000_003 * self.train_count
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self._worker_gens = [torch.Generator(device=self.device).manual_seed(seed + 1 + i)
                             for i in range(self._n_workers())]

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

    def _road(self) -> str:
        """How ``train`` runs here: ``"triton"`` (the kernel trainer's Triton kernel: CUDA, or the CPU
        interpreter with backend='triton'), ``"c"`` (its CPU path), ``"numpy"`` (its NumPy reference,
        where C cannot be built: slow) or ``"minibatch"``."""
        want = self.trainer or ("minibatch" if (not self.fused or self.in_flight is not None) else None)
        if want == "minibatch":
            return "minibatch"
        be = resolve(self.backend, torch.empty(0, device=self.device), op="negative_sampling", dtype=torch.float32)
        if be == "triton":
            return "triton"
        if self.device.type == "cpu" and _cpu.load() is not None:
            return "c"
        if want is None and self.sg:  # the kernel cannot run here: the minibatch trainer's PyTorch step
            return "minibatch"
        if self.device.type == "cpu":
            import warnings

            warnings.warn("word2vec: no C compiler for the kernel trainer's CPU path; training with its NumPy "
                          "reference (slow)", stacklevel=3)
            return "numpy"
        raise ValueError(f"the kernel trainer on {self.device} runs the Triton kernel, and backend={self.backend!r} "
                         "resolves to the reference: use backend=None/'triton', or trainer='minibatch' (skip-gram)")

    def _n_workers(self) -> int:
        be = resolve(self.backend, torch.empty(0, device=self.device), op="negative_sampling", dtype=torch.float32)
        if self.device.type != "cpu" or be != "reference":
            return 1  # Triton's CPU interpreter patches global state per launch: one thread only
        if self.deterministic:
            return 1
        return self.workers if self.workers is not None else max(1, min(2, torch.get_num_threads()))

    def _device_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables as float32 tensors on the device: on the CPU views of ``wv.vectors`` and
        ``syn1neg`` (training updates them in place, like gensim), elsewhere copies written back."""
        shape = (len(self.wv), self.vector_size)
        for name, arr in (("wv.vectors", self.wv.vectors), ("syn1neg", self.syn1neg)):
            if np.shape(arr) != shape:
                raise ValueError(f"{name} has shape {np.shape(arr)}, the vocabulary needs {shape}")
        self.wv.vectors = np.require(self.wv.vectors, np.float32, ["C", "W"])
        self.syn1neg = np.require(self.syn1neg, np.float32, ["C", "W"])
        return (torch.from_numpy(self.wv.vectors).to(self.device),
                torch.from_numpy(self.syn1neg).to(self.device))

    def train(self, corpus_iterable: Iterable[list[str]] | None = None, corpus_file=None,
              total_examples: int | None = None, total_words: int | None = None, epochs: int | None = None,
              start_alpha: float | None = None, end_alpha: float | None = None, *, report_delay: float = 1.0,
              compute_loss: bool | None = None, callbacks: Iterable = ()) -> tuple[int, int]:
        """Train for ``epochs`` passes (default ``self.epochs``; given, it becomes ``self.epochs`` as in
        gensim) over ``corpus_iterable``/``corpus_file``, or, with neither, over the corpus given to
        ``build_vocab``. Words outside the vocabulary are skipped. The learning rate decays linearly
        from ``start_alpha`` (``alpha``) to ``end_alpha`` (``min_alpha``) with the words processed;
        the corpus is counted as it is read, so ``total_examples``/``total_words`` are accepted for
        gensim compatibility but not needed. ``callbacks``: objects with gensim's ``on_train_begin``,
        ``on_epoch_begin``, ``on_epoch_end``, ``on_train_end`` (each called with the model); progress
        is reported every ``report_delay`` seconds. Returns (effective words trained, i.e. kept after
        subsampling, raw words), summed over the epochs, as gensim."""
        if self.wv is None:
            raise RuntimeError("you must first build vocabulary before training the model")
        _check_corpus_args(corpus_iterable, corpus_file)
        if epochs is not None:
            _check_int("epochs", epochs, 1)
            self.epochs = epochs
        self.alpha = start_alpha or self.alpha
        self.min_alpha = end_alpha or self.min_alpha
        if compute_loss is not None:
            self.compute_loss = compute_loss
        if corpus_iterable is not None or corpus_file is not None:
            corpus = read_corpus(line_sentences(corpus_file) if corpus_file is not None else corpus_iterable)
            ids, sent = corpus.encode(self.wv.key_to_index)
            ids, sent, raw_words = ids.to(self.device), sent.to(self.device), corpus.raw_words
        elif self._ids is not None:
            ids, sent, raw_words = self._ids, self._sent, self.corpus_total_words
        else:
            raise ValueError("no corpus to train on: pass corpus_iterable or corpus_file (a loaded model, or one "
                             "built with build_vocab_from_freq, does not keep a corpus)")
        callbacks = list(callbacks)
        self._w_in, self._w_out = self._device_tables()
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
        for cb in callbacks:
            cb.on_train_begin(self)
        try:
            road = self._road()
            if road == "minibatch":
                step = self._step_fn()
                with _deterministic_algorithms(self.deterministic and not on_cpu):
                    effective = self._train(self.epochs, step, n_workers, pool, ids, sent, raw_words, callbacks,
                                            report_delay)
            else:
                effective = self._train_kernel(road, self.epochs, n_workers, pool, ids, sent, raw_words, callbacks,
                                               report_delay)
        finally:
            if pool is not None:
                pool.shutdown()
            if on_cpu:
                torch.set_num_threads(threads)
            if not on_cpu:  # the device copies back into the numpy tables
                np.copyto(self.wv.vectors, self._w_in.cpu().numpy())
                np.copyto(self.syn1neg, self._w_out.cpu().numpy())
            self._w_in = self._w_out = self._ids_train = None
            self.wv.norms = None
        self.train_count += 1
        self.total_train_time += self.train_seconds
        for cb in callbacks:
            cb.on_train_end(self)
        return effective, self.epochs * raw_words

    def _train(self, epochs, step, n_workers, pool, ids_all, sent_all, raw_words, callbacks, report_delay) -> int:
        w_in, w_out, gen = self._w_in, self._w_out, self._gen
        n_all = ids_all.numel()
        total = max(epochs * n_all, 1)
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

    def _train_kernel(self, road, epochs, n_workers, pool, ids_all, sent_all, raw_words, callbacks,
                      report_delay) -> int:
        """The kernel trainer: per epoch, one kernel call per slice of about ``_slice_words`` corpus words
        (whole chunks); the host only enqueues slices (on CUDA at most two ahead of the device, so the
        progress report is current) and reports progress. The kernel draws everything from the seed and
        the corpus position, so slicing changes nothing but the Hogwild schedule."""
        dev, on_cuda = self.device, self.device.type == "cuda"
        n_all = ids_all.numel()
        total = max(epochs * n_all, 1)
        bounds_np = chunk_bounds(sent_all.cpu().numpy(), self._chunk_words)
        n_chunks = len(bounds_np) - 1
        firsts = np.searchsorted(bounds_np[:-1], np.arange(0, max(n_all, 1), self._slice_words))
        cuts = np.unique(np.r_[firsts, n_chunks]).tolist()
        slices = list(zip(cuts[:-1], cuts[1:]))
        # a loaded model continues with fresh random streams, not the ones its first training used
        seed = (self.seed + 1_000_003 * self.train_count) % (1 << 63)
        kw = dict(seed=seed, lr_start=self.alpha, lr_end=self.min_alpha, total_words=float(total), window=self.window,
                  negative=self.negative, sg=bool(self.sg), cbow_mean=bool(self.cbow_mean),
                  shared_negatives=self.shared_negatives, shrink_windows=self.shrink_windows)
        aprob, alias = self._sampler._alias_prob.float(), self._sampler._alias.to(torch.int32)
        # the loss costs the C path a fifth of its time: computed there when asked for or shown (gensim
        # computes it only with compute_loss)
        want_loss = road != "c" or bool(self.compute_loss or self.progress is not None)
        if road == "triton":
            from ..kernels.word2vec import word2vec_train

            tokens = ids_all.to(torch.int32)
            bounds = torch.from_numpy(bounds_np).to(dev)
            kept = torch.empty(max(n_all, 1), dtype=torch.int32, device=dev)  # the kernel's scratch
            stats = torch.zeros(3, dtype=torch.float64, device=dev)
        else:
            tokens = ids_all.cpu().numpy().astype(np.int32)
            arrays = dict(keep_prob=self._keep.cpu().numpy(), alias_prob=aprob.cpu().numpy(),
                          alias=alias.cpu().numpy())
            w_in, w_out = self._w_in.numpy(), self._w_out.numpy()
            stats = np.zeros(3)
            fn = _cpu.load() if road == "c" else None
            max_chunk = int(np.diff(bounds_np).max(initial=0))

        def run_slice(ca, cb, pos_base):
            nonlocal stats
            if road == "triton":
                st = word2vec_train(tokens, bounds, kept, self._keep, aprob, alias, self._w_in, self._w_out, c0=ca,
                                    n_chunks=cb - ca, grid=cb - ca, pos_base=pos_base, write_back=self._write_back,
                                    deterministic=self.deterministic, num_warps=self._num_warps, **kw)
                stats += st.sum(0)
            elif road == "c":
                def part(w):
                    return _cpu.train_chunks(fn, tokens, bounds_np, ca + w, cb, n_workers, arrays["keep_prob"],
                                             arrays["alias_prob"], arrays["alias"], w_in, w_out, pos_base=pos_base,
                                             max_chunk=max_chunk, want_loss=want_loss, **kw)
                stats = stats + (sum(f.result() for f in [pool.submit(part, w) for w in range(n_workers)])
                                 if pool is not None else part(0))
            else:
                stats = stats + train_chunks_reference(tokens, bounds_np, range(ca, cb), arrays["keep_prob"],
                                                       arrays["alias_prob"], arrays["alias"], w_in, w_out,
                                                       pos_base=pos_base, **kw)

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
                    lr = max(self.min_alpha, self.alpha - (self.alpha - self.min_alpha) * done / total)
                    self.progress({"epoch": epoch + 1, "epochs": epochs, "words": done, "total_words": total,
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
    def save(self, fname) -> None:
        """Write the model (settings, vocabulary with counts, both tables, training state) to ``fname``:
        an .npz with a JSON header, no pickle. ``Word2Vec.load(fname)`` reads it back and can train on;
        the corpus is not saved (pass one to ``train``)."""
        if self.wv is None:
            raise ValueError("nothing to save: build the vocabulary (or train) first")
        meta = {"params": {k: _plain(getattr(self, k)) for k in _PARAMS},
                "state": {k: _plain(getattr(self, k)) for k in _STATE},
                "index_to_key": self.wv.index_to_key, "device": str(self.device)}
        arrays = {"vectors": self.wv.vectors, "syn1neg": self.syn1neg,
                  "count": np.asarray(self.wv.expandos["count"], dtype=np.int64)}
        save_npz(fname, "Word2Vec", meta, arrays)

    @classmethod
    def load(cls, fname, device=None) -> Word2Vec:
        """A model written by ``save``, on ``device`` (default: CUDA when available)."""
        meta, arrays = load_npz(fname, "Word2Vec")
        model = cls(**meta["params"], device=device)
        for k, v in meta["state"].items():
            setattr(model, k, v)
        model.wv = KeyedVectors._from_arrays(meta["index_to_key"], arrays["vectors"], arrays["count"])
        model.syn1neg = arrays["syn1neg"]
        model._init_sampling()
        return model

    # ----------------------------------------------------------------------------- queries (on wv)
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
