# GPU training of the whole language model: the flat parameter store, the model's loss and gradient, and the
# CUDA TrainEngine. Links the per-part training libraries (mixer, dense ops, attention).
if(TARGET mamba3_cuda)
  add_library(mamba3_cuda_train STATIC
    ${CMAKE_CURRENT_LIST_DIR}/train/param_store_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/train/lm_train_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/train/train_engine_gpu.cpp
  )
  target_link_libraries(mamba3_cuda_train PUBLIC mamba3_cuda_train_mixer mamba3_cuda_train_ops
                                                 mamba3_cuda_train_attention mamba3_cuda)
endif()
