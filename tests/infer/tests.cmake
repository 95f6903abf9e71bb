mamba3_test(test_sampler infer/test_sampler.cpp)
target_link_libraries(test_sampler PRIVATE GTest::gmock)
