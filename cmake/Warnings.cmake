# Warnings are errors in our own code only; third-party headers come in as SYSTEM.
function(mopt_set_warnings target)
  target_compile_options(${target} PRIVATE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion
    -Wnon-virtual-dtor -Wold-style-cast -Wcast-align -Woverloaded-virtual
    -Wimplicit-fallthrough -Werror
    # GCC 12 reports false positives inside libstdc++ string code at -O3.
    $<$<CXX_COMPILER_ID:GNU>:-Wno-restrict -Wno-stringop-overflow -Wno-array-bounds>
    # clang says when an `omp simd` loop could not be vectorized (as under ASan); not a defect.
    $<$<CXX_COMPILER_ID:Clang>:-Wno-pass-failed>)
endfunction()
