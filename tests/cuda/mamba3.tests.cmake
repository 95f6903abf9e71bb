mamba3_cuda_test(test_mamba3_gpu ${CMAKE_CURRENT_LIST_DIR}/test_mamba3_gpu.cpp)
mamba3_cuda_test(test_model_gpu ${CMAKE_CURRENT_LIST_DIR}/test_model_gpu.cpp)
mamba3_cuda_test(test_gemv_gpu ${CMAKE_CURRENT_LIST_DIR}/test_gemv_gpu.cpp)
mamba3_cuda_test(test_stream_gemm_gpu ${CMAKE_CURRENT_LIST_DIR}/test_stream_gemm_gpu.cpp)
# linear() routing every bf16 product of up to 128 rows through the opt-in stream GEMM (bias, strided rows).
add_test(NAME test_gemv_gpu_stream_gemm COMMAND test_gemv_gpu --gtest_filter=*LinearDispatch*)
set_tests_properties(test_gemv_gpu_stream_gemm PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_STREAM_GEMM=all
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# The stream GEMM's wide class with each tile height forced (its grids choose by cost otherwise; 64: the WideShort
# form, two blocks per SM).
foreach(tile 64 128 256)
  add_test(NAME test_stream_gemm_gpu_wide_tile_${tile} COMMAND test_stream_gemm_gpu
           --gtest_filter=*MatchesFloat64*:*BatchInvariant*:*GatedPairs*:*FoldedNorm*)
  set_tests_properties(test_stream_gemm_gpu_wide_tile_${tile} PROPERTIES LABELS cuda
                       ENVIRONMENT MAMBA3_STREAM_GEMM_WIDE_TILE=${tile} SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
endforeach()
# The folded norms with the split forced too: unsplit tiles (every warp's part written and read back in one block) and
# two blocks per tile (half the batch rows each).
foreach(split 1 2)
  foreach(tile 128 256)
    add_test(NAME test_stream_gemm_gpu_folded_split_${split}_tile_${tile} COMMAND test_stream_gemm_gpu
             --gtest_filter=*FoldedNorm*)
    set_tests_properties(test_stream_gemm_gpu_folded_split_${split}_tile_${tile} PROPERTIES LABELS cuda
                         ENVIRONMENT "MAMBA3_STREAM_GEMM_SPLIT=${split};MAMBA3_STREAM_GEMM_WIDE_TILE=${tile}"
                         SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
  endforeach()
endforeach()
# The narrow forms through the fragment epilogue (the default before the thirty-eighth session; an A/B option now).
add_test(NAME test_stream_gemm_gpu_fragment_epilogue COMMAND test_stream_gemm_gpu)
set_tests_properties(test_stream_gemm_gpu_fragment_epilogue PROPERTIES LABELS cuda
                     ENVIRONMENT MAMBA3_STREAM_GEMM_EPILOGUE=fragments SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# Every tile's k-blocks started at its own offset (an A/B option): the same sums in another order per tile.
add_test(NAME test_stream_gemm_gpu_rotate COMMAND test_stream_gemm_gpu
         --gtest_filter=*MatchesFloat64*:*BatchInvariant*:*GatedPairs*:*FoldedNorm*)
set_tests_properties(test_stream_gemm_gpu_rotate PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_STREAM_GEMM_ROTATE=1
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# Each stage's products left in flight while the next stage's are issued (an A/B option): the same sums, the stages
# released one step later.
add_test(NAME test_stream_gemm_gpu_wgmma_depth COMMAND test_stream_gemm_gpu)
set_tests_properties(test_stream_gemm_gpu_wgmma_depth PROPERTIES LABELS cuda
                     ENVIRONMENT MAMBA3_STREAM_GEMM_WGMMA_DEPTH=1 SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# Decode steps of 70 and 128 rows with their bf16 products (fc1 with its activation, the lm_head) through the stream
# GEMM's wide class, with and without the norms folded into them.
add_test(NAME test_model_gpu_stream_gemm_wide COMMAND test_model_gpu --gtest_filter=*WideBatch*)
set_tests_properties(test_model_gpu_stream_gemm_wide PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_STREAM_GEMM=all
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# The same decodes with the stream GEMM off: cuBLAS products and the add + norm kernels at 70 and 128 rows (nothing
# folds; the default folds there on sm_90).
add_test(NAME test_model_gpu_stream_gemm_off COMMAND test_model_gpu --gtest_filter=*WideBatch*)
set_tests_properties(test_model_gpu_stream_gemm_off PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_STREAM_GEMM=0
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# Every matrix-vector product asking L2 for its block's weights up front: decode must give the same logits. The stream
# GEMM off, so that the bf16 decodes of 2–4 rows (GraphReplayEqualsEager at batch 4, the golden cases at 2) reach the
# matrix-vector kernel on sm_90 too (it takes only batch 1 there otherwise); the f32 tests never do.
add_test(NAME test_model_gpu_gemv_prefetch COMMAND test_model_gpu
         --gtest_filter=*GraphReplay*:*MatchesCpuOnRandomModels*:*GoldenCasesBf16*:*GreedyGeneration*)
set_tests_properties(test_model_gpu_gemv_prefetch PROPERTIES LABELS cuda
                     ENVIRONMENT "MAMBA3_GEMV_PREFETCH=1;MAMBA3_STREAM_GEMM=0"
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# The same decodes with the Mamba-3 head kernel waiting before it requests its state rows and the one-row steps' norms
# as kernels of their own (MAMBA3_DECODE_EARLY_STATE=0, MAMBA3_DECODE_NORM_FOLD=0: the paths before the thirty-sixth
# session, kept as the switches' other sides).
add_test(NAME test_model_gpu_plain_decode COMMAND test_model_gpu
         --gtest_filter=*GraphReplay*:*MatchesCpuOnRandomModels*:*GoldenCases*:*GreedyGeneration*)
set_tests_properties(test_model_gpu_plain_decode PROPERTIES LABELS cuda
                     ENVIRONMENT "MAMBA3_DECODE_EARLY_STATE=0;MAMBA3_DECODE_NORM_FOLD=0"
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
# Every decode of the model tests with every-step state writes (SISO caches defer them to every second step by
# default): the golden cases, the CPU comparisons, greedy generation, graph replay and the wide batches must hold as
# they do with deferred writes.
add_test(NAME test_model_gpu_state_writes_1 COMMAND test_model_gpu
         --gtest_filter=*Golden*:*MatchesCpuOnRandomModels*:*GreedyGeneration*:*GraphReplay*:*WideBatch*:*Bf16State*)
set_tests_properties(test_model_gpu_state_writes_1 PROPERTIES LABELS cuda ENVIRONMENT MAMBA3_DECODE_STATE_WRITES=1
                     SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
