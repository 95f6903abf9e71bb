# A host check (label cpu, no GPU needed): the stream GEMM's index arithmetic (src/cuda/stream_gemm_layout.h).
mamba3_test(test_stream_gemm_layout cuda/test_stream_gemm_layout.cpp)
