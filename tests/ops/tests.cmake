mamba3_test(test_linear ops/test_linear.cpp)
