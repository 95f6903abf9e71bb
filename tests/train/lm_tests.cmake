# Language-model training gradient: finite differences on whole tiny models, loss = prefill cross-entropy, overfit.
mamba3_test(test_lm_gradients_fd train/test_lm_gradients_fd.cpp)
mamba3_test(test_lm_loss train/test_lm_loss.cpp)
# Many short parallel regions per training step: on a shared, loaded machine, spinning OpenMP waiters starve the
# workers (measured: the overfit test's 2.5 ms steps took 500 ms with the default spin policy).
set_tests_properties(test_lm_gradients_fd test_lm_loss PROPERTIES ENVIRONMENT OMP_WAIT_POLICY=passive)
