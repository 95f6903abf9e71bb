# The per-shape tuned bf16 matrix product (src/cuda/gemm_tuner.*) against float64, and under graph capture (label cuda).
mamba3_cuda_test(test_gemm_tuner_gpu ${CMAKE_CURRENT_LIST_DIR}/test_gemm_tuner_gpu.cpp)
