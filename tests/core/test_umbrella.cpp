// SPDX-License-Identifier: MIT
// The umbrella headers in a test TU: every test executable is also built by clang in the
// sanitizer pass, which has no header self-containment check of its own (CMakePresets.json), so
// this TU is where clang compiles <seqmix/seqmix.hpp>, <seqmix/layers/layers.hpp> and
// <seqmix/version.hpp> with -Werror.
#include <cstdio>
#include <string>

#include <catch2/catch.hpp>

#include <seqmix/layers/layers.hpp>
#include <seqmix/seqmix.hpp>
#include <seqmix/version.hpp>

TEST_CASE("umbrella headers: the version macros and string agree", "[core][version]") {
  char expected[32];
  std::snprintf(expected, sizeof expected, "%d.%d.%d", SEQMIX_VERSION_MAJOR, SEQMIX_VERSION_MINOR,
                SEQMIX_VERSION_PATCH);
  CHECK(std::string(seqmix::version_string) == expected);
}
