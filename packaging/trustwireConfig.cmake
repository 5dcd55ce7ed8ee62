# find_package(trustwire) for an installed trustwire: the targets trustwire::trustwire (shared
# library) and trustwire::trustwire_static. Paths are computed from this file's location, so an
# installed tree can be moved.
get_filename_component(_trustwire_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

if(NOT TARGET trustwire::trustwire)
  add_library(trustwire::trustwire SHARED IMPORTED)
  set_target_properties(trustwire::trustwire PROPERTIES
    IMPORTED_LOCATION "${_trustwire_prefix}/lib/libtrustwire.so"
    IMPORTED_NO_SONAME TRUE
    INTERFACE_INCLUDE_DIRECTORIES "${_trustwire_prefix}/include")
endif()

if(NOT TARGET trustwire::trustwire_static)
  find_package(Threads REQUIRED)
  add_library(trustwire::trustwire_static STATIC IMPORTED)
  set_target_properties(trustwire::trustwire_static PROPERTIES
    IMPORTED_LOCATION "${_trustwire_prefix}/lib/libtrustwire.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_trustwire_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
endif()

unset(_trustwire_prefix)
