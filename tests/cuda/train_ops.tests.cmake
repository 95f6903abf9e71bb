# GPU training's dense ops and AdamW against their CPU counterparts (label cuda).
mamba3_cuda_test(test_train_ops_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_ops_gpu.cpp)
target_link_libraries(test_train_ops_gpu PRIVATE mamba3_cuda_train_ops)
# TrainGemm's bf16-result A·Bᵀ products and the lm_head on the fused products' plain kernel (MAMBA3_TRAIN_FUSED_GEMM_PLAIN;
# without an sm_90 device the products stay on cuBLAS).
add_test(NAME test_train_ops_gpu_fused_plain COMMAND test_train_ops_gpu --gtest_filter=*Bf16Output*:*LmHead*)
set_tests_properties(test_train_ops_gpu_fused_plain PROPERTIES LABELS cuda SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]"
                     ENVIRONMENT MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1)
# Product operands rounded by their producers against rounding afterwards (label cuda).
mamba3_cuda_test(test_train_bf16_operands_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_bf16_operands_gpu.cpp)
target_link_libraries(test_train_bf16_operands_gpu PRIVATE mamba3_cuda_train_ops)
# The one-launch AdamW over the flat parameter store against per-tensor updates (label cuda).
mamba3_cuda_test(test_adamw_flat_gpu ${CMAKE_CURRENT_LIST_DIR}/test_adamw_flat_gpu.cpp)
target_link_libraries(test_adamw_flat_gpu PRIVATE mamba3_cuda_train_ops)
# The training products' persisted cuBLASLt algorithm table (label cuda).
mamba3_cuda_test(test_train_gemm_algos_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_gemm_algos_gpu.cpp)
target_link_libraries(test_train_gemm_algos_gpu PRIVATE mamba3_cuda_train_ops)
# The fused products (TMA + wgmma with the GatedMLP's activation in their epilogues) against float64 and the
# element-wise kernels (label cuda; skipped without an sm_90 device).
mamba3_cuda_test(test_fused_gemm_gpu ${CMAKE_CURRENT_LIST_DIR}/test_fused_gemm_gpu.cpp)
target_link_libraries(test_fused_gemm_gpu PRIVATE mamba3_cuda_train_ops)
add_test(NAME test_fused_gemm_gpu_mlp COMMAND test_fused_gemm_gpu --gtest_filter=*GatedMlp*)
set_tests_properties(test_fused_gemm_gpu_mlp PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_TRAIN_FUSED_GEMM=1)
add_test(NAME test_fused_gemm_gpu_mlp_pingpong COMMAND test_fused_gemm_gpu --gtest_filter=*GatedMlp*)
set_tests_properties(test_fused_gemm_gpu_mlp_pingpong PROPERTIES LABELS cuda ENVIRONMENT
                     "MAMBA3_TRAIN_FUSED_GEMM=1;MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=pingpong")
add_test(NAME test_fused_gemm_gpu_mlp_multicast COMMAND test_fused_gemm_gpu --gtest_filter=*GatedMlp*)
set_tests_properties(test_fused_gemm_gpu_mlp_multicast PROPERTIES LABELS cuda ENVIRONMENT
                     "MAMBA3_TRAIN_FUSED_GEMM=1;MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=multicast")
# The epilogues of all three schedules through shared memory and bulk tensor stores (every test of the binary).
add_test(NAME test_fused_gemm_gpu_tma COMMAND test_fused_gemm_gpu)
set_tests_properties(test_fused_gemm_gpu_tma PROPERTIES LABELS cuda ENVIRONMENT
                     "MAMBA3_TRAIN_FUSED_GEMM=1;MAMBA3_TRAIN_FUSED_GEMM_STORE=tma")
# The same on the ping-pong schedule by default (the GatedMLP test), and with the gated backward's direct stores beside
# the others' shared-memory epilogues.
add_test(NAME test_fused_gemm_gpu_tma_pingpong COMMAND test_fused_gemm_gpu)
set_tests_properties(test_fused_gemm_gpu_tma_pingpong PROPERTIES LABELS cuda ENVIRONMENT
                     "MAMBA3_TRAIN_FUSED_GEMM=1;MAMBA3_TRAIN_FUSED_GEMM_STORE=tma;MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=pingpong")
add_test(NAME test_fused_gemm_gpu_tma_bwd_direct COMMAND test_fused_gemm_gpu)
set_tests_properties(test_fused_gemm_gpu_tma_bwd_direct PROPERTIES LABELS cuda ENVIRONMENT
                     "MAMBA3_TRAIN_FUSED_GEMM=1;MAMBA3_TRAIN_FUSED_GEMM_STORE=tma;MAMBA3_TRAIN_FUSED_GEMM_STORE_BWD=direct")
