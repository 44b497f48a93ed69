# Gated-accumulation family: linear attention, simple GLA / retention / Lightning, GLA, Mamba2 SSD.
seqmix_add_test_executable(
  seqmix_tests_gated
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_simple_gla.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_linear_attention.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_gla.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_mamba2_ssd.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_form_choice.cpp)
