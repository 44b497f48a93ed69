# Mixture of experts (issue 19): routers, capacity, grouped and per-token forms, golden blocks.
seqmix_add_test_executable(seqmix_tests_moe ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_moe.cpp)
