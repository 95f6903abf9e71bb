# Mamba-3 mixer backward: the float64 reference (per-token reverse mode) and the f32 chunked CPU path.
target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/ops/mamba3_reference_backward.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/ops/mamba3_scan_backward.cpp)
