# Causality of every chunked form (planted NaN/inf after position t), GLA's factored-path range,
# oversized chunk/window options, decode vs prefill on NaN keys (issue 20).
seqmix_add_test_executable(seqmix_tests_causality ${CMAKE_CURRENT_SOURCE_DIR}/mixers/test_causality.cpp)
