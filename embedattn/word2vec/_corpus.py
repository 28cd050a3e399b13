"""Reading a corpus and building the vocabulary, with gensim's semantics (``Word2Vec._scan_vocab``,
``prepare_vocab``, ``KeyedVectors.sort_by_descending_frequency``, ``utils.prune_vocab``)."""

from __future__ import annotations

import bz2
import gzip
import itertools
import os
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

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


def line_sentences(path, max_sentence_length: int = MAX_SENTENCE_LENGTH, limit: int | None = None
                   ) -> Iterator[list[str]]:
    """One sentence per line, whitespace tokens, like gensim's LineSentence (.bz2/.gz read directly):
    lines longer than ``max_sentence_length`` words are split, empty lines yield nothing, and bytes
    that are not valid UTF-8 raise ``UnicodeDecodeError`` naming the file and line."""
    with _open_binary(path) as f:
        for n, raw in enumerate(itertools.islice(f, limit), 1):
            words = decode_utf8(raw, f"{os.fspath(path)} line {n}").split()
            for i in range(0, len(words), max_sentence_length):
                yield words[i:i + max_sentence_length]


class LineSentence:
    """gensim's ``LineSentence``: a restartable iterable over the sentences of a text file."""

    def __init__(self, source, max_sentence_length: int = MAX_SENTENCE_LENGTH, limit: int | None = None) -> None:
        self.source, self.max_sentence_length, self.limit = source, max_sentence_length, limit

    def __iter__(self) -> Iterator[list[str]]:
        return line_sentences(self.source, self.max_sentence_length, self.limit)


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


def read_corpus(sentences: Iterable[Iterable[str]]) -> Corpus:
    """One pass over ``sentences`` (any iterable of token iterables, a generator too)."""
    if isinstance(sentences, (str, bytes)):
        raise TypeError("sentences must be an iterable of token lists, not a str (use corpus_file=)")
    if not isinstance(sentences, Iterable):
        raise TypeError(f"sentences must be an iterable of lists of str, got {type(sentences).__name__}")
    ids = defaultdict(itertools.count().__next__)  # a new word gets the next id, all in C
    tokens, lengths = array("i"), array("q")
    checked = False
    for s in sentences:
        if not checked:
            if isinstance(s, (str, bytes)):
                raise TypeError("each sentence must be a list of str tokens, got a str: split it into words "
                                "(gensim would train on its characters)")
            s = s if isinstance(s, (list, tuple)) else list(s)
            checked = bool(s)
        n = len(tokens)
        tokens.extend(map(ids.__getitem__, s))
        lengths.append(len(tokens) - n)
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
