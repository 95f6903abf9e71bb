# Mamba-3 mixer layer backward (training).
target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/model/mamba3_mixer_backward.cpp)
