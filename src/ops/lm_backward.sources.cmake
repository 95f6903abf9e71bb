# Backward of the language model's ops (training): norms, linear layers, attention.
target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/ops/attention_backward.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/ops/linear_backward.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/ops/norm_backward.cpp)
