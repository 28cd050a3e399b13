"""Reading a corpus and building the vocabulary, with gensim's semantics (``Word2Vec._scan_vocab``,
``prepare_vocab``, ``KeyedVectors.sort_by_descending_frequency``, ``utils.prune_vocab``)."""

from __future__ import annotations

import bz2
import gzip
import heapq
import itertools
import logging
import os
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAX_SENTENCE_LENGTH = 10000  # gensim/word2vec.c split longer lines into pieces of this many words

# trim_rule results, gensim.utils' values (so gensim's constants work too)
RULE_DEFAULT, RULE_DISCARD, RULE_KEEP = 0, 1, 2


def _open_binary(path):
    path = os.fspath(path)
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8; bytes that are not valid UTF-8 raise (as gensim's ``utils.to_unicode``) naming
    ``where``, instead of being replaced, which would merge distinct words into one."""
    try:
        return data.decode("utf8")
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(e.encoding, e.object, e.start, e.end,
                                 f"{e.reason} ({where}: not valid UTF-8)") from None


def _split_lines(lines, where: str, max_sentence_length: int) -> Iterator[list[str]]:
    for n, raw in enumerate(lines, 1):
        line = raw if isinstance(raw, str) else decode_utf8(raw, f"{where} line {n}")
        words = line.split()
        for i in range(0, len(words), max_sentence_length):
            yield words[i:i + max_sentence_length]


def line_sentences(path, max_sentence_length: int = MAX_SENTENCE_LENGTH, limit: int | None = None
                   ) -> Iterator[list[str]]:
    """One sentence per line, whitespace tokens, like gensim's LineSentence (.bz2/.gz read directly):
    lines longer than ``max_sentence_length`` words are split, empty lines yield nothing, and bytes
    that are not valid UTF-8 raise ``UnicodeDecodeError`` naming the file and line."""
    with _open_binary(path) as f:
        yield from _split_lines(itertools.islice(f, limit), os.fspath(path), max_sentence_length)


def _is_stream(source) -> bool:
    return hasattr(source, "seek") and hasattr(source, "__iter__")


class LineSentence:
    """gensim's ``LineSentence``: a restartable iterable over the sentences of a text file, one per line.
    ``source`` is a path (.bz2/.gz read directly) or an open file object, text or binary (a
    ``bz2.BZ2File``, a ``gzip.GzipFile``, ...), read again from its start on each iteration."""

    def __init__(self, source, max_sentence_length: int = MAX_SENTENCE_LENGTH, limit: int | None = None) -> None:
        if not isinstance(source, (str, os.PathLike)) and not _is_stream(source):
            raise TypeError(f"LineSentence's source must be a path or an open file object, got "
                            f"{type(source).__name__}")
        self.source, self.max_sentence_length, self.limit = source, max_sentence_length, limit

    def __iter__(self) -> Iterator[list[str]]:
        if _is_stream(self.source):
            self.source.seek(0)
            where = getattr(self.source, "name", type(self.source).__name__)
            return _split_lines(itertools.islice(self.source, self.limit), str(where), self.max_sentence_length)
        return line_sentences(self.source, self.max_sentence_length, self.limit)


class PathLineSentences:
    """gensim's ``PathLineSentences``: the sentences of every file in a directory, files in name order
    (or of one file), one sentence per line; .bz2/.gz files are read directly. ``source`` that is
    neither a file nor a directory raises ValueError (gensim's)."""

    def __init__(self, source, max_sentence_length: int = MAX_SENTENCE_LENGTH, limit: int | None = None) -> None:
        self.source, self.max_sentence_length, self.limit = os.fspath(source), max_sentence_length, limit
        if os.path.isfile(self.source):
            self.input_files = [self.source]
        elif os.path.isdir(self.source):
            names = sorted(os.listdir(self.source))
            self.input_files = [os.path.join(self.source, f) for f in names
                                if os.path.isfile(os.path.join(self.source, f))]
        else:
            raise ValueError(f"input is neither a file nor a path: {self.source!r}")

    def __iter__(self) -> Iterator[list[str]]:
        for name in self.input_files:
            yield from line_sentences(name, self.max_sentence_length, self.limit)


class Corpus:
    """A corpus read once: each token an id into ``words`` (distinct words, first-seen order), and the
    length of each sentence. ``raw_words`` counts every token (gensim's ``corpus_total_words``)."""

    def __init__(self, words: list[str], tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.words, self.tokens, self.lengths = words, tokens, lengths

    @property
    def raw_words(self) -> int:
        return len(self.tokens)

    @property
    def n_sentences(self) -> int:
        return len(self.lengths)

    def counts(self) -> np.ndarray:
        return np.bincount(self.tokens, minlength=len(self.words))

    def encode(self, key_to_index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, sentence_ids): the in-vocabulary tokens in corpus order (out-of-vocabulary words
        dropped, as gensim does) and the sentence each belongs to (windows never cross a sentence)."""
        lut = np.array([key_to_index.get(w, -1) for w in self.words], dtype=np.int64)
        ids = lut[self.tokens]
        sent = np.repeat(np.arange(self.n_sentences, dtype=np.int64), self.lengths)
        keep = ids >= 0
        return torch.from_numpy(ids[keep]), torch.from_numpy(sent[keep])


def read_corpus(sentences: Iterable[Iterable[str]], progress_per: int | None = None) -> Corpus:
    """One pass over ``sentences`` (any iterable of token iterables, a generator too); progress logged
    every ``progress_per`` sentences (gensim's)."""
    if isinstance(sentences, (str, bytes)):
        raise TypeError("sentences must be an iterable of token lists, not a str (use corpus_file=)")
    if not isinstance(sentences, Iterable):
        raise TypeError(f"sentences must be an iterable of lists of str, got {type(sentences).__name__}")
    ids = defaultdict(itertools.count().__next__)  # a new word gets the next id, all in C
    tokens, lengths = array("i"), array("q")
    checked = False
    for s in sentences:
        if not checked:
            if isinstance(s, str):  # gensim's warning; then, as gensim, its characters are the words
                logger.warning("Each 'sentences' item should be a list of words (usually unicode strings). "
                               "First item here is instead plain %s.", type(s))
            s = s if isinstance(s, (list, tuple, str)) else list(s)
            checked = True
        n = len(tokens)
        tokens.extend(map(ids.__getitem__, s))
        lengths.append(len(tokens) - n)
        if progress_per and len(lengths) % progress_per == 0:
            logger.info("PROGRESS: at sentence #%i, processed %i words, keeping %i word types", len(lengths),
                        len(tokens), len(ids))
    words = list(ids)
    bad = next((w for w in words if not isinstance(w, str)), None)
    if bad is not None:
        hint = " (decode bytes as UTF-8 first)" if isinstance(bad, bytes) else ""
        raise TypeError(f"sentences must be lists of str tokens, got a {type(bad).__name__} token {bad!r}{hint}")
    return Corpus(words, np.frombuffer(tokens, dtype=np.int32), np.frombuffer(lengths, dtype=np.int64))


def keep_vocab_item(word: str, count: int, min_count: int, trim_rule: Callable | None = None) -> bool:
    """gensim's ``utils.keep_vocab_item``: ``count >= min_count`` unless ``trim_rule`` says keep/discard."""
    default = count >= min_count
    if trim_rule is None:
        return default
    rule = trim_rule(word, count, min_count)
    if rule == RULE_KEEP:
        return True
    if rule == RULE_DISCARD:
        return False
    return default


def scan_vocab(corpus: Corpus, max_vocab_size: int | None = None, trim_rule: Callable | None = None
               ) -> dict[str, int]:
    """gensim's raw vocabulary (``Word2Vec._scan_vocab``): word counts in first-seen order. With
    ``max_vocab_size``, after any sentence that leaves more distinct words than that, words counted
    fewer than ``min_reduce`` times so far are dropped (``utils.prune_vocab``) and ``min_reduce`` grows
    by one; a dropped word seen again counts from zero and moves to the end of the order."""
    if not max_vocab_size:
        return dict(zip(corpus.words, corpus.counts().tolist()))
    vocab: Counter[int] = Counter()
    min_reduce, pos = 1, 0
    for n in corpus.lengths.tolist():
        vocab.update(corpus.tokens[pos:pos + n].tolist())
        pos += n
        if len(vocab) > max_vocab_size:
            for t in list(vocab):
                if not keep_vocab_item(corpus.words[t], vocab[t], min_reduce, trim_rule):
                    del vocab[t]
            min_reduce += 1
    return {corpus.words[t]: c for t, c in vocab.items()}


def prepare_vocab(raw_vocab: dict[str, int], min_count: int, max_final_vocab: int | None = None,
                  trim_rule: Callable | None = None, sorted_vocab: bool = True):
    """gensim's ``prepare_vocab`` + ``sort_by_descending_frequency``. Returns (index_to_key, counts,
    effective_min_count). ``max_final_vocab`` raises min_count to one more than the count of the word
    ranked ``max_final_vocab`` (0-based) by count, so at most that many words stay (ties at the cut
    all go). Sorted by descending count, equal counts in reverse first-seen order as gensim's
    ``np.lexsort((-index, -count))``."""
    effective = min_count
    if max_final_vocab is not None:
        ranked = sorted(raw_vocab.values(), reverse=True)
        calc = ranked[max_final_vocab] + 1 if max_final_vocab < len(ranked) else 1
        effective = max(calc, min_count)
    kept = [(w, c) for w, c in raw_vocab.items() if keep_vocab_item(w, c, effective, trim_rule)]
    counts = np.array([c for _, c in kept], dtype=np.int64)
    if sorted_vocab and kept:
        order = np.lexsort((-np.arange(len(kept)), -counts))
        kept, counts = [kept[i] for i in order], counts[order]
    return [w for w, _ in kept], counts, effective


class _HeapItem:
    """A Huffman-tree node in the heap, ordered by count alone, as gensim's ``Heapitem``: equal counts
    then leave the heap in heapq's own order, so the tree (and syn1's rows) is gensim's, tie for tie."""

    __slots__ = ("count", "index")

    def __init__(self, count: int, index: int) -> None:
        self.count, self.index = count, index

    def __lt__(self, other: _HeapItem) -> bool:
        return self.count < other.count


def huffman_tree(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """word2vec's Huffman tree over the word counts, built as gensim's ``_build_heap`` /
    ``_assign_binary_codes``: inner node i (row i of syn1) is the i-th merge of the two rarest nodes.
    Returns the words' paths from the root, flattened: (offsets int64 [V + 1], node ids int32, codes
    uint8); word w's path is offsets[w]:offsets[w + 1] (0 for the left child, 1 for the right)."""
    counts = np.asarray(counts, dtype=np.int64)
    V = len(counts)
    heap = [_HeapItem(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.full(max(2 * V - 1, 1), -1, dtype=np.int64)
    bit = np.zeros(max(2 * V - 1, 1), dtype=np.uint8)
    for i in range(V - 1):
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        parent[a.index], parent[b.index], bit[b.index] = i + V, i + V, 1
        heapq.heappush(heap, _HeapItem(a.count + b.count, i + V))
    # depth of every node (parents are created after their children: walk the inner nodes root first)
    depth = np.zeros(max(2 * V - 1, 1), dtype=np.int64)
    for node in range(2 * V - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    off = np.zeros(V + 1, dtype=np.int64)
    np.cumsum(depth[:V], out=off[1:])
    points, codes = np.zeros(off[-1], dtype=np.int32), np.zeros(off[-1], dtype=np.uint8)
    # all leaves climb one level per step; level l from the leaf fills path slot depth - 1 - l
    cur, level = np.arange(V), 0
    while True:
        live = np.flatnonzero(level < depth[:V])
        if not len(live):
            break
        pos = off[live] + depth[live] - 1 - level
        points[pos] = parent[cur[live]] - V
        codes[pos] = bit[cur[live]]
        cur[live] = parent[cur[live]]
        level += 1
    return off, points, codes
