// A sandbox for untrusted generated Python (code pass@1): the model's program plus the task's tests run
// in a separate process (fork/exec, no shell) in a fresh temporary directory that is removed afterwards.
// No libtorch here. What it sets up, in order of preference (each step recorded in the result, never
// claimed when it failed; docs/eval.md has what was measured on our machines):
//   - namespaces: unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID). The child is root
//     only inside its user namespace, mapped to `nobody` (65534) outside when we are root (so
//     RLIMIT_NPROC applies: the kernel exempts only real root / CAP_SYS_RESOURCE in the initial
//     namespace), or to the caller's uid otherwise. The new network namespace has only a down loopback.
//     Every mount is remounted read-only except a bind of the sandbox directory; the PID namespace makes
//     the whole process tree die with its init (no escape from the timeout kill by setsid()). All
//     capabilities are dropped (bounding set emptied, no_new_privs) before exec, so the program cannot
//     undo the read-only remounts.
//   - fallback when user namespaces are refused: unshare(CLONE_NEWNET) alone (root), and, as root,
//     setuid/setgid to nobody; otherwise the caller's own user. network_isolated / fs_isolated /
//     pids_isolated then say false and `notes` says why.
//   - always: setsid() (own process group, SIGKILLed as a group on the wall-clock timeout and after
//     exit), setrlimit CPU, AS, NPROC, FSIZE, NOFILE, CORE=0; stdin /dev/null; stdout/stderr captured up
//     to a cap; environment = PATH=/usr/bin:/bin, HOME=TMPDIR=the sandbox directory, LANG=C.UTF-8.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sparsecl::eval {

struct SandboxOptions {
  std::string python;                // interpreter; empty = /usr/bin/python3 (readable by `nobody`)
  std::vector<std::string> python_flags = {"-I", "-S", "-B"};  // isolated, no site, no .pyc writes
  double timeout_s = 10.0;           // wall clock; the process group / PID namespace is SIGKILLed after it
  int64_t cpu_seconds = 0;           // RLIMIT_CPU; 0 = ceil(timeout_s) + 1
  int64_t memory_bytes = int64_t{1} << 30;       // RLIMIT_AS
  int64_t max_processes = 32;        // RLIMIT_NPROC (inside the user namespace: processes of the sandbox)
  int64_t max_file_bytes = int64_t{16} << 20;    // RLIMIT_FSIZE
  int64_t max_open_files = 64;       // RLIMIT_NOFILE
  size_t output_cap = 64 * 1024;     // bytes kept from each of stdout / stderr (the tail)
  bool use_namespaces = true;        // false: skip unshare (tests of the fallback path)
};

struct SandboxResult {
  bool passed = false;       // exited normally with status 0 and not timed out
  int exit_code = -1;        // when exited normally
  int signal = 0;            // when killed by a signal (SIGKILL for the timeout, SIGXCPU/SIGKILL for CPU)
  bool timed_out = false;    // the wall-clock timeout fired
  bool killed = false;       // we sent SIGKILL (timeout)
  std::string stdout_tail, stderr_tail;  // the last output_cap bytes of each
  bool stdout_truncated = false, stderr_truncated = false;
  double wall_seconds = 0;
  bool network_isolated = false;  // own network namespace (only a down loopback)
  bool fs_isolated = false;       // every mount read-only except the sandbox directory
  bool pids_isolated = false;     // own PID namespace + RLIMIT_NPROC enforced (non-root outside)
  std::string notes;              // what was not available and why
  std::string error;              // the sandbox itself failed (fork, temp dir, ...): passed is false
};

// Runs `program` (Python source) as program.py in a fresh temporary directory under `tmp_root`
// (empty = $TMPDIR or /tmp). Thread-compatible (one call per thread); never throws for failures of the
// program, only sparsecl::Error when the sandbox cannot be set up at all (no temp dir, no fork).
SandboxResult run_python_sandboxed(const std::string& program, const SandboxOptions& options = {},
                                   const std::string& tmp_root = "");

// One line for logs: "passed", "exit 1", "signal 9 (timeout)", plus the isolation flags.
std::string describe(const SandboxResult& result);

}  // namespace sparsecl::eval
