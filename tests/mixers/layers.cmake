# Layer tier (issue 13): building blocks and mixer layers with weights (include/seqmix/layers).
seqmix_add_test_executable(
  seqmix_tests_layers
  ${CMAKE_CURRENT_SOURCE_DIR}/layers/test_blocks.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/layers/test_layers.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/layers/test_timemix.cpp)
