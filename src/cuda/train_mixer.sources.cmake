# GPU training of the Mamba-3 mixer (forward + backward, SISO and MIMO): its own library on top of mamba3_cuda.
# Included twice by the build (once before mamba3_cuda exists), hence the guard.
if(TARGET mamba3_cuda)
  add_library(mamba3_cuda_train_mixer STATIC
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_token.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_angle_blocks.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_chunk.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_batched.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_siso.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_mimo.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_bwd_core.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_fwd_core.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_state_chain.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_kv_chain.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/mamba3_train_fwd_walk.cu
    ${CMAKE_CURRENT_LIST_DIR}/train/out_proj_beside.cu)
  target_link_libraries(mamba3_cuda_train_mixer PUBLIC mamba3_cuda)
  set_target_properties(mamba3_cuda_train_mixer PROPERTIES CUDA_ARCHITECTURES "${MAMBA3_CUDA_ARCH}")
endif()
