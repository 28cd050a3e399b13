"""``python -m embedattn.word2vec --corpus FILE --out vectors.txt [options]``: train word vectors (CBOW,
gensim's and word2vec.c's default, or skip-gram with ``--sg 1``; negative sampling and/or ``--hs 1``).

Bad input (a missing corpus or evaluation file, an ``--out`` that cannot be written, a CUDA device that
is not there, bytes in the corpus that are not UTF-8, an empty vocabulary) fails with one ``error:``
line and exit status 2, before training starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from .model import Word2Vec, print_progress, resolve_device


class _Bad(Exception):
    """A problem with the command's input, reported as one line."""


def _check_readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _Bad(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


def _check_writable(flag: str, path: str) -> None:
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise _Bad(f"{flag} {path}: cannot write there: {e.strerror or e}") from None
    if not existed:
        os.remove(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedattn.word2vec",
                                description="Train word2vec vectors (gensim's defaults: CBOW, negative sampling).")
    p.add_argument("--corpus", required=True, help="UTF-8 text, one sentence per line (.bz2/.gz read directly)")
    p.add_argument("--out", required=True, help="output vectors in word2vec format")
    p.add_argument("--binary", action="store_true", help="write the binary word2vec format")
    p.add_argument("--sg", type=int, default=0, choices=[0, 1], help="0: CBOW (default), 1: skip-gram")
    p.add_argument("--hs", type=int, default=0, choices=[0, 1],
                   help="1: hierarchical softmax (alone with --negative 0)")
    p.add_argument("--cbow-mean", type=int, default=1, choices=[0, 1], help="CBOW: mean (1) or sum (0) of the context")
    p.add_argument("--vector-size", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5, help="negatives per pair (0: hierarchical softmax alone)")
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.025)
    p.add_argument("--min-alpha", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ns-exponent", type=float, default=0.75)
    p.add_argument("--max-vocab-size", type=int, default=None, help="prune rare words during the scan (gensim's)")
    p.add_argument("--max-final-vocab", type=int, default=None,
                   help="raise min-count so that at most this many words stay (gensim's)")
    p.add_argument("--batch-words", type=int, default=10000)
    p.add_argument("--workers", type=int, default=None, help="CPU worker threads (default min(2, cores))")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--backend", default=None, choices=["auto", "triton", "reference"])
    p.add_argument("--trainer", default=None, choices=["kernel", "minibatch"],
                   help="kernel: word2vec.c's algorithm in one kernel call per corpus slice (default); minibatch: "
                        "skip-gram pairs in minibatches of the fused sgns_step")
    p.add_argument("--shared-negatives", action="store_true",
                   help="kernel trainer, skip-gram: one set of negatives per centre word for its whole window")
    p.add_argument("--in-flight", type=int, default=None,
                   help="minibatch trainer, GPU: one Hogwild launch per batch with this many pairs in flight "
                        "(default: one launch per 256-pair minibatch)")
    p.add_argument("--no-fused", action="store_true",
                   help="minibatch trainer with the autograd loss instead of sgns_step")
    p.add_argument("--eval", default=None, help="word-pair file (e.g. wordsim353.tsv): print Spearman after training")
    p.add_argument("--analogies", default=None,
                   help="analogy file (e.g. questions-words.txt): print the accuracy after training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    try:  # everything that can be checked before reading the corpus, then the vocabulary pass
        device = resolve_device(a.device)
        _check_readable("--corpus", a.corpus)
        for flag, path in (("--eval", a.eval), ("--analogies", a.analogies)):
            if path is not None:
                _check_readable(flag, path)
        _check_writable("--out", a.out)
        model = Word2Vec(vector_size=a.vector_size, window=a.window, negative=a.negative, min_count=a.min_count,
                         sample=a.sample, alpha=a.alpha, min_alpha=a.min_alpha, epochs=a.epochs,
                         ns_exponent=a.ns_exponent, max_vocab_size=a.max_vocab_size,
                         max_final_vocab=a.max_final_vocab, batch_words=a.batch_words, workers=a.workers,
                         seed=a.seed, device=device, backend=a.backend, fused=not a.no_fused, in_flight=a.in_flight,
                         sg=a.sg, hs=a.hs, cbow_mean=a.cbow_mean, trainer=a.trainer,
                         shared_negatives=a.shared_negatives, compute_loss=True,
                         progress=None if a.quiet else print_progress)
        model.build_vocab(corpus_file=a.corpus)
        if not model.wv.key_to_index:
            raise _Bad(f"--corpus {a.corpus}: {model._empty_why}")
    except (_Bad, ValueError, TypeError, RuntimeError, OSError) as e:  # UnicodeDecodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.train()
    model.save_word2vec_format(a.out, binary=a.binary)
    words_per_s = model.trained_words / model.train_seconds
    print(f"trained {model.trained_words} words ({len(model.wv)} in vocabulary, {model.epochs} epochs) in "
          f"{model.train_seconds:.2f} s on {device}: {words_per_s:,.0f} words/s; "
          f"mean pair loss {model.mean_pair_loss:.4f}; vectors written to {a.out}")
    if a.eval:
        r = model.wv.evaluate_word_pairs(a.eval)
        print(f"{a.eval}: spearman {r.spearman.statistic:.4f} pearson {r.pearson.statistic:.4f} "
              f"oov {r.oov_ratio:.1f}%")
    if a.analogies:
        score, sections = model.wv.evaluate_word_analogies(a.analogies)
        n = len(sections[-1]["correct"]) + len(sections[-1]["incorrect"])
        print(f"{a.analogies}: accuracy {score:.4f} on {n} questions in the vocabulary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
