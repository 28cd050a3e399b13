# ruff: noqa: B023, UP031  (the lambdas are timed inside their own iteration)
"""Quick H100 check of the plain attention path against SDPA's flash backend (one lease, no harness).

    EMBEDATTN_AUTOTUNE=0 python benchmarks/scripts/attn_quick.py

Prints fwd and bwd TFLOP/s per (dtype, D, causal, N) with B*N = 32k tokens, H*D = 2048, and the max
abs difference of the outputs. reports/h100/attention_quick_fixed_configs.txt is one run of it.
"""

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import embedattn
from embedattn.kernels import attention as KA


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128):
            for causal in (False, True):
                for N in (1024, 4096, 8192, 16384):
                    B, H = max(1, 32768 // N), 16 if D == 128 else 32
                    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    flops = 4 * B * H * N * N * D * (0.5 if causal else 1)
                    o = embedattn.attention(q, k, v, causal=causal)
                    do = torch.randn_like(o)
                    t_f = bench(lambda: embedattn.attention(q, k, v, causal=causal))
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        t_sf = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        o_s = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        t_sb = bench(lambda: torch.autograd.grad(o_s, (q, k, v), do, retain_graph=True))
                    t_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                    err = (o.float() - o_s.float()).abs().max().item()
                    r = (str(dtype)[6:], D, causal, N, flops / t_f * 1e-9, flops / t_sf * 1e-9,
                         2.5 * flops / t_b * 1e-9, 2.5 * flops / t_sb * 1e-9, err, KA.last_config().get("fwd", ""))
                    print("%s D%d c%d N%5d  fwd %6.1f vs sdpa %6.1f TF/s  bwd %6.1f vs %6.1f  err %.1e  %s" % r,
                          flush=True)


if __name__ == "__main__":
    main()
