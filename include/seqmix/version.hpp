// SPDX-License-Identifier: MIT
// seqmix version: the single source of truth (CMakeLists.txt parses these lines).
#pragma once

#define SEQMIX_VERSION_MAJOR 0
#define SEQMIX_VERSION_MINOR 1
#define SEQMIX_VERSION_PATCH 0

namespace seqmix {
/// Library version as "major.minor.patch".
inline constexpr const char* version_string = "0.1.0";
}  // namespace seqmix
