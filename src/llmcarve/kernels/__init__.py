"""Fast inference paths for carved models (GPU first, with CPU fallbacks that compute the same function).

- `moe_mlp`: the ToMoE MLP (top-1 of E experts over channel subsets) without host synchronisation:
  grouped GEMMs over tokens sorted by expert for many tokens, the masked union for a few.
- `triton_ops`: the fused elementwise kernels those paths use on CUDA (imported lazily: Triton is
  optional and absent on CPU-only installs).
- `static_decode`: greedy decoding with a static KV cache, captured once in a CUDA graph.

`moe_mlp` is what a carved MoE model runs by default (`CarvedConfig.moe_impl = "auto"`); the static
decoder is a separate entry point. `bench/` measures both against the reference paths of
`llmcarve.models.carved`, and `tests/test_kernels.py` checks them against those on the CPU.
"""
