# Server tests: ModelCache rows joining/leaving, server pieces, the HTTP API against a live server on a free
# loopback port, and the official npm `openai` client (installed into the build folder by a fixture).
if(NOT TARGET mamba3_server)
  return()
endif()
mamba3_test(test_server_cache_rows server/test_cache_rows.cpp)
mamba3_test(test_server_units server/test_server_units.cpp)
target_link_libraries(test_server_units PRIVATE mamba3_server)
mamba3_test(test_server_http server/test_server_http.cpp)
target_link_libraries(test_server_http PRIVATE mamba3_server PkgConfig::HTTPLIB)
set_tests_properties(test_server_http PROPERTIES TIMEOUT 600)

if(TARGET mamba3_cli)
  set(MAMBA3_SERVER_NPM_ROOT ${CMAKE_BINARY_DIR}/server_openai_client)
  add_test(NAME server_openai_setup
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/setup_openai.sh ${MAMBA3_SERVER_NPM_ROOT})
  set_tests_properties(server_openai_setup PROPERTIES LABELS cpu FIXTURES_SETUP server_openai TIMEOUT 600)
  add_test(NAME test_server_openai_client
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_openai_client.sh $<TARGET_FILE:mamba3_cli> ${MAMBA3_SERVER_NPM_ROOT})
  set_tests_properties(test_server_openai_client PROPERTIES LABELS cpu FIXTURES_REQUIRED server_openai TIMEOUT 300
    ENVIRONMENT "MAMBA3_GOLDEN_DIR_DEFAULT=${MAMBA3_DEFAULT_GOLDEN_DIR}")
endif()
