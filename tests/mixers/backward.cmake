# Backward passes (issue 15): reference, chunked gated family, flash softmax backward, and the
# checkpointed DPLR engine (DeltaNet, Gated DeltaNet, KDA, RWKV-7, RWKV-6).
seqmix_add_test_executable(seqmix_tests_backward
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_backward.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_backward_delta.cpp)
