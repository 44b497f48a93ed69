# NSA, native sparse attention (issue 12): golden nsa.case{0,1}, reference vs fast, cache.
seqmix_add_test_executable(seqmix_tests_nsa ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_nsa.cpp)
