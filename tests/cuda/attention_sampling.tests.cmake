# GPU attention mixer and GPU sampler against their CPU counterparts (label cuda).
mamba3_cuda_test(test_attention_gpu ${CMAKE_CURRENT_LIST_DIR}/test_attention_gpu.cpp)
mamba3_cuda_test(test_sampling_gpu ${CMAKE_CURRENT_LIST_DIR}/test_sampling_gpu.cpp)
# The server on the CUDA backend: GPU decode slots vs the CPU model, the engine's exactness guarantees, HTTP.
if(TARGET mamba3_server_cuda)
  mamba3_cuda_test(test_server_gpu ${CMAKE_CURRENT_LIST_DIR}/test_server_gpu.cpp)
  target_link_libraries(test_server_gpu PRIVATE mamba3_server_cuda PkgConfig::HTTPLIB)
endif()
