"""word2vec trainer (skip-gram or CBOW, negative sampling) on embedattn kernels, with gensim's API.

    from embedattn.word2vec import Word2Vec, KeyedVectors
    model = Word2Vec(corpus_file="text.txt", vector_size=100, min_count=5, epochs=5)
    model.wv["word"]; model.wv.most_similar("word"); model.wv.evaluate_word_analogies("questions-words.txt")
    model.save("w2v.model"); model = Word2Vec.load("w2v.model")
    model = Word2Vec.from_gensim(gensim_model); gensim_model = model.to_gensim()
    model.wv.save_word2vec_format("vectors.bin", binary=True)
    kv = KeyedVectors.load_word2vec_format("vectors.bin", binary=True)

gensim's module names work too (``from embedattn.word2vec import word2vec, keyedvectors``, then
``word2vec.Word2Vec``, ``word2vec.LineSentence``, ``keyedvectors.KeyedVectors``: gensim's own test file
passes with only its import line changed; docs/word2vec.md). Command line: ``python -m embedattn.word2vec
--corpus FILE --out vectors.txt [options]``.
"""

from . import keyedvectors, word2vec
from ._corpus import LineSentence, PathLineSentences, line_sentences
from ._keyedvectors import KeyedVectors, WordPairsResult, WrongModelTypeError
from .model import VocabularyError, Word2Vec

__all__ = ["KeyedVectors", "LineSentence", "PathLineSentences", "VocabularyError", "Word2Vec", "WordPairsResult",
           "WrongModelTypeError", "keyedvectors", "line_sentences", "word2vec"]
