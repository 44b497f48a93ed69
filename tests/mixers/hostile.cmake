# Hostile input: bad shapes, values, options and aliasing per family and entry; every case
# asserts the function, argument and numbers of the message.
seqmix_add_test_executable(
  seqmix_tests_hostile
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_hostile_gated.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_hostile_delta.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_hostile_attention.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_steady_state_alloc.cpp)
