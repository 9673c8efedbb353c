// Picks the instruction-set level of the CPU row kernels (see lastlayer_rows.h).
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "cpu/lastlayer_rows.h"

#if defined(__x86_64__) || defined(_M_X64)
#define GRADOOD_X86_LEVELS 1
#endif

namespace gradood {
namespace cpu {
namespace DEFAULT {
const RowKernels& level_kernels();
}
#ifdef GRADOOD_X86_LEVELS
namespace PORTABLE {
const RowKernels& level_kernels();
}
namespace AVX2 {
const RowKernels& level_kernels();
}
namespace AVX512 {
const RowKernels& level_kernels();
}
#endif

namespace {

// kPortable: DEFAULT without SSE2, only when forced (what non-x86 CPUs run as DEFAULT).
enum Level { kPortable = -1, kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

std::string upper(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return text;
}

// The highest level this CPU runs, from its own feature bits.
Level supported() {
#if defined(GRADOOD_X86_LEVELS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? kAvx512 : avx2 ? kAvx2 : kDefault;
#else
  return kDefault;
#endif
}

Level parse(const std::string& name) {
  const std::string level = upper(name);
  if (level == "AVX512") return kAvx512;
  if (level == "AVX2") return kAvx2;
#ifdef GRADOOD_X86_LEVELS
  if (level == "PORTABLE") return kPortable;
#endif
  return kDefault;  // DEFAULT, and ATen's non-x86 levels (VSX, ZVECTOR, SVE256), which we do not
                    // build
}

Level choose() {
  const Level cpu_has = supported();
  const char* forced = std::getenv("GRADOOD_CPU_CAPABILITY");
  if (forced != nullptr && *forced != '\0') {
    const std::string level = upper(forced);
    TORCH_CHECK(level == "PORTABLE" || level == "DEFAULT" || level == "AVX2" || level == "AVX512",
                "GRADOOD_CPU_CAPABILITY must be portable, default, avx2 or avx512, got '", forced,
                "'");
    TORCH_CHECK(parse(level) <= cpu_has, "GRADOOD_CPU_CAPABILITY=", forced,
                " asks for instructions this CPU does not have; the highest it runs is ",
                cpu_has == kAvx512 ? "avx512"
                : cpu_has == kAvx2 ? "avx2"
                                   : "default");
    return parse(level);
  }
  // ATen's level (ATEN_CPU_CAPABILITY sets it for torch's kernels too), within the CPU's.
  return std::min(parse(at::get_cpu_capability()), cpu_has);
}

}  // namespace

const RowKernels& row_kernels() {
  static const RowKernels& kernels = []() -> const RowKernels& {
    switch (choose()) {
#ifdef GRADOOD_X86_LEVELS
      case kAvx512:
        return AVX512::level_kernels();
      case kAvx2:
        return AVX2::level_kernels();
      case kPortable:
        return PORTABLE::level_kernels();
#endif
      default:
        return DEFAULT::level_kernels();
    }
  }();
  return kernels;
}

std::string cpu_capability() { return row_kernels().capability; }

}  // namespace cpu
}  // namespace gradood
