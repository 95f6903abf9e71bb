# The GPU attention mixer and the GPU sampler (src/cuda/attention_gpu.*, src/cuda/sampling_gpu.*).
# Guarded: src/CMakeLists.txt's glob of */*.sources.cmake also includes this file before mamba3_cuda exists.
if(TARGET mamba3_cuda)
  target_sources(mamba3_cuda PRIVATE
    ${CMAKE_CURRENT_LIST_DIR}/attention_gpu.cu
    ${CMAKE_CURRENT_LIST_DIR}/attention_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/sampling_gpu.cu
    ${CMAKE_CURRENT_LIST_DIR}/sampling_gpu.cpp
  )
endif()
