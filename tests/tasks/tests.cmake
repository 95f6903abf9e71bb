# State-tracking tasks: generators checked by independent evaluators, the labelled-position loss, short CPU runs of
# every task, and the `mamba3 task` command end to end.
mamba3_test(test_task_generators tasks/test_task_generators.cpp)
mamba3_test(test_lm_labels tasks/test_lm_labels.cpp)
mamba3_test(test_task_runner tasks/test_task_runner.cpp)
set_tests_properties(test_lm_labels test_task_runner PROPERTIES ENVIRONMENT OMP_WAIT_POLICY=passive)
if(TARGET mamba3_cli)
  add_test(NAME test_task_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/tasks/test_task_cli.sh $<TARGET_FILE:mamba3_cli>
                                      ${PROJECT_SOURCE_DIR}/configs/tasks/arith)
  set_tests_properties(test_task_cli PROPERTIES LABELS cpu TIMEOUT 300 ENVIRONMENT OMP_WAIT_POLICY=passive)
endif()
