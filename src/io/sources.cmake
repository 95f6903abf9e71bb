target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/io/torch_checkpoint.cpp ${CMAKE_CURRENT_SOURCE_DIR}/io/weights.cpp)
