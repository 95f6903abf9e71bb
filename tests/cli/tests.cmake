add_test(NAME test_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/test_cli.sh $<TARGET_FILE:mamba3_cli>)
set_tests_properties(test_cli PROPERTIES LABELS cpu
  ENVIRONMENT "MAMBA3_GOLDEN_DIR_DEFAULT=${MAMBA3_DEFAULT_GOLDEN_DIR}")
# `make demo`'s path: generate (and eval) without -m use the shipped models/default.
add_test(NAME test_demo COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/test_demo.sh $<TARGET_FILE:mamba3_cli>)
set_tests_properties(test_demo PROPERTIES LABELS cpu TIMEOUT 120)
