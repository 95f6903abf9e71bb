# A source check (label cpu, no GPU needed): every training kernel waits on the kernel before it first (src/cuda/pdl.h).
mamba3_test(test_pdl_wait_first cuda/test_pdl_wait_first.cpp)
target_compile_definitions(test_pdl_wait_first PRIVATE MAMBA3_TRAIN_KERNEL_DIR="${PROJECT_SOURCE_DIR}/src/cuda/train")
