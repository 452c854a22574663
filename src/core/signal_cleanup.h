// Temporary outputs (OUT.tmp-XXXXXX directories, files written beside their target) that a SIGINT
// or SIGTERM must not leave behind. install_signal_cleanup(), called by the program before it starts
// any other thread, blocks the two signals in every thread and starts one thread that waits for
// them: on one it removes every path registered at that moment, then ends the process by the same
// signal (exit status 128 + n in a shell), as the default action would have. Without it (the
// library in another program) registering is harmless and nothing is removed.
#pragma once

#include <cstddef>
#include <string>

namespace mopt {

void install_signal_cleanup();

// Registers `path` (a file or a directory tree) for removal on SIGINT/SIGTERM.
void remove_on_signal(const std::string& path);
// Unregisters it (renamed into place, or removed; a registered path that no longer exists costs nothing).
void keep_on_signal(const std::string& path);

// The paths registered now (for tests).
std::size_t paths_removed_on_signal();

}  // namespace mopt
