# GPU training's dense ops and AdamW against their CPU counterparts (label cuda).
mamba3_cuda_test(test_train_ops_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_ops_gpu.cpp)
target_link_libraries(test_train_ops_gpu PRIVATE mamba3_cuda_train_ops)
# Product operands rounded by their producers against rounding afterwards (label cuda).
mamba3_cuda_test(test_train_bf16_operands_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_bf16_operands_gpu.cpp)
target_link_libraries(test_train_bf16_operands_gpu PRIVATE mamba3_cuda_train_ops)
# The one-launch AdamW over the flat parameter store against per-tensor updates (label cuda).
mamba3_cuda_test(test_adamw_flat_gpu ${CMAKE_CURRENT_LIST_DIR}/test_adamw_flat_gpu.cpp)
target_link_libraries(test_adamw_flat_gpu PRIVATE mamba3_cuda_train_ops)
# The training products' persisted cuBLASLt algorithm table (label cuda).
mamba3_cuda_test(test_train_gemm_algos_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_gemm_algos_gpu.cpp)
target_link_libraries(test_train_gemm_algos_gpu PRIVATE mamba3_cuda_train_ops)
