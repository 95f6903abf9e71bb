# Core: dtypes and float conversions, Tensor, atomic writes, memory maps.
mamba3_test(test_core core/test_dtype.cpp core/test_tensor.cpp core/test_atomic_file.cpp core/test_mapped_file.cpp
            core/test_heap_retention.cpp)
target_link_libraries(test_core PRIVATE GTest::gmock)
