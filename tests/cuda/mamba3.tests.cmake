mamba3_cuda_test(test_mamba3_gpu ${CMAKE_CURRENT_LIST_DIR}/test_mamba3_gpu.cpp)
mamba3_cuda_test(test_model_gpu ${CMAKE_CURRENT_LIST_DIR}/test_model_gpu.cpp)
mamba3_cuda_test(test_gemv_gpu ${CMAKE_CURRENT_LIST_DIR}/test_gemv_gpu.cpp)
mamba3_cuda_test(test_stream_gemm_gpu ${CMAKE_CURRENT_LIST_DIR}/test_stream_gemm_gpu.cpp)
