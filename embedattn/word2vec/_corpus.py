"""Reading a corpus and building the vocabulary (gensim's conventions)."""

from __future__ import annotations

import bz2
import gzip
import io
from collections import Counter
from collections.abc import Iterable, Iterator

import torch

MAX_SENTENCE_LENGTH = 10000  # gensim/word2vec.c split longer lines into pieces of this many words


def _open_text(path: str):
    if path.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf8", errors="replace")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf8", errors="replace")
    return open(path, encoding="utf8", errors="replace")


def line_sentences(path: str) -> Iterator[list[str]]:
    """One sentence per line, whitespace tokens, like gensim's LineSentence (.bz2/.gz read directly)."""
    with _open_text(path) as f:
        for line in f:
            words = line.split()
            for i in range(0, len(words), MAX_SENTENCE_LENGTH):
                yield words[i:i + MAX_SENTENCE_LENGTH]


class Vocab:
    """Words kept after ``min_count`` (and ``max_vocab_size``), sorted by descending count."""

    def __init__(self, index_to_key: list[str], counts: list[int]) -> None:
        self.index_to_key = index_to_key
        self.key_to_index = {w: i for i, w in enumerate(index_to_key)}
        self.counts = torch.tensor(counts, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.index_to_key)


def build_vocab(sentences: Iterable[list[str]], min_count: int, max_vocab_size: int | None):
    """Count words, then encode the corpus. Returns (vocab, ids, sentence_ids, raw_word_count):
    ``ids`` are the in-vocabulary tokens in corpus order (out-of-vocabulary words dropped, as gensim
    does), ``sentence_ids`` the sentence each token belongs to (windows never cross a sentence)."""
    sentences = [s if isinstance(s, list) else list(s) for s in sentences]
    for s in sentences[:1]:
        if s and not isinstance(s[0], str):
            raise TypeError(f"sentences must be lists of str tokens, got a {type(s[0]).__name__} token")
    counter = Counter(w for s in sentences for w in s)
    raw = sum(counter.values())
    if raw == 0:
        raise ValueError("the corpus is empty: no words to train on")
    # most_common sorts by count, ties in first-seen order (gensim's order too)
    items = [(w, c) for w, c in counter.most_common() if c >= min_count]
    if max_vocab_size is not None:
        items = items[:max_vocab_size]
    if not items:
        raise ValueError(f"the vocabulary is empty: no word occurs min_count={min_count} times or more "
                         f"(most frequent: {counter.most_common(1)[0][1]} times); lower min_count")
    vocab = Vocab([w for w, _ in items], [c for _, c in items])
    k2i = vocab.key_to_index
    ids, sid = [], []
    for i, s in enumerate(sentences):
        enc = [k2i[w] for w in s if w in k2i]
        ids.extend(enc)
        sid.extend([i] * len(enc))
    return vocab, torch.tensor(ids, dtype=torch.int64), torch.tensor(sid, dtype=torch.int64), raw
