# MLA latent cache (issue 13): mla_attention's absorbed decode over the compressed cache against
# its expanded cache, and the kimi_linear golden model run with it (layers/mla_attention.hpp).
seqmix_add_test_executable(seqmix_tests_mla_latent
                           ${CMAKE_CURRENT_SOURCE_DIR}/layers/test_mla_latent.cpp)
