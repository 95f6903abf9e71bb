# Training: AdamW and schedules, token data, checkpoints, the training loop and its loss curve, held-out perplexity.
target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/train/optimizer.cpp ${CMAKE_CURRENT_SOURCE_DIR}/train/data.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/checkpoint.cpp ${CMAKE_CURRENT_SOURCE_DIR}/train/trainer.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/loss_curve.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/perplexity.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/train_engine.cpp)
