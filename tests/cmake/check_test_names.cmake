# Run by the CTest test build.test_names: every Catch2 executable's test case names must be
# registrable one by one. catch_discover_tests passes names through CMake lists, so a name with
# ';' is split in two halves that each match no test case, and CTest reports both as passed
# without running anything. EXES: the executables (a '|'-separated list).
string(REPLACE "|" ";" exes "${EXES}")
set(bad "")
foreach(exe IN LISTS exes)
  execute_process(COMMAND "${exe}" --list-test-names-only OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  # Catch2 v2 exits with the number of test cases listed; a crash gives a message instead
  if(NOT rc MATCHES "^[0-9]+$" OR out STREQUAL "")
    message(FATAL_ERROR "${exe} --list-test-names-only failed (${rc})")
  endif()
  # one name per line; a ';' inside a name is what must not be there
  string(REPLACE ";" "<SEMICOLON>" out "${out}")
  string(REPLACE "\n" ";" lines "${out}")
  foreach(line IN LISTS lines)
    if(line MATCHES "<SEMICOLON>")
      string(REPLACE "<SEMICOLON>" "\\;" shown "${line}")
      string(APPEND bad "\n  ${exe}: \"${shown}\"")
    endif()
  endforeach()
endforeach()
if(bad)
  message(FATAL_ERROR "test case names with ';' (CTest would never run them; use ','):${bad}")
endif()
list(LENGTH exes n)
message(STATUS "test names: ${n} executables checked")
