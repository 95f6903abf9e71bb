# A host check (label cpu, no GPU needed): the fused products' shared-memory epilogue layout
# (src/cuda/train/fused_gemm_layout.h).
mamba3_test(test_fused_gemm_layout cuda/test_fused_gemm_layout.cpp)
