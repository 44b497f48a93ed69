# An imported target for xsimd's headers only. Debian's xsimd 8.1 exports a target that links a
# library `xtl` which is not packaged, so linking `xsimd` fails; seqmix needs only the headers.
if(NOT TARGET seqmix::xsimd)
  find_path(SEQMIX_XSIMD_INCLUDE_DIR xsimd/xsimd.hpp)
  if(NOT SEQMIX_XSIMD_INCLUDE_DIR)
    message(FATAL_ERROR "seqmix: xsimd headers not found (Debian: apt-get install libxsimd-dev)")
  endif()
  add_library(seqmix::xsimd INTERFACE IMPORTED)
  # SYSTEM keeps xsimd's own warnings out of -Werror builds.
  set_target_properties(seqmix::xsimd PROPERTIES INTERFACE_INCLUDE_DIRECTORIES
                                                 "${SEQMIX_XSIMD_INCLUDE_DIR}"
                                                 INTERFACE_SYSTEM_INCLUDE_DIRECTORIES
                                                 "${SEQMIX_XSIMD_INCLUDE_DIR}")
endif()
