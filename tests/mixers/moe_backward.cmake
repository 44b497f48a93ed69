# MoE backward (issue 15, item 2): finite differences of the double reference for every router
# kind, the fast engine against it, 1 vs 2 threads bitwise, bf16 weights, bad inputs.
seqmix_add_test_executable(seqmix_tests_moe_backward
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_moe_backward.cpp)
