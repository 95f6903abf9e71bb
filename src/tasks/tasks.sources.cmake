# Synthetic state-tracking tasks (parity, modular arithmetic with and without brackets): generators, the training
# and evaluation loop on the project's trainer pieces, and the accuracy-vs-length plot.
target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/tasks/state_tracking.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/tasks/task_runner.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/tasks/accuracy_plot.cpp)
