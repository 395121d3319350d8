# The build's layering check, run as `cmake -P` before a module compiles (CMakeLists.txt,
# edkm_module): every #include "x/..." in src/<MODULE>/ must name a module in ALLOWED, the
# module itself and what its target links, directly or through its dependencies. An include of
# a module above it fails the build with the file, the line and what to do.
#   -DMODULE=model -DALLOWED=model,common,tokenizer -DSRC=<repo>/src [-DSTAMP=<file to touch>]
cmake_minimum_required(VERSION 3.18)
foreach(var MODULE ALLOWED SRC)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_layering.cmake: -D${var}= is required")
  endif()
endforeach()
string(REPLACE "," ";" allowed "${ALLOWED}")
file(GLOB_RECURSE files "${SRC}/${MODULE}/*.h" "${SRC}/${MODULE}/*.cpp")
set(errors "")
foreach(f IN LISTS files)
  file(STRINGS "${f}" lines REGEX "^[ \t]*#[ \t]*include[ \t]+\"")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]+\"([^\"]*)\".*" "\\1" header "${line}")
    if(NOT header MATCHES "/")
      continue()  # pch.h, or a header beside the file
    endif()
    string(REGEX REPLACE "/.*" "" target_module "${header}")
    if(NOT target_module IN_LIST allowed)
      file(RELATIVE_PATH rel "${SRC}/.." "${f}")
      string(APPEND errors "  ${rel}: #include \"${header}\": module '${MODULE}' does not depend on '${target_module}'\n")
    endif()
  endforeach()
endforeach()
if(errors)
  message(FATAL_ERROR "layering: ${MODULE} may include only ${ALLOWED} (the modules its CMake target links):\n"
          "${errors}Move the code to a module that may use it, or declare the dependency in CMakeLists.txt "
          "(dependencies point down: docs/architecture.md).")
endif()
if(DEFINED STAMP)
  file(TOUCH "${STAMP}")
endif()
