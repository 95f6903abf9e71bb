mamba3_test(test_linear ops/test_linear.cpp)
mamba3_test(test_norm ops/test_norm.cpp)
