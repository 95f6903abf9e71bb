# Training: the language model's loss and gradient (forward with saved activations, backward of every layer).
target_sources(mamba3 PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/train/attention_layer_grad.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/gated_mlp_grad.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/lm_gradients.cpp
                              ${CMAKE_CURRENT_SOURCE_DIR}/train/lm_head_loss.cpp)
