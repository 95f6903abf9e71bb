# GPU attention mixer training (forward, backward) against the CPU train/attention_layer_grad (label cuda).
mamba3_cuda_test(test_attention_train_gpu ${CMAKE_CURRENT_LIST_DIR}/test_attention_train_gpu.cpp)
target_link_libraries(test_attention_train_gpu PRIVATE mamba3_cuda_train_attention)
