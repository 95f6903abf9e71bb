# GPU training's dense ops and AdamW against their CPU counterparts (label cuda).
mamba3_cuda_test(test_train_ops_gpu ${CMAKE_CURRENT_LIST_DIR}/test_train_ops_gpu.cpp)
target_link_libraries(test_train_ops_gpu PRIVATE mamba3_cuda_train_ops)
