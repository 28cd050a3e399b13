"""word2vec trainer (skip-gram negative sampling) on embedattn kernels.

    from embedattn.word2vec import Word2Vec
    model = Word2Vec(corpus_file="text.txt", vector_size=100, min_count=5, epochs=5)
    model.wv["word"]; model.most_similar("word"); model.save_word2vec_format("vectors.txt")

Command line: ``python -m embedattn.word2vec --corpus FILE --out vectors.txt [options]``.
"""

from ._corpus import line_sentences
from .model import KeyedVectors, Word2Vec, WordPairsResult

__all__ = ["KeyedVectors", "Word2Vec", "WordPairsResult", "line_sentences"]
