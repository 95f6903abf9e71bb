# GPU training of the hybrid attention mixer (src/cuda/train/attention_train_*): its own library.
# Guarded: src/CMakeLists.txt's glob of */*.sources.cmake also includes this file before mamba3_cuda exists.
if(TARGET mamba3_cuda)
  add_library(mamba3_cuda_train_attention STATIC
    ${CMAKE_CURRENT_LIST_DIR}/train/attention_train_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/train/attention_train_elementwise.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/attention_train_attention.cu
  )
  target_link_libraries(mamba3_cuda_train_attention PUBLIC mamba3_cuda)
  set_target_properties(mamba3_cuda_train_attention PROPERTIES CUDA_ARCHITECTURES "${MAMBA3_CUDA_ARCH}")
endif()
