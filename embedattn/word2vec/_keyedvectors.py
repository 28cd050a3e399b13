"""``KeyedVectors``: words to numpy vectors, gensim's class and method names, arguments, defaults and
return types (``gensim/models/keyedvectors.py`` ported: the same numpy operations in the same order,
so the same vectors give the same answers). gensim is not needed at run time."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections import namedtuple
from numbers import Integral

import numpy as np

from ._corpus import _open_binary, decode_utf8

logger = logging.getLogger(__name__)

REAL = np.float32
_KEY_TYPES = (str, int, np.integer)
_EXTENDED_KEY_TYPES = (str, int, np.integer, np.ndarray)

# evaluate_word_pairs' result: gensim returns (pearson, spearman, oov_ratio) with scipy's results for
# the first two; these are (statistic, pvalue) namedtuples, read the same way (``r[0]``, ``.statistic``)
Correlation = namedtuple("Correlation", ["statistic", "pvalue"])
WordPairsResult = namedtuple("WordPairsResult", ["pearson", "spearman", "oov_ratio"])

_FORMAT = "embedattn.word2vec"


# ----------------------------------------------------------------------------- numeric helpers
def unitvec(vec: np.ndarray) -> np.ndarray:
    """gensim's ``matutils.unitvec`` for a dense vector: scaled to unit L2 length in float64, returned
    in the input's dtype; a zero vector is returned unchanged."""
    vec = np.asarray(vec)
    v64 = vec.astype(np.float64)
    veclen = math.sqrt(float(np.dot(v64, v64))) if vec.size else 0.0
    if veclen > 0.0:
        dtype = float if np.issubdtype(vec.dtype, np.integer) else vec.dtype
        return (v64 * (1.0 / veclen)).astype(dtype)
    return vec


def _argsort(x: np.ndarray, topn: int, reverse: bool = False) -> np.ndarray:
    """gensim's ``matutils.argsort``: indices of the ``topn`` smallest (largest when ``reverse``)."""
    x = np.asarray(x)
    if topn <= 0:
        return np.empty(0, dtype=np.int64)
    if reverse:
        x = -x
    if topn >= x.size:
        return np.argsort(x)[:topn]
    most_extreme = np.argpartition(x, topn)[:topn]
    return most_extreme.take(np.argsort(x.take(most_extreme)))


def _ensure_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, _KEY_TYPES) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return [value]
    return list(value)


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


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100000):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _correlation(a: np.ndarray, b: np.ndarray) -> Correlation:
    """Pearson's r with its two-sided p-value (scipy.stats.pearsonr's; also spearmanr's on ranks):
    under independence P(|R| >= |r|) = I_{1-r^2}((n-2)/2, 1/2)."""
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    r = float((a * b).sum()) / den if den > 0 else math.nan
    r = max(-1.0, min(1.0, r))
    n = len(a)
    p = _betainc((n - 2) / 2.0, 0.5, 1.0 - r * r) if n > 2 and not math.isnan(r) else math.nan
    return Correlation(r, p)


# ----------------------------------------------------------------------------- save / load files
class WrongModelTypeError(AttributeError, TypeError):
    """A file holds another class than the one loading it (gensim raises AttributeError; a TypeError too)."""


def save_npz(fname, kind: str, meta: dict, arrays: dict[str, np.ndarray], separately=None,
             sep_limit: int = 10 * 1024**2) -> None:
    """An ``.npz`` (numpy's zip of arrays) with a JSON header: readable without pickle, so loading a file
    cannot run code. ``kind`` names the class that wrote it. Arrays named in ``separately``, or (when
    ``separately`` is None) of ``sep_limit`` bytes or more, go to their own ``{fname}.{name}.npy`` files
    beside it, as gensim's ``save`` does, so ``load(..., mmap="r")`` can map them."""
    fname = os.fspath(fname)
    if separately is None:
        separate = [k for k, a in arrays.items() if a is not None and a.nbytes >= sep_limit]
    else:
        unknown = set(separately) - set(arrays)
        if unknown:
            raise ValueError(f"separately names {sorted(unknown)}, not among the saved arrays {sorted(arrays)}")
        separate = list(separately)
    meta = {"format": _FORMAT, "version": 1, "kind": kind, "separate": separate, **meta}
    for k in separate:
        with open(f"{fname}.{k}.npy", "wb") as f:
            np.save(f, arrays[k], allow_pickle=False)
    header = np.frombuffer(json.dumps(meta).encode("utf8"), dtype=np.uint8)
    inline = {k: a for k, a in arrays.items() if k not in separate and a is not None}
    with open(fname, "wb") as f:
        np.savez(f, __meta__=header, **inline)


def load_npz(fname, kind: str, mmap: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of a ``save_npz`` file; arrays saved separately are memory-mapped with
    ``mmap`` ("r", "r+", "c"; None reads them)."""
    if mmap not in (None, "r", "r+", "c", "w+"):
        raise ValueError(f"mmap must be None or a numpy mmap_mode ('r', 'r+', 'c'), got {mmap!r}")
    fname = os.fspath(fname)
    with open(fname, "rb") as f:
        magic = f.read(2)
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode("utf8"))
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
        except (ValueError, OSError, KeyError, EOFError) as e:
            hint = (" It looks like a pickle (gensim's save): embedattn never unpickles a file; load it with "
                    "gensim and convert it in memory: Word2Vec.from_gensim(gensim.models.Word2Vec.load(path))"
                    if magic[:1] == b"\x80" else " gensim's own pickles load with gensim (then from_gensim), "
                    "word2vec.c files with load_word2vec_format")
            raise ValueError(f"{fname}: not a file written by embedattn's save() ({e}).{hint}") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{fname}: not a file written by embedattn's save()")
    if meta.get("kind") != kind:
        raise WrongModelTypeError(f"{fname} holds a {meta.get('kind')}, not a {kind}: load it with "
                                  f"{meta.get('kind')}.load")
    for k in meta.get("separate", []):
        arrays[k] = np.load(f"{fname}.{k}.npy", mmap_mode=mmap, allow_pickle=False)
    return meta, arrays


class _ClassOnly:
    """A classmethod that raises AttributeError when reached through an instance (gensim's
    ``call_on_class_only``: ``model.load(f)`` returns a new model, it does not load into ``model``)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls):
        if obj is not None:
            raise AttributeError(f"{cls.__name__}.{self.fn.__name__} should be called on the class "
                                 f"({cls.__name__}.{self.fn.__name__}(...)), not on an instance")
        return self.fn.__get__(cls, type(cls))


# ----------------------------------------------------------------------------- KeyedVectors
class KeyedVectors:
    """Keys (words) and their vectors, a numpy array ``vectors`` (gensim's ``KeyedVectors``).

    ``vectors[i]`` belongs to ``index_to_key[i]``; ``key_to_index`` maps back. Per-key attributes (a
    trained model's ``count``) live in ``expandos``, read with ``get_vecattr(key, "count")``.
    """

    def __init__(self, vector_size: int, count: int = 0, dtype=REAL) -> None:
        self.vector_size = vector_size
        self.index_to_key: list = [None] * count  # preallocated slots are filled by add_vector
        self.next_index = 0
        self.key_to_index: dict = {}
        self.vectors = np.zeros((count, vector_size), dtype=dtype)
        self.norms: np.ndarray | None = None
        self.expandos: dict[str, np.ndarray] = {}

    @classmethod
    def _from_arrays(cls, index_to_key: list, vectors: np.ndarray, counts: np.ndarray | None = None):
        kv = cls(vectors.shape[1], dtype=vectors.dtype)
        kv.index_to_key = list(index_to_key)
        kv.key_to_index = {k: i for i, k in enumerate(kv.index_to_key)}
        kv.next_index = len(kv.index_to_key)
        kv.vectors = vectors
        if counts is not None:
            kv.expandos["count"] = np.asarray(counts, dtype=np.int64)
        return kv

    def __str__(self) -> str:
        return f"{self.__class__.__name__}<vector_size={self.vector_size}, {len(self)} keys>"

    __repr__ = __str__

    # ------------------------------------------------------------------ per-key attributes
    def allocate_vecattrs(self, attrs=None, types=None) -> None:
        """Make the per-key attribute arrays as long as ``index_to_key`` (gensim's)."""
        if attrs is None:
            attrs = list(self.expandos)
            types = [self.expandos[a].dtype for a in attrs]
        target = len(self.index_to_key)
        for attr, t in zip(attrs, types):
            if t is int:
                t = np.int64
            if t is str:
                t = object
            if attr not in self.expandos:
                self.expandos[attr] = np.zeros(target, dtype=t)
                continue
            prev = self.expandos[attr]
            if not np.issubdtype(t, prev.dtype):
                raise TypeError(f"Can't allocate type {t} for attribute {attr}, conflicts with its existing type "
                                f"{prev.dtype}")
            if len(prev) != target:
                self.expandos[attr] = np.zeros(target, dtype=prev.dtype)
                n = min(len(prev), target)
                self.expandos[attr][:n] = prev[:n]

    def set_vecattr(self, key, attr: str, val) -> None:
        self.allocate_vecattrs(attrs=[attr], types=[type(val)])
        self.expandos[attr][self.get_index(key)] = val

    def get_vecattr(self, key, attr: str):
        return self.expandos[attr][self.get_index(key)]

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.index_to_key)

    def _index(self, key, k2i: dict, default=None) -> int:
        val = k2i.get(key, -1) if isinstance(key, _KEY_TYPES) else -1
        if val >= 0:
            return val
        if isinstance(key, (int, np.integer)) and 0 <= key < len(self.index_to_key):
            return int(key)
        if default is not None:
            return default
        raise KeyError(f"Key '{key}' not present")

    def get_index(self, key, default=None) -> int:
        """The row of ``key`` (an int in range is its own index); ``default``, else KeyError, if absent."""
        return self._index(key, self.key_to_index, default)

    def has_index_for(self, key) -> bool:
        return self.get_index(key, -1) >= 0

    def __contains__(self, key) -> bool:
        return self.has_index_for(key)

    def fill_norms(self, force: bool = False) -> None:
        """Compute the row norms (``norms``) if not yet done; training clears them."""
        if self.norms is None or force:
            self.norms = np.linalg.norm(self.vectors, axis=1)

    def get_normed_vectors(self) -> np.ndarray:
        self.fill_norms()
        return self.vectors / self.norms[..., np.newaxis]

    def _vector(self, index: int, norm: bool) -> np.ndarray:
        if norm:
            self.fill_norms()
            result = self.vectors[index] / self.norms[index]
        else:
            result = self.vectors[index]
        result.setflags(write=False)  # a read-only view, as gensim's
        return result

    def get_vector(self, key, norm: bool = False) -> np.ndarray:
        """The key's vector (a read-only 1-D view), L2-normalized if ``norm``."""
        return self._vector(self.get_index(key), norm)

    def __getitem__(self, key_or_keys) -> np.ndarray:
        """A key's vector; a 2-D array for a list of keys."""
        if isinstance(key_or_keys, _KEY_TYPES):
            return self.get_vector(key_or_keys)
        return np.vstack([self.get_vector(key) for key in key_or_keys])

    # ------------------------------------------------------------------ adding keys
    def add_vector(self, key, vector) -> int:
        """Add one key and its vector (into a preallocated slot if there is one); its index."""
        target = self.next_index
        if target >= len(self) or self.index_to_key[target] is not None:
            target = len(self)
            self.add_vectors([key], [vector])
            self.allocate_vecattrs()
            self.next_index = target + 1
        else:
            self.index_to_key[target] = key
            self.key_to_index[key] = target
            self.vectors[target] = vector
            self.next_index += 1
        self.norms = None
        return target

    def add_vectors(self, keys, weights, extras=None, replace: bool = False) -> None:
        """Append keys and their vectors; a key already present keeps its vector unless ``replace``."""
        if isinstance(keys, _KEY_TYPES):
            keys = [keys]
            weights = np.array(weights).reshape(1, -1)
        elif isinstance(weights, list):
            weights = np.array(weights)
        extras = extras or {}
        self.allocate_vecattrs(extras.keys(), [extras[k].dtype for k in extras])
        in_vocab = np.array([k in self.key_to_index for k in keys], dtype=bool)
        for idx in np.nonzero(~in_vocab)[0]:
            self.key_to_index[keys[idx]] = len(self.index_to_key)
            self.index_to_key.append(keys[idx])
        self.vectors = np.vstack((self.vectors, weights[~in_vocab].astype(self.vectors.dtype)))
        for attr, extra in extras.items():
            self.expandos[attr] = np.concatenate((self.expandos[attr], extra[~in_vocab]))
        if replace:
            idxs = [self.get_index(keys[i]) for i in np.nonzero(in_vocab)[0]]
            self.vectors[idxs] = weights[in_vocab]
            for attr, extra in extras.items():
                self.expandos[attr][idxs] = extra[in_vocab]
        self.allocate_vecattrs()
        self.norms = None

    def __setitem__(self, keys, weights) -> None:
        if not isinstance(keys, list):
            keys = [keys]
            weights = np.asarray(weights).reshape(1, -1)
        self.add_vectors(keys, weights, replace=True)

    def sort_by_descending_frequency(self) -> None:
        """Most frequent keys first; equal counts in reverse of their current order (gensim's lexsort)."""
        if not len(self):
            return
        counts = np.asarray(self.expandos["count"], dtype=np.int64)
        order = np.lexsort((-np.arange(len(counts)), -counts))
        self.index_to_key = [self.index_to_key[i] for i in order]
        for k in self.expandos:
            self.expandos[k] = self.expandos[k][order]
        if len(self.vectors):
            self.vectors = self.vectors[order]
        self.key_to_index = {k: i for i, k in enumerate(self.index_to_key)}
        self.norms = None

    # ------------------------------------------------------------------ similarity queries
    def _mean_vector(self, keys, weights, k2i: dict, pre_normalize: bool, post_normalize: bool,
                     ignore_missing: bool) -> np.ndarray:
        if len(keys) == 0:
            raise ValueError("cannot compute mean with no input")
        if isinstance(weights, list):
            weights = np.array(weights, dtype=self.vectors.dtype)
        if weights is None:
            weights = np.ones(len(keys), dtype=self.vectors.dtype)
        if len(keys) != weights.shape[0]:
            raise ValueError("keys and weights array must have same number of elements")
        mean = np.zeros(self.vector_size, self.vectors.dtype)
        total_weight = 0
        for idx, key in enumerate(keys):
            if isinstance(key, np.ndarray):
                mean += weights[idx] * key
                total_weight += abs(weights[idx])
            elif self._index(key, k2i, -1) >= 0:
                mean += weights[idx] * self._vector(self._index(key, k2i), pre_normalize)
                total_weight += abs(weights[idx])
            elif not ignore_missing:
                raise KeyError(f"Key '{key}' not present in vocabulary")
        if total_weight > 0:
            mean = mean / total_weight
        if post_normalize:
            mean = unitvec(mean).astype(REAL)
        return mean

    def get_mean_vector(self, keys, weights=None, pre_normalize: bool = True, post_normalize: bool = False,
                        ignore_missing: bool = True) -> np.ndarray:
        """The weighted mean of the keys' vectors (keys may be words, indices or vectors)."""
        return self._mean_vector(keys, weights, self.key_to_index, pre_normalize, post_normalize, ignore_missing)

    def _most_similar(self, positive, negative, topn, clip_start, clip_end, restrict_vocab, k2i):
        if isinstance(topn, Integral) and topn < 1:
            return []
        positive, negative = _ensure_list(positive), _ensure_list(negative)
        self.fill_norms()
        clip_end = clip_end or len(self.vectors)
        if restrict_vocab:
            clip_start, clip_end = 0, restrict_vocab
        keys = []
        weight = np.concatenate((np.ones(len(positive)), -1.0 * np.ones(len(negative))))
        for idx, item in enumerate(positive + negative):
            if isinstance(item, _EXTENDED_KEY_TYPES):
                keys.append(item)
            else:  # (key, weight)
                keys.append(item[0])
                weight[idx] = item[1]
        mean = self._mean_vector(keys, weight, k2i, pre_normalize=True, post_normalize=True, ignore_missing=False)
        all_keys = [self._index(k, k2i) for k in keys if isinstance(k, _KEY_TYPES) and self._index(k, k2i, -1) >= 0]
        dists = np.dot(self.vectors[clip_start:clip_end], mean) / self.norms[clip_start:clip_end]
        if not topn:
            return dists
        best = _argsort(dists, topn=topn + len(all_keys), reverse=True)
        result = [(self.index_to_key[sim + clip_start], float(dists[sim]))
                  for sim in best if (sim + clip_start) not in all_keys]
        return result[:topn]

    def most_similar(self, positive=None, negative=None, topn: int | None = 10, clip_start: int = 0,
                     clip_end: int | None = None, restrict_vocab: int | None = None):
        """The ``topn`` keys of highest cosine similarity to the weighted mean of the unit vectors of
        ``positive`` (weight 1) and ``negative`` (weight -1), the query keys excluded: a list of
        (key, similarity). Items may be keys, vectors, or (key or vector, weight) pairs.
        ``restrict_vocab=N`` searches the first N keys only (the most frequent of a trained model);
        ``topn=None`` returns the similarities to every key (in ``clip_start:clip_end``) as an array."""
        return self._most_similar(positive, negative, topn, clip_start, clip_end, restrict_vocab, self.key_to_index)

    def _most_similar_cosmul(self, positive, negative, topn, restrict_vocab, k2i):
        if isinstance(topn, Integral) and topn < 1:
            return []
        positive, negative = _ensure_list(positive), _ensure_list(negative)
        self.fill_norms()
        all_keys = {self._index(k, k2i) for k in positive + negative
                    if isinstance(k, _KEY_TYPES) and self._index(k, k2i, -1) >= 0}
        pos = [self._vector(self._index(k, k2i), True) if isinstance(k, _KEY_TYPES) else k for k in positive]
        neg = [self._vector(self._index(k, k2i), True) if isinstance(k, _KEY_TYPES) else k for k in negative]
        if not pos:
            raise ValueError("cannot compute similarity with no input")
        end = restrict_vocab or len(self.vectors)
        vecs, norms = self.vectors[:end], self.norms[:end]
        # equation (4) of Levy & Goldberg, "Linguistic Regularities in Sparse and Explicit Word
        # Representations", with cosines shifted to [0, 1] (their footnote 7), as gensim
        pos_dists = [(1 + np.dot(vecs, term) / norms) / 2 for term in pos]
        neg_dists = [(1 + np.dot(vecs, term) / norms) / 2 for term in neg]
        dists = np.prod(pos_dists, axis=0) / (np.prod(neg_dists, axis=0) + 0.000001)
        if not topn:
            return dists
        best = _argsort(dists, topn=topn + len(all_keys), reverse=True)
        return [(self.index_to_key[i], float(dists[i])) for i in best if i not in all_keys][:topn]

    def most_similar_cosmul(self, positive=None, negative=None, topn: int | None = 10,
                            restrict_vocab: int | None = None):
        """The ``topn`` keys that maximise 3CosMul (Levy & Goldberg 2014): the product of the (shifted)
        cosine similarities to ``positive`` over that to ``negative``, the query keys excluded; a list
        of (key, score), or every key's score as an array with ``topn=None``. Keys are taken as unit
        vectors, vectors as given (gensim's). ``restrict_vocab=N`` searches the first N keys only."""
        return self._most_similar_cosmul(positive, negative, topn, restrict_vocab, self.key_to_index)

    def unit_normalize_all(self) -> None:
        """Scale every vector to unit length, in place (gensim's; training on afterwards makes no sense)."""
        self.fill_norms()
        self.vectors /= self.norms[..., np.newaxis]
        self.norms = np.ones((len(self.vectors),))

    def wmdistance(self, document1, document2, norm: bool = True) -> float:
        """Word Mover's Distance between two token lists (Kusner et al. 2015), as gensim's: the
        optimal-transport cost between their normalized bags of words, with Euclidean distances
        between (unit, with ``norm``) word vectors as the cost. Words outside the vocabulary are
        dropped; ``inf`` when a document has none left. Needs POT (``pip install POT``, or
        ``embedattn[pot]``), as gensim does."""
        try:
            from ot import emd2
        except ImportError as e:
            raise ImportError("wmdistance needs the POT package (pip install POT, or embedattn[pot])") from e
        doc1 = [t for t in document1 if t in self]
        doc2 = [t for t in document2 if t in self]
        if len(doc1) < len(document1) or len(doc2) < len(document2):
            logger.info("Removed %d and %d OOV words from document 1 and 2 (respectively).",
                        len(document1) - len(doc1), len(document2) - len(doc2))
        if not doc1 or not doc2:
            logger.warning("At least one of the documents had no words that were in the vocabulary.")
            return float("inf")
        vocab = {t: i for i, t in enumerate(dict.fromkeys(doc1 + doc2))}
        if len(vocab) == 1:  # both documents are one and the same word
            return 0.0
        uniq1, uniq2 = list(dict.fromkeys(doc1)), list(dict.fromkeys(doc2))
        v1 = np.array([self.get_vector(t, norm=norm) for t in uniq1], dtype=np.float64)
        v2 = np.array([self.get_vector(t, norm=norm) for t in uniq2], dtype=np.float64)
        dist = np.zeros((len(vocab), len(vocab)))
        # differences, not |a|^2 + |b|^2 - 2ab: a word's distance to itself is exactly 0
        dist[np.ix_([vocab[t] for t in uniq1], [vocab[t] for t in uniq2])] = \
            np.sqrt(((v1[:, None, :] - v2[None, :, :]) ** 2).sum(-1))
        if abs(np.sum(dist)) < 1e-8:  # POT's emd does not return on an all-zero cost matrix
            logger.info("The distance matrix is all zeros. Aborting (returning inf).")
            return float("inf")

        def nbow(doc):
            d = np.zeros(len(vocab))
            for t in doc:
                d[vocab[t]] += 1.0 / len(doc)
            return d

        return float(emd2(nbow(doc1), nbow(doc2), dist))

    def similar_by_key(self, key, topn: int | None = 10, restrict_vocab: int | None = None):
        return self.most_similar(positive=[key], topn=topn, restrict_vocab=restrict_vocab)

    def similar_by_word(self, word, topn: int | None = 10, restrict_vocab: int | None = None):
        return self.similar_by_key(word, topn, restrict_vocab)

    def similar_by_vector(self, vector, topn: int | None = 10, restrict_vocab: int | None = None):
        return self.most_similar(positive=[vector], topn=topn, restrict_vocab=restrict_vocab)

    def rank_by_centrality(self, words, use_norm: bool = True) -> list:
        """(similarity, word) pairs sorted by similarity to the mean of the words, closest first;
        unknown words are ignored with a warning."""
        self.fill_norms()
        used = [w for w in words if w in self]
        if len(used) != len(words):
            logger.warning("vectors for words %s are not present in the model, ignoring these words",
                           set(words) - set(used))
        if not used:
            raise ValueError("cannot select a word from an empty list")
        vectors = np.vstack([self.get_vector(w, norm=use_norm) for w in used]).astype(REAL)
        mean = self.get_mean_vector(vectors, post_normalize=True)
        dists = np.dot(vectors, mean)
        return sorted(zip(dists, used), reverse=True)

    def doesnt_match(self, words) -> str:
        """The word furthest from the mean of the words."""
        return self.rank_by_centrality(words)[-1][1]

    @staticmethod
    def cosine_similarities(vector_1: np.ndarray, vectors_all: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(vector_1)
        all_norms = np.linalg.norm(vectors_all, axis=1)
        return np.dot(vectors_all, vector_1) / (norm * all_norms)

    def distances(self, word_or_vector, other_words=()) -> np.ndarray:
        """1 - cosine similarity from a key or vector to ``other_words`` (every key when empty)."""
        v = self.get_vector(word_or_vector) if isinstance(word_or_vector, _KEY_TYPES) else word_or_vector
        others = self.vectors if not other_words else self.vectors[[self.get_index(w) for w in other_words]]
        return 1 - self.cosine_similarities(v, others)

    def similarity(self, w1, w2):
        """Cosine similarity of two keys."""
        return np.dot(unitvec(self[w1]), unitvec(self[w2]))

    def distance(self, w1, w2):
        return 1 - self.similarity(w1, w2)

    def n_similarity(self, ws1, ws2):
        """Cosine similarity of the means of two lists of keys (unknown keys ignored)."""
        if not (len(ws1) and len(ws2)):
            raise ZeroDivisionError("At least one of the passed list is empty.")
        mean1 = self.get_mean_vector(ws1, pre_normalize=False)
        mean2 = self.get_mean_vector(ws2, pre_normalize=False)
        return np.dot(unitvec(mean1), unitvec(mean2))

    def most_similar_to_given(self, key1, keys_list):
        return keys_list[int(np.argmax([self.similarity(key1, k) for k in keys_list]))]

    def closer_than(self, key1, key2) -> list:
        d = self.distances(key1)
        i1, i2 = self.get_index(key1), self.get_index(key2)
        return [self.index_to_key[i] for i in np.where(d < d[i2])[0] if i != i1]

    def rank(self, key1, key2) -> int:
        return len(self.closer_than(key1, key2)) + 1

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _section_score(section: dict) -> float:
        correct, incorrect = len(section["correct"]), len(section["incorrect"])
        if correct + incorrect == 0:
            return 0.0
        score = correct / (correct + incorrect)
        logger.info("%s: %.1f%% (%i/%i)", section["section"], 100.0 * score, correct, correct + incorrect)
        return score

    def _ok_vocab(self, restrict_vocab: int, case_insensitive: bool) -> dict:
        # the first (most frequent) spelling of a case-folded word wins, as in gensim
        ok_keys = self.index_to_key[:restrict_vocab]
        if case_insensitive:
            return {k.upper(): self.get_index(k) for k in reversed(ok_keys)}
        return {k: self.get_index(k) for k in reversed(ok_keys)}

    def evaluate_word_analogies(self, analogies, restrict_vocab: int = 300000, case_insensitive: bool = True,
                                dummy4unknown: bool = False, similarity_function: str = "most_similar"):
        """Accuracy on an analogy file (word2vec's questions-words.txt: ``: section`` lines, then
        ``a b c expected`` lines), answering each with 3CosAdd (``most_similar(positive=[b, c],
        negative=[a], topn=5, restrict_vocab=...)``, the first answer that is not a question word), or
        3CosMul with ``similarity_function="most_similar_cosmul"`` (gensim 4.4 accepts that name but
        answers with 3CosAdd all the same).
        Questions with a word outside the first ``restrict_vocab`` keys are skipped (or counted
        wrong with ``dummy4unknown``). Returns (score, sections) as gensim: sections are dicts with
        ``section``, ``correct``, ``incorrect`` (lists of the 4 words), the last one the total."""
        if similarity_function not in ("most_similar", "most_similar_cosmul"):
            raise ValueError("similarity_function must be 'most_similar' (3CosAdd) or 'most_similar_cosmul' "
                             f"(3CosMul), got {similarity_function!r}")
        ok_vocab = self._ok_vocab(restrict_vocab, case_insensitive)
        oov = quadruplets = 0
        sections, section = [], None
        with _open_binary(analogies) as fin:
            for line_no, raw in enumerate(fin):
                line = decode_utf8(raw, f"{os.fspath(analogies)} line {line_no + 1}")
                if line.startswith(": "):
                    if section:
                        sections.append(section)
                        self._section_score(section)
                    section = {"section": line.lstrip(": ").strip(), "correct": [], "incorrect": []}
                    continue
                if not section:
                    raise ValueError(f"Missing section header before line #{line_no} in {analogies}")
                words = line.split()
                if len(words) != 4:
                    logger.info("Skipping invalid line #%i in %s", line_no, analogies)
                    continue
                a, b, c, expected = [w.upper() for w in words] if case_insensitive else words
                quadruplets += 1
                if a not in ok_vocab or b not in ok_vocab or c not in ok_vocab or expected not in ok_vocab:
                    oov += 1
                    if dummy4unknown:
                        section["incorrect"].append((a, b, c, expected))
                    continue
                ignore = {a, b, c}
                predicted = None
                if similarity_function == "most_similar":
                    sims = self._most_similar([b, c], [a], 5, 0, None, restrict_vocab, ok_vocab)
                else:
                    sims = self._most_similar_cosmul([b, c], [a], 5, restrict_vocab, ok_vocab)
                for element in sims:
                    predicted = element[0].upper() if case_insensitive else element[0]
                    if predicted in ok_vocab and predicted not in ignore:
                        break
                section["correct" if predicted == expected else "incorrect"].append((a, b, c, expected))
        if section:
            sections.append(section)
            self._section_score(section)
        total = {
            "section": "Total accuracy",
            "correct": list(itertools.chain.from_iterable(s["correct"] for s in sections)),
            "incorrect": list(itertools.chain.from_iterable(s["incorrect"] for s in sections)),
        }
        logger.info("Quadruplets with out-of-vocabulary words: %.1f%%", 100.0 * oov / max(quadruplets, 1))
        score = self._section_score(total)
        sections.append(total)
        return score, sections

    def evaluate_word_pairs(self, pairs, delimiter: str = "\t", encoding: str = "utf8", restrict_vocab: int = 300000,
                            case_insensitive: bool = True, dummy4unknown: bool = False) -> WordPairsResult:
        """Correlation of cosine similarities with human scores on a word-pair file (WordSim-353,
        SimLex-999: ``word1<delim>word2<delim>score`` lines, ``#`` comments, malformed lines skipped).
        Pairs with a word outside the first ``restrict_vocab`` keys are skipped (scored 0 with
        ``dummy4unknown``). Returns (pearson, spearman, oov_ratio) as gensim: the first two
        (statistic, pvalue) pairs, scipy's values; ``oov_ratio`` in percent."""
        ok_vocab = self._ok_vocab(restrict_vocab, case_insensitive)
        gold, model, oov = [], [], 0
        with open(os.fspath(pairs), encoding=encoding) as fin:
            for line_no, line in enumerate(fin):
                if not line or line.startswith("#"):
                    continue
                try:
                    parts = [w.upper() for w in line.split(delimiter)] if case_insensitive else line.split(delimiter)
                    a, b, sim = parts
                    sim = float(sim)
                except (ValueError, TypeError):
                    logger.info("Skipping invalid line #%d in %s", line_no, pairs)
                    continue
                if a not in ok_vocab or b not in ok_vocab:
                    oov += 1
                    if dummy4unknown:
                        model.append(0.0)
                        gold.append(sim)
                    continue
                gold.append(sim)
                model.append(np.dot(unitvec(self.vectors[ok_vocab[a]]), unitvec(self.vectors[ok_vocab[b]])))
        if not gold:
            raise ValueError(f"No valid similarity judgements found in {pairs}: either invalid format or "
                             f"all are out-of-vocabulary in {self}")
        g, m = np.asarray(gold, dtype=np.float64), np.asarray(model, dtype=np.float64)
        oov_ratio = 100.0 * oov / (len(gold) if dummy4unknown else len(gold) + oov)
        return WordPairsResult(_correlation(m, g), _correlation(_rank(m), _rank(g)), oov_ratio)

    # ------------------------------------------------------------------ files
    def save_word2vec_format(self, fname, fvocab=None, binary: bool = False, total_vec: int | None = None,
                             write_header: bool = True, prefix: str = "", append: bool = False,
                             sort_attr: str = "count") -> None:
        """word2vec.c's format, read by gensim's and our ``load_word2vec_format``: a ``"<count> <dim>"``
        header, then per key the key, a space and its vector: as text (each float32 in its shortest
        round-trip form, so text files reload exactly) or as little-endian float32 bytes followed by a
        newline (word2vec.c's layout) when ``binary``. Keys in descending ``sort_attr`` order when
        that attribute exists (a trained model's counts); ``fvocab`` also writes ``key count`` lines."""
        if total_vec is None:
            total_vec = len(self.index_to_key)
        mode = "ab" if append else "wb"
        if sort_attr in self.expandos:
            keys = sorted(self.key_to_index, key=lambda k: -self.get_vecattr(k, sort_attr))
        else:
            if fvocab is not None:
                raise ValueError(f"Cannot store vocabulary with '{sort_attr}' because that attribute does not exist")
            keys = self.index_to_key
        if fvocab is not None:
            with open(os.fspath(fvocab), mode) as vout:
                for key in keys:
                    vout.write(f"{prefix}{key} {self.get_vecattr(key, sort_attr)}\n".encode())
        assert (len(self.index_to_key), self.vector_size) == self.vectors.shape
        with open(os.fspath(fname), mode) as fout:
            if write_header:
                fout.write(f"{total_vec} {self.vector_size}\n".encode())
            for key in keys:
                row = self.vectors[self.get_index(key)].astype(REAL)
                if binary:
                    fout.write(f"{prefix}{key} ".encode() + row.astype("<f4").tobytes() + b"\n")
                else:
                    fout.write(f"{prefix}{key} {' '.join(map(str, row))}\n".encode())

    @classmethod
    def load_word2vec_format(cls, fname, fvocab=None, binary: bool = False, encoding: str = "utf8",
                             unicode_errors: str = "strict", limit: int | None = None, datatype=REAL,
                             no_header: bool = False) -> KeyedVectors:
        """Read word2vec.c's text or binary format (ours, gensim's, word2vec.c's; .gz/.bz2 too). Keys
        that do not decode raise (``unicode_errors='strict'``, gensim's default); a repeated key keeps
        its first vector. Counts come from ``fvocab`` (``word count`` lines) when given, else are made
        up in descending order, as gensim does. ``limit`` reads the first N vectors only;
        ``no_header``: a text file without the ``"<count> <dim>"`` line (GloVe's)."""
        counts = None
        if fvocab is not None:
            counts = {}
            with _open_binary(fvocab) as fin:
                for raw in fin:
                    word, count = raw.decode(encoding, errors=unicode_errors).strip().split()
                    counts[word] = int(count)
        with _open_binary(fname) as fin:
            if no_header:
                if binary:
                    raise NotImplementedError("no_header only available for text-format files")
                vocab_size, vector_size = 0, None
                for raw in itertools.islice(fin, limit):
                    if vector_size is None:
                        vector_size = len(_text_line(raw, encoding, unicode_errors)[1])
                    vocab_size += 1
                fin.seek(0)
                if vector_size is None:
                    raise ValueError(f"{fname}: no vectors")
            else:
                header = fin.readline().decode(encoding)
                try:
                    vocab_size, vector_size = (int(x) for x in header.split())
                except ValueError:
                    raise ValueError(f"{fname}: the first line is not a '<count> <dimension>' header: {header!r} "
                                     "(a headerless text file loads with no_header=True)") from None
            if limit:
                vocab_size = min(vocab_size, limit)
            words, rows = [], np.zeros((vocab_size, vector_size), dtype=datatype)
            seen: set = set()
            reader = _binary_records if binary else _text_records
            for word, vec in reader(fin, vocab_size, vector_size, encoding, unicode_errors, fname):
                if word in seen:
                    logger.warning("duplicate word '%s' in word2vec file, ignoring all but first", word)
                    continue
                seen.add(word)
                rows[len(words)] = vec
                words.append(word)
        if len(words) != vocab_size:
            rows = np.ascontiguousarray(rows[:len(words)])
        if counts is None:
            word_counts = np.arange(vocab_size, vocab_size - len(words), -1, dtype=np.int64)
        else:
            missing = [w for w in words if w not in counts]
            if missing:
                logger.warning("vocabulary file is incomplete: '%s' is missing", missing[0])
            word_counts = np.array([counts.get(w, 0) for w in words], dtype=np.int64)
        return cls._from_arrays(words, rows, word_counts)

    def save(self, fname, separately=None, sep_limit: int = 10 * 1024**2) -> None:
        """Write the keys, vectors and per-key attributes to ``fname`` (an .npz with a JSON header, no
        pickle); ``KeyedVectors.load(fname)`` reads it back. Arrays of ``sep_limit`` bytes or more (or
        those named in ``separately``) go to ``{fname}.{name}.npy`` files beside it, as gensim's."""
        arrays = {"vectors": self.vectors}
        attrs = []
        for name, arr in self.expandos.items():
            if arr.dtype != object:
                arrays[f"attr_{len(attrs)}"] = arr
                attrs.append(name)
        save_npz(fname, "KeyedVectors", {"index_to_key": self.index_to_key, "attrs": attrs}, arrays,
                 separately, sep_limit)

    @_ClassOnly
    def load(cls, fname, mmap: str | None = None) -> KeyedVectors:
        """Vectors written by ``save``; ``mmap="r"`` maps the arrays saved in their own files."""
        meta, arrays = load_npz(fname, "KeyedVectors", mmap)
        return cls._from_parts(meta, arrays)

    @classmethod
    def _from_parts(cls, meta: dict, arrays: dict) -> KeyedVectors:
        kv = cls._from_arrays(meta["index_to_key"], arrays["vectors"])
        for i, name in enumerate(meta.get("attrs", [])):
            kv.expandos[name] = arrays[f"attr_{i}"]
        return kv


def _text_line(raw: bytes, encoding: str, unicode_errors: str):
    parts = raw.rstrip().decode(encoding, errors=unicode_errors).split(" ")
    return parts[0], parts[1:]


def _text_records(fin, vocab_size, vector_size, encoding, unicode_errors, fname):
    for line_no in range(vocab_size):
        raw = fin.readline()
        if raw == b"":
            raise EOFError("unexpected end of input; is count incorrect or file otherwise damaged?")
        word, weights = _text_line(raw, encoding, unicode_errors)
        if len(weights) != vector_size:
            raise ValueError(f"{fname}: vector {line_no + 1} ({word!r}) has {len(weights)} values, not {vector_size}")
        yield word, np.array(weights, dtype=REAL)


def _binary_records(fin, vocab_size, vector_size, encoding, unicode_errors, fname, chunk_size=1 << 20):
    """Records of ``word<space><vector_size float32>``, with or without a newline after each (word2vec.c
    writes one, gensim does not): a word's leading newline is dropped."""
    nbytes = vector_size * 4
    buf, start, done = b"", 0, 0
    while done < vocab_size:
        i_space = buf.find(b" ", start)
        if i_space == -1 or len(buf) - (i_space + 1) < nbytes:
            more = fin.read(chunk_size)
            if not more:
                raise EOFError("unexpected end of input; is count incorrect or file otherwise damaged?")
            buf, start = buf[start:] + more, 0
            continue
        word = buf[start:i_space].decode(encoding, errors=unicode_errors).lstrip("\n")
        vec = np.frombuffer(buf, dtype="<f4", count=vector_size, offset=i_space + 1).astype(REAL)
        start = i_space + 1 + nbytes
        done += 1
        yield word, vec
