# Tokenizer tests. The reference implementations come from npm at test time: the fixture test below installs them
# into the build folder and exports vocabularies + reference ids; if node/npm or the registry are unavailable it fails,
# and ctest then fails the tests that need it (nothing is skipped silently).
set(MAMBA3_TOKENIZER_REFS_ROOT ${CMAKE_BINARY_DIR}/tokenizer_refs)

add_test(NAME tokenizer_refs_setup
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/setup_refs.sh ${MAMBA3_TOKENIZER_REFS_ROOT})
set_tests_properties(tokenizer_refs_setup PROPERTIES LABELS cpu FIXTURES_SETUP tokenizer_refs TIMEOUT 1200)

mamba3_test(tokenizer_unit_test ${CMAKE_CURRENT_LIST_DIR}/test_unit.cpp)
target_link_libraries(tokenizer_unit_test PRIVATE mamba3_tokenizer)

mamba3_test(tokenizer_refs_test ${CMAKE_CURRENT_LIST_DIR}/test_refs.cpp)
target_link_libraries(tokenizer_refs_test PRIVATE mamba3_tokenizer)
target_compile_definitions(tokenizer_refs_test PRIVATE MAMBA3_TOKENIZER_REFS_DIR="${MAMBA3_TOKENIZER_REFS_ROOT}/refs")
set_tests_properties(tokenizer_refs_test PROPERTIES FIXTURES_REQUIRED tokenizer_refs TIMEOUT 900)

if(TARGET mamba3_cli)
  add_test(NAME tokenizer_cli_test
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_cli.sh $<TARGET_FILE:mamba3_cli> ${MAMBA3_TOKENIZER_REFS_ROOT}/refs)
  set_tests_properties(tokenizer_cli_test PROPERTIES LABELS cpu FIXTURES_REQUIRED tokenizer_refs TIMEOUT 300)
endif()
