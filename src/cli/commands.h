// The subcommands of the mopt program. Each is thin: it parses nothing itself
// (main.cpp does) and calls into the library.
#pragma once

#include <string>

namespace mopt::cli {

struct InspectOptions {
  std::string path;
  bool tensors = false;
  bool json = false;
};
int run_inspect(const InspectOptions& options);

// "mopt 0.1.0" and the CPU features this build uses.
std::string version_text();

}  // namespace mopt::cli
