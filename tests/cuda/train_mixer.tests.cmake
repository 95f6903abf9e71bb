# GPU training of the Mamba-3 mixer (Mamba3TrainGpu) against the CPU backward and the golden gradients.
mamba3_cuda_test(test_mamba3_train_gpu ${CMAKE_CURRENT_LIST_DIR}/test_mamba3_train_gpu.cpp)
target_link_libraries(test_mamba3_train_gpu PRIVATE mamba3_cuda_train_mixer)
# Its fast paths (kernel instances, state chains, fused cores, bf16 operands) against the paths they replace.
mamba3_cuda_test(test_mamba3_train_paths_gpu ${CMAKE_CURRENT_LIST_DIR}/test_mamba3_train_paths_gpu.cpp)
target_link_libraries(test_mamba3_train_paths_gpu PRIVATE mamba3_cuda_train_mixer)
