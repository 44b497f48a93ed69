# RWKV family on the shared engines: rwkv6 (gated engine, exclusive readout).
seqmix_add_test_executable(seqmix_tests_rwkv ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_rwkv6.cpp)
