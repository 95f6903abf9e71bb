# GPU attention mixer and GPU sampler against their CPU counterparts (label cuda).
mamba3_cuda_test(test_attention_gpu ${CMAKE_CURRENT_LIST_DIR}/test_attention_gpu.cpp)
mamba3_cuda_test(test_sampling_gpu ${CMAKE_CURRENT_LIST_DIR}/test_sampling_gpu.cpp)
