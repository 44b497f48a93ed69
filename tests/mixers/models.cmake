# Models tier (issue 14): hybrid Linear-MoE models from the golden checkpoints
# (include/seqmix/models, layers/moe_ffn.hpp).
seqmix_add_test_executable(seqmix_tests_models ${CMAKE_CURRENT_SOURCE_DIR}/models/test_models.cpp
                           ${CMAKE_CURRENT_SOURCE_DIR}/models/test_qwen3_5.cpp)
# The comparer of the seqmix-generate CTest tests (examples/CMakeLists.txt adds those tests when
# both programs are built; the sanitizer preset builds no examples, so it skips the comparer).
if(SEQMIX_BUILD_EXAMPLES)
  add_executable(seqmix_models_check_generate ${CMAKE_CURRENT_SOURCE_DIR}/models/check_generate.cpp)
  target_link_libraries(seqmix_models_check_generate PRIVATE seqmix::seqmix)
  target_compile_definitions(seqmix_models_check_generate
                             PRIVATE SEQMIX_GOLDEN_DIR="${SEQMIX_GOLDEN_DIR_ABS}")
  seqmix_target_defaults(seqmix_models_check_generate)
endif()
