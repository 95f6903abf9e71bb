# Language-model training gradient: finite differences on whole tiny models, loss = prefill cross-entropy, overfit.
mamba3_test(test_lm_gradients_fd train/test_lm_gradients_fd.cpp)
mamba3_test(test_lm_loss train/test_lm_loss.cpp)
