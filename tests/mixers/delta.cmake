# Delta-rule family (DeltaNet, Gated DeltaNet): one executable for both mixers.
seqmix_add_test_executable(seqmix_tests_delta ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_delta_net.cpp
                           ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_gated_delta_net.cpp)
