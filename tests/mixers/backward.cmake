# Backward passes (issue 15): reference, chunked gated family, flash softmax backward.
seqmix_add_test_executable(seqmix_tests_backward
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_backward.cpp)
