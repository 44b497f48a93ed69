# Softmax attention family (issue 4): softmax_attention, sliding_window_attention, kv_cache.
seqmix_add_test_executable(seqmix_tests_attention
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_softmax_attention.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_sliding_window_attention.cpp)
