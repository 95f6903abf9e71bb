# io: safetensors reader (header validation, zero-copy views) and atomic writer.
mamba3_test(test_safetensors io/test_safetensors.cpp)
target_link_libraries(test_safetensors PRIVATE GTest::gmock)

# libFuzzer target for the safetensors reader: clang only, opt-in, so a gcc build never sees it.
option(MAMBA3_FUZZ "Build libFuzzer targets (clang only)" OFF)
if(MAMBA3_FUZZ)
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    # The reader's own sources are compiled in (not linked from mamba3) so they carry the coverage instrumentation.
    set(src ${PROJECT_SOURCE_DIR}/src)
    add_executable(fuzz_safetensors ${CMAKE_CURRENT_LIST_DIR}/../fuzz/fuzz_safetensors.cpp
      ${src}/core/dtype.cpp ${src}/core/tensor.cpp ${src}/core/mapped_file.cpp ${src}/core/atomic_file.cpp
      ${src}/io/safetensors.cpp)
    target_include_directories(fuzz_safetensors PRIVATE ${src})
    target_compile_options(fuzz_safetensors PRIVATE -g -fsanitize=fuzzer,address,undefined -fno-omit-frame-pointer)
    target_link_options(fuzz_safetensors PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(fuzz_safetensors PRIVATE mamba3_flags nlohmann_json::nlohmann_json fmt::fmt)
  else()
    message(WARNING "MAMBA3_FUZZ needs clang (compiler is ${CMAKE_CXX_COMPILER_ID}); fuzz targets are skipped")
  endif()
endif()
