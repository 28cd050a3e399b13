"""gensim's ``gensim.models.keyedvectors`` module names on embedattn's implementation (see ``word2vec.py``)."""

from ._keyedvectors import REAL, KeyedVectors, WordPairsResult, WrongModelTypeError

Word2VecKeyedVectors = KeyedVectors  # gensim's alias

__all__ = ["REAL", "KeyedVectors", "Word2VecKeyedVectors", "WordPairsResult", "WrongModelTypeError"]
