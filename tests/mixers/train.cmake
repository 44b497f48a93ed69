# Training building blocks (issue 15): finite-difference checks in double of every block's
# backward (embedding, linear, rms_norm, l2norm, short conv + SiLU, SwiGLU, gates,
# cross-entropy) and AdamW against a hand-computed step.
seqmix_add_test_executable(seqmix_tests_train
  ${CMAKE_CURRENT_SOURCE_DIR}/train/test_train_blocks.cpp)
