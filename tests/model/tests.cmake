mamba3_test(test_mixer_golden model/test_mixer_golden.cpp)
mamba3_test(test_mixer_properties model/test_mixer_properties.cpp)
mamba3_test(test_mixer_errors model/test_mixer_errors.cpp)
target_link_libraries(test_mixer_errors PRIVATE GTest::gmock)
