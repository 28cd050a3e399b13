"""Benchmark sweeps: ``python -m benchmarks [--suite ...] [--quick] [--device ...] [--out DIR]``.

- ``harness``: timing (do_bench on CUDA, host timer on CPU, rotating inputs), work formulas, device
  peaks, autotuned-config capture and the long-format ``results.csv``.
- ``attention``, ``embedding``, ``negative_sampling``: the sweeps and their peers.
- ``plot`` and ``summary``: PNGs and summary.md drawn from a results.csv alone.
- ``cli``: what the three commands share: one-line errors (exit status 2), argument checks.
- ``gpu/``: the scripts of a GPU lease (gpu_session.sh, gpu_check.sh, gpu_install.sh, hopper_attention.py).
"""
