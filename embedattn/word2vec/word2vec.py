"""gensim's ``gensim.models.word2vec`` module names on embedattn's implementation, so that code written
for gensim switches with its import line: ``from embedattn.word2vec import word2vec, keyedvectors``."""

from ._corpus import MAX_SENTENCE_LENGTH as MAX_WORDS_IN_BATCH
from ._corpus import LineSentence, PathLineSentences
from ._keyedvectors import KeyedVectors
from .model import VocabularyError, Word2Vec

__all__ = ["MAX_WORDS_IN_BATCH", "KeyedVectors", "LineSentence", "PathLineSentences", "VocabularyError", "Word2Vec"]
