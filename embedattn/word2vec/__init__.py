"""word2vec trainer (skip-gram or CBOW, negative sampling) on embedattn kernels, with gensim's API.

    from embedattn.word2vec import Word2Vec, KeyedVectors
    model = Word2Vec(corpus_file="text.txt", vector_size=100, min_count=5, epochs=5)
    model.wv["word"]; model.wv.most_similar("word"); model.wv.evaluate_word_analogies("questions-words.txt")
    model.save("w2v.model"); model = Word2Vec.load("w2v.model")
    model.wv.save_word2vec_format("vectors.bin", binary=True)
    kv = KeyedVectors.load_word2vec_format("vectors.bin", binary=True)

Command line: ``python -m embedattn.word2vec --corpus FILE --out vectors.txt [options]``.
"""

from ._corpus import LineSentence, line_sentences
from ._keyedvectors import KeyedVectors, WordPairsResult
from .model import Word2Vec

__all__ = ["KeyedVectors", "LineSentence", "Word2Vec", "WordPairsResult", "line_sentences"]
