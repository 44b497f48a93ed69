# Diagonal-plus-low-rank delta family (KDA, RWKV-7): one executable for both mixers.
seqmix_add_test_executable(seqmix_tests_dplr ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_kda.cpp
                           ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_rwkv7.cpp)
