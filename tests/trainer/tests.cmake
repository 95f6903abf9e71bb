# Training tool: AdamW, schedules, data, checkpoints, the loop (with a small differentiable problem), and the CLI.
mamba3_test(test_trainer_optimizer trainer/test_optimizer.cpp)
mamba3_test(test_trainer_data trainer/test_data.cpp)
mamba3_test(test_trainer_loop trainer/test_trainer.cpp)
mamba3_test(test_trainer_checkpoint trainer/test_checkpoint.cpp)
if(TARGET mamba3_cli)
  add_test(NAME test_trainer_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/trainer/test_cli.sh $<TARGET_FILE:mamba3_cli>)
  set_tests_properties(test_trainer_cli PROPERTIES LABELS cpu TIMEOUT 300)
endif()
# Held-out perplexity (train/perplexity.h), and the shipped default model against the figure in its README.
mamba3_test(test_trainer_perplexity trainer/test_perplexity.cpp)
mamba3_test(test_default_model trainer/test_default_model.cpp)
target_compile_definitions(test_default_model PRIVATE MAMBA3_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
# GCC 12 reports a false maybe-uninitialized inside libstdc++'s <regex> at -O2 with the sanitizers (CI stage 2).
target_compile_options(test_default_model PRIVATE -Wno-maybe-uninitialized)
set_tests_properties(test_default_model PROPERTIES TIMEOUT 900)  # a 5.8M model scored on 143K bytes (~1 min; slower under ASan)
