# GPU training of the whole language model against the CPU (src/cuda/train/lm_train_gpu.*, train_engine_gpu.*).
if(TARGET mamba3_cuda_train)
  mamba3_cuda_test(test_lm_train_gpu ${CMAKE_CURRENT_LIST_DIR}/test_lm_train_gpu.cpp)
  target_link_libraries(test_lm_train_gpu PRIVATE mamba3_cuda_train)
endif()
