# GPU training's dense ops (norms, GatedMLP, lm_head + cross-entropy, embedding backward) and the GPU AdamW:
# library mamba3_cuda_train_ops. Guarded: src/CMakeLists.txt's glob of */*.sources.cmake also includes this file
# before mamba3_cuda exists.
if(TARGET mamba3_cuda)
  add_library(mamba3_cuda_train_ops STATIC
    ${CMAKE_CURRENT_LIST_DIR}/train/norm_train_gpu.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/gated_mlp_train_gpu.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/gated_mlp_train_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/train/lm_head_loss_gpu.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/lm_head_loss_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/train/embedding_train_gpu.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/adamw_gpu.cu
  )
  target_link_libraries(mamba3_cuda_train_ops PUBLIC mamba3_cuda)
  set_target_properties(mamba3_cuda_train_ops PROPERTIES CUDA_ARCHITECTURES "${MAMBA3_CUDA_ARCH}")
  # (the fused products, train/fused_gemm.cu, are in mamba3_cuda's sm_90a objects: TrainGemm calls them)
endif()
