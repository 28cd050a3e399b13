"""``Word2Vec``: skip-gram with negative sampling, gensim's argument names and defaults."""

from __future__ import annotations

import math
import sys
import time
from collections import namedtuple
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._backend import resolve
from ..negative_sampling import UnigramSampler
from ._corpus import build_vocab, line_sentences
from ._train import CompiledStep, autograd_sgns_step, keep_probability, skipgram_pairs, torch_sgns_step

WordPairsResult = namedtuple("WordPairsResult", ["pearson", "spearman", "oov_ratio"])


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


class KeyedVectors:
    """Word vectors by word (the trained input table), gensim-style."""

    def __init__(self, index_to_key: list[str], vectors: torch.Tensor) -> None:
        self.index_to_key = index_to_key
        self.key_to_index = {w: i for i, w in enumerate(index_to_key)}
        self.vectors = vectors

    @property
    def vector_size(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.index_to_key)

    def __contains__(self, word: str) -> bool:
        return word in self.key_to_index

    def _index(self, word: str) -> int:
        try:
            return self.key_to_index[word]
        except KeyError:
            raise KeyError(f"word {word!r} not in vocabulary") from None

    def __getitem__(self, words):
        """A numpy float32 vector for a word, a (n, D) array for a list of words."""
        if isinstance(words, str):
            return self.vectors[self._index(words)].detach().cpu().numpy().copy()
        idx = torch.tensor([self._index(w) for w in words], device=self.vectors.device)
        return self.vectors[idx].detach().cpu().numpy()

    def _unit(self) -> torch.Tensor:
        v = self.vectors.detach().float()
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def similarity(self, a: str, b: str) -> float:
        u = self._unit()
        return float(u[self._index(a)] @ u[self._index(b)])

    def most_similar(self, positive, negative=(), topn: int = 10) -> list[tuple[str, float]]:
        """The ``topn`` words of highest cosine similarity to mean(positive) - mean(negative),
        excluding the query words (gensim's most_similar)."""
        positive = [positive] if isinstance(positive, str) else list(positive)
        negative = [negative] if isinstance(negative, str) else list(negative)
        u = self._unit()
        q = torch.zeros(u.shape[1], device=u.device)
        for w in positive:
            q += u[self._index(w)]
        for w in negative:
            q -= u[self._index(w)]
        sims = u @ (q / q.norm().clamp_min(1e-12))
        for w in positive + negative:
            sims[self._index(w)] = -math.inf
        top = torch.topk(sims, min(topn, max(len(self) - len(positive) - len(negative), 0)))
        return [(self.index_to_key[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def evaluate_word_pairs(self, path: str, delimiter: str = "\t",
                            case_insensitive: bool = True) -> WordPairsResult:
        """Correlation of cosine similarities with human scores on a word-pair file (WordSim-353,
        SimLex-999: ``word1<delim>word2<delim>score`` lines, ``#`` comments). Pairs with an unknown
        word are skipped; ``oov_ratio`` is their percentage (gensim's convention)."""
        k2i = self.key_to_index
        if case_insensitive:  # like gensim: the first (most frequent) spelling wins
            k2i = {}
            for w, i in self.key_to_index.items():
                k2i.setdefault(w.upper(), i)
        u = self._unit()
        model, gold, oov, total = [], [], 0, 0
        with open(path, encoding="utf8") as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                parts = line.rstrip("\n").split(delimiter)
                a, b, score = parts[0], parts[1], float(parts[2])
                if case_insensitive:
                    a, b = a.upper(), b.upper()
                total += 1
                if a not in k2i or b not in k2i:
                    oov += 1
                    continue
                model.append(float(u[k2i[a]] @ u[k2i[b]]))
                gold.append(score)
        if len(model) < 2:
            raise ValueError(f"{path}: fewer than 2 word pairs are in the vocabulary")
        m, g = np.array(model), np.array(gold)
        return WordPairsResult(_pearson(m, g), _pearson(_rank(m), _rank(g)), 100.0 * oov / max(total, 1))

    def save_word2vec_format(self, path: str, binary: bool = False) -> None:
        """word2vec.c's format, readable by gensim's ``KeyedVectors.load_word2vec_format``: a
        ``"<count> <dim>"`` header, then one word per line followed by its vector as text, or as
        little-endian float32 bytes (and a newline, like word2vec.c) when ``binary``."""
        vecs = self.vectors.detach().float().cpu().numpy()
        with open(path, "wb") as f:
            f.write(f"{len(self)} {self.vector_size}\n".encode())
            for word, row in zip(self.index_to_key, vecs):
                if binary:
                    f.write(word.encode("utf8") + b" " + row.astype("<f4").tobytes() + b"\n")
                else:
                    f.write((word + " " + " ".join(f"{x:.7g}" for x in row.tolist()) + "\n").encode("utf8"))


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


class Word2Vec:
    """Skip-gram word2vec with negative sampling on embedattn's kernels.

    Arguments follow gensim's ``Word2Vec`` (``sg=1``): give ``sentences`` (an iterable of token lists)
    or ``corpus_file`` (one sentence per line; .bz2/.gz fine) and training runs in the constructor.
    ``fused=True`` trains with the fused step (Triton ``sgns_step`` on CUDA; on the CPU the same
    update in chunked PyTorch, torch.compile'd); ``fused=False`` with the autograd
    ``negative_sampling_loss`` + SGD. ``backend`` picks the loss/step implementation as everywhere in
    embedattn (None: Triton on CUDA, PyTorch on the CPU). Updates apply ``batch_words`` corpus words
    at a time (one learning rate each), all on ``device`` (default: CUDA when available); with one
    worker, pairs and negatives are drawn for 2**18 words at once. On the CPU, ``workers``
    threads (default: min(2, torch.get_num_threads())) each run single-threaded PyTorch on their
    share of a batch's pairs, Hogwild like gensim's workers (small ops parallelize badly inside).
    ``compile`` (CPU fused path): torch.compile the step (None: when epochs x corpus words >= 1M,
    as compiling costs ~10-30 s once; falls back to eager PyTorch with a warning when it fails).
    ``in_flight`` (fused Triton path): None runs one launch per 256-pair minibatch (the semantics
    whose quality matches gensim's); an int runs one launch per batch in which GPU programs walk
    their share of the pairs Hogwild, about ``in_flight`` pairs at a time, like word2vec.c's
    threads: far fewer launches, staleness set by ``in_flight`` (check the quality when raising it).
    """

    def __init__(self, sentences: Iterable[list[str]] | None = None, *, corpus_file: str | None = None,
                 vector_size: int = 100, window: int = 5, negative: int = 5, min_count: int = 5,
                 sample: float = 1e-3, alpha: float = 0.025, min_alpha: float = 1e-4, epochs: int = 5,
                 ns_exponent: float = 0.75, max_vocab_size: int | None = None, batch_words: int = 10000,
                 seed: int = 0, workers: int | None = None, device=None, backend: str | None = None,
                 fused: bool = True, compile: bool | None = None, in_flight: int | None = None,
                 progress: Callable[[dict], None] | None = None) -> None:
        for name, val, lo in (("vector_size", vector_size, 1), ("window", window, 1), ("negative", negative, 1),
                              ("min_count", min_count, 1), ("epochs", epochs, 1), ("batch_words", batch_words, 1)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if sample < 0 or alpha <= 0 or min_alpha < 0:
            raise ValueError("sample and min_alpha must be >= 0 and alpha > 0")
        if sentences is not None and corpus_file is not None:
            raise ValueError("give sentences or corpus_file, not both")
        self.vector_size, self.window, self.negative, self.min_count = vector_size, window, negative, min_count
        self.sample, self.alpha, self.min_alpha, self.epochs = sample, alpha, min_alpha, epochs
        self.ns_exponent, self.max_vocab_size, self.batch_words = ns_exponent, max_vocab_size, batch_words
        self.seed, self.backend, self.fused, self.progress = seed, backend, fused, progress
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.workers = workers
        if in_flight is not None and (not isinstance(in_flight, int) or in_flight < 1):
            raise ValueError(f"in_flight must be None or an int >= 1, got {in_flight!r}")
        self.in_flight = in_flight
        self.compile, self.compile_seconds = compile, 0.0
        # pairs per minibatch (per sgns_step launch on a GPU, where all pairs of a launch are in
        # flight at once): updates inside one are summed from a common snapshot, so a frequent word
        # drawn as a negative n times moves n stale steps at once. 2048 diverged on head500 (CPU,
        # same sum-of-stale-updates semantics as a GPU launch); 256 matches gensim's quality.
        self._chunk = 256
        # corpus words whose pairs and negatives are drawn at once (one host sync each, see _train)
        self._group_words = 1 << 18
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.wv: KeyedVectors | None = None
        self.running_training_loss = 0.0
        self.train_seconds = 0.0
        self.trained_words = 0
        if sentences is not None or corpus_file is not None:
            self.build_vocab(sentences, corpus_file=corpus_file)
            self.train()

    # ----------------------------------------------------------------------------- vocabulary
    def build_vocab(self, sentences=None, *, corpus_file: str | None = None) -> None:
        if corpus_file is not None:
            sentences = line_sentences(corpus_file)
        if sentences is None:
            raise ValueError("build_vocab needs sentences or corpus_file")
        if isinstance(sentences, str):
            raise TypeError("sentences must be an iterable of token lists, not a str (use corpus_file=)")
        vocab, ids, sent, raw = build_vocab(sentences, self.min_count, self.max_vocab_size)
        self.vocab, self.corpus_raw_words = vocab, raw
        self._ids, self._sent = ids.to(self.device), sent.to(self.device)
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self._worker_gens = [torch.Generator(device=self.device).manual_seed(self.seed + 1 + i)
                             for i in range(self._n_workers())]
        V, D = len(vocab), self.vector_size
        w_in = torch.empty(V, D, device=self.device)
        w_in.uniform_(-0.5 / D, 0.5 / D, generator=self._gen)  # word2vec.c's initialisation
        self.syn1neg = torch.zeros(V, D, device=self.device)
        self.wv = KeyedVectors(vocab.index_to_key, w_in)
        self._sampler = UnigramSampler(vocab.counts, self.ns_exponent, device=self.device)
        self._keep = keep_probability(vocab.counts, self.sample).float().to(self.device)

    # ----------------------------------------------------------------------------- training
    def _step_fn(self):
        be = resolve(self.backend, self.syn1neg)
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
            compile_ = self.epochs * self.corpus_raw_words >= 1_000_000
        if compile_ and self.device.type == "cpu":  # CompiledStep is the CPU path (C++ codegen, CPU ids)
            t = time.perf_counter()
            step = CompiledStep(self.wv.vectors, self.syn1neg, self.negative, self._chunk)
            self.compile_seconds = time.perf_counter() - t
            if step.ok:
                return step
        return lambda *a: torch_sgns_step(*a, chunk=self._chunk)

    def _n_workers(self) -> int:
        if self.device.type != "cpu" or resolve(self.backend, torch.empty(0, device=self.device)) != "reference":
            return 1  # Triton's CPU interpreter patches global state per launch: one thread only
        return self.workers if self.workers is not None else max(1, min(2, torch.get_num_threads()))

    def train(self, epochs: int | None = None) -> float:
        """Train (again) for ``epochs`` passes with the learning rate decaying linearly from
        ``alpha`` to ``min_alpha``. Returns the words/s (raw corpus words per second)."""
        if self.wv is None:
            raise ValueError("call build_vocab (or pass a corpus to the constructor) before train")
        epochs = self.epochs if epochs is None else epochs
        n_workers = self._n_workers()
        on_cpu = self.device.type == "cpu"
        # the ops are small: intra-op threads cost more than they give (a lot on a loaded machine),
        # so every worker runs its ops inline on one thread; the setting is per thread (OpenMP)
        pool = ThreadPoolExecutor(n_workers, initializer=torch.set_num_threads, initargs=(1,)) \
            if n_workers > 1 else None
        threads = torch.get_num_threads()
        if on_cpu:
            torch.set_num_threads(1)
        try:
            step = self._step_fn()
            self._train(epochs, step, n_workers, pool)
        finally:
            if pool is not None:
                pool.shutdown()
            if on_cpu:
                torch.set_num_threads(threads)
        return self.trained_words / self.train_seconds

    def _train(self, epochs, step, n_workers, pool) -> None:
        w_in, w_out, gen = self.wv.vectors, self.syn1neg, self._gen
        n_all = self._ids.numel()
        total = epochs * n_all
        done, loss_acc, loss_pairs, t0, last = 0, 0.0, 0, time.perf_counter(), 0.0

        def negatives(tgt, g):
            # the fused steps skip a negative equal to the target (word2vec.c); the autograd loss
            # cannot, so it draws negatives that avoid the target instead
            return self._sampler.sample(tgt.numel(), self.negative, exclude=None if self.fused else tgt,
                                        generator=g)

        def work(inp, tgt, lr, g):
            return step(inp, tgt, negatives(tgt, g), w_in, w_out, lr)

        for epoch in range(epochs):
            keep = torch.rand(n_all, device=self.device, generator=gen) < self._keep[self._ids]
            ids, sent = self._ids[keep], self._sent[keep]
            n = ids.numel()
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
                    inp_g, tgt_g, offs = skipgram_pairs(ids, sent, s, e, self.window, gen, bounds[g0:g1 + 1])
                    if pool is None and inp_g.numel():
                        neg_g = negatives(tgt_g, self._worker_gens[0])
                for bi in range(g0, g1):
                    lr = self.alpha - (self.alpha - self.min_alpha) * (done / total)
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
                if self.progress is not None and (now - last > 0.5 or done == total):
                    last = now
                    self.progress({"epoch": epoch + 1, "epochs": epochs, "words": done, "total_words": total,
                                   "loss": float(loss_acc) / max(loss_pairs, 1), "lr": lr,
                                   "words_per_s": done / (now - t0) * self.corpus_raw_words / n_all})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_seconds = time.perf_counter() - t0
        self.trained_words = epochs * self.corpus_raw_words
        self.running_training_loss = float(loss_acc)
        self.mean_pair_loss = float(loss_acc) / max(loss_pairs, 1)

    def get_latest_training_loss(self) -> float:
        return self.running_training_loss

    # ----------------------------------------------------------------------------- queries
    def most_similar(self, positive, negative=(), topn: int = 10):
        return self.wv.most_similar(positive, negative, topn)

    def evaluate_word_pairs(self, path: str, **kw) -> WordPairsResult:
        return self.wv.evaluate_word_pairs(path, **kw)

    def save_word2vec_format(self, path: str, binary: bool = False) -> None:
        self.wv.save_word2vec_format(path, binary=binary)


def print_progress(info: dict, stream=None) -> None:
    """A one-line progress display (the CLI's): epoch, % done, words/s, mean pair loss, lr."""
    stream = sys.stderr if stream is None else stream
    pct = 100.0 * info["words"] / max(info["total_words"], 1)
    stream.write(f"\repoch {info['epoch']}/{info['epochs']}  {pct:5.1f}%  {info['words_per_s']:,.0f} words/s  "
                 f"loss {info['loss']:.4f}  lr {info['lr']:.6f}")
    if info["words"] >= info["total_words"]:
        stream.write("\n")
    stream.flush()
