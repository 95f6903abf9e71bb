target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/infer/generator.cpp)
