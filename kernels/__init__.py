"""Triton kernels and their launchers (installed as ``embedattn.kernels``).

Nothing here checks arguments: the public API in ``embedattn`` does that before calling a launcher.
Importing this package needs Triton.
"""
