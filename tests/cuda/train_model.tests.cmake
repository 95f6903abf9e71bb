# GPU training of the whole language model against the CPU (src/cuda/train/lm_train_gpu.*, train_engine_gpu.*).
if(TARGET mamba3_cuda_train)
  mamba3_cuda_test(test_lm_train_gpu ${CMAKE_CURRENT_LIST_DIR}/test_lm_train_gpu.cpp)
  target_link_libraries(test_lm_train_gpu PRIVATE mamba3_cuda_train)
  # The GatedMLP through the fused products (docs/kernels/fused_gemm.md; opt-in: slower than cuBLAS on an H100).
  add_test(NAME test_lm_train_gpu_fused_mlp COMMAND test_lm_train_gpu)
  set_tests_properties(test_lm_train_gpu_fused_mlp PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_TRAIN_FUSED_GEMM=1)
endif()
# The CLI on a GPU: train --device cuda (checkpoint, CPU agreement, exact resume) and task --device cuda.
if(TARGET mamba3_cuda_train AND TARGET mamba3_cli)
  add_test(NAME test_train_cli_gpu COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_train_cli_gpu.sh $<TARGET_FILE:mamba3_cli>)
  set_tests_properties(test_train_cli_gpu PROPERTIES LABELS cuda SKIP_RETURN_CODE 77 TIMEOUT 300)
endif()
