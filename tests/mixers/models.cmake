# Models tier (issue 14): hybrid Linear-MoE models from the golden checkpoints
# (include/seqmix/models, layers/moe_ffn.hpp).
seqmix_add_test_executable(seqmix_tests_models ${CMAKE_CURRENT_SOURCE_DIR}/models/test_models.cpp)
