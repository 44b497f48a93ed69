# MoBA, mixture of block attention (issue 12): golden MoBA cases, reference vs tiled prefill and
# decode cache, threads, bad input.
seqmix_add_test_executable(seqmix_tests_moba ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_moba.cpp)
