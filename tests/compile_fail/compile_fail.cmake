# Compile-fail tests (const misuse of views). Each snippet here compiles as written (built with
# the tests, with the full warning set), and must NOT compile with SEQMIX_SHOULD_FAIL defined:
# the test builds that variant and passes only if the compiler reports an error on the line
# marked "compile-fail:" (so a snippet broken for another reason cannot pass).
file(GLOB SEQMIX_COMPILE_FAIL_SNIPPETS CONFIGURE_DEPENDS "${CMAKE_CURRENT_LIST_DIR}/*.cpp")
add_library(seqmix_compile_fail_controls OBJECT ${SEQMIX_COMPILE_FAIL_SNIPPETS})
target_link_libraries(seqmix_compile_fail_controls PRIVATE seqmix::seqmix)
seqmix_target_defaults(seqmix_compile_fail_controls)
foreach(snippet IN LISTS SEQMIX_COMPILE_FAIL_SNIPPETS)
  get_filename_component(name "${snippet}" NAME_WE)
  file(READ "${snippet}" text)
  string(FIND "${text}" "// compile-fail:" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${snippet}: no line marked '// compile-fail:'")
  endif()
  string(SUBSTRING "${text}" 0 ${at} before)
  string(REGEX MATCHALL "\n" newlines "${before}")
  list(LENGTH newlines line)
  math(EXPR line "${line} + 1")
  set(target seqmix_compile_fail_${name})
  add_library(${target} OBJECT EXCLUDE_FROM_ALL "${snippet}")
  target_link_libraries(${target} PRIVATE seqmix::seqmix)
  target_compile_definitions(${target} PRIVATE SEQMIX_SHOULD_FAIL)
  seqmix_target_defaults(${target})
  add_test(NAME compile_fail.${name}
           COMMAND "${CMAKE_COMMAND}" --build "${CMAKE_BINARY_DIR}" --target ${target} --config
                   $<CONFIG>)
  # g++ and clang both print "<file>:<line>:<column>: error" (or, for an error inside a
  # template, "<file>:<line>:<column>:   required from here" on the snippet's line).
  set_tests_properties(compile_fail.${name} PROPERTIES
    PASS_REGULAR_EXPRESSION "${name}\\.cpp:${line}:[0-9]+: (error|fatal error|  required from here)"
    RESOURCE_LOCK seqmix_build_tree LABELS compile_fail TIMEOUT 300)
endforeach()
