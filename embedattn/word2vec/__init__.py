"""word2vec trainer (skip-gram negative sampling) on embedattn kernels."""
