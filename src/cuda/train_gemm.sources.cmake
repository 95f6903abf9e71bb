# GPU training: the row-major matrix-product helper (f32 exact / bf16 mixed precision).
if(TARGET mamba3_cuda)
  target_sources(mamba3_cuda PRIVATE ${CMAKE_CURRENT_LIST_DIR}/train/train_gemm.cu
                                     ${CMAKE_CURRENT_LIST_DIR}/train/train_gemm_profile.cpp
                                     ${CMAKE_CURRENT_LIST_DIR}/train/train_gemm_algos.cpp)
endif()
