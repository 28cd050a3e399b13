"""``python -m embedattn.word2vec --corpus FILE --out vectors.txt [options]``: train skip-gram vectors."""

from __future__ import annotations

import argparse
import sys

from .model import Word2Vec, print_progress


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedattn.word2vec",
                                description="Train skip-gram negative-sampling word vectors (gensim defaults).")
    p.add_argument("--corpus", required=True, help="text file, one sentence per line (.bz2/.gz read directly)")
    p.add_argument("--out", required=True, help="output vectors in word2vec format")
    p.add_argument("--binary", action="store_true", help="write the binary word2vec format")
    p.add_argument("--vector-size", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.025)
    p.add_argument("--min-alpha", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ns-exponent", type=float, default=0.75)
    p.add_argument("--max-vocab-size", type=int, default=None)
    p.add_argument("--batch-words", type=int, default=10000)
    p.add_argument("--workers", type=int, default=None, help="CPU worker threads (default min(2, cores))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--backend", default=None, choices=["auto", "triton", "reference"])
    p.add_argument("--in-flight", type=int, default=None,
                   help="GPU fused step: one Hogwild launch per batch with this many pairs in flight "
                        "(default: one launch per 256-pair minibatch)")
    p.add_argument("--no-fused", action="store_true", help="train with the autograd loss instead of sgns_step")
    p.add_argument("--eval", default=None, help="word-pair file (e.g. wordsim353.tsv): print Spearman after training")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)

    device = a.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = Word2Vec(corpus_file=a.corpus, vector_size=a.vector_size, window=a.window, negative=a.negative,
                         min_count=a.min_count, sample=a.sample, alpha=a.alpha, min_alpha=a.min_alpha,
                         epochs=a.epochs, ns_exponent=a.ns_exponent, max_vocab_size=a.max_vocab_size,
                         batch_words=a.batch_words, workers=a.workers, seed=a.seed, device=device,
                         backend=a.backend, fused=not a.no_fused, in_flight=a.in_flight,
                         progress=None if a.quiet else print_progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.save_word2vec_format(a.out, binary=a.binary)
    words_per_s = model.trained_words / model.train_seconds
    print(f"trained {model.trained_words} words ({len(model.wv)} in vocabulary, {model.epochs} epochs) in "
          f"{model.train_seconds:.2f} s on {device}: {words_per_s:,.0f} words/s; "
          f"mean pair loss {model.mean_pair_loss:.4f}; vectors written to {a.out}")
    if a.eval:
        r = model.evaluate_word_pairs(a.eval)
        print(f"{a.eval}: spearman {r.spearman:.4f} pearson {r.pearson:.4f} oov {r.oov_ratio:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
