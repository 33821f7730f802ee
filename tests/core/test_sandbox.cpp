// The sandbox for generated code (include/sparsecl/eval/sandbox.h): a passing and a failing program,
// an infinite loop (killed fast by the wall-clock timeout), process-count containment (a bounded
// fork loop always; an unbounded fork bomb only where the sandbox reports an enforced process cap),
// unbounded allocation (RLIMIT_AS), a huge file (RLIMIT_FSIZE), writing outside the sandbox dir and
// opening sockets (both must fail when the corresponding isolation is reported; GTEST_SKIP otherwise,
// with the reason). Every case is bounded in time (< 3 s each) and resources.
#include <gtest/gtest.h>

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "sparsecl/eval/sandbox.h"

using namespace sparsecl::eval;

namespace {

SandboxOptions quick(double timeout_s = 5.0) {
  SandboxOptions o;
  o.timeout_s = timeout_s;
  return o;
}

// Processes (any uid) whose command line contains `needle` (NUL separators replaced by spaces).
int count_processes_with(const std::string& needle) {
  int n = 0;
  DIR* d = opendir("/proc");
  if (!d) return -1;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream in(std::string("/proc/") + e->d_name + "/cmdline", std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (char& c : cmd)
      if (c == '\0') c = ' ';
    if (cmd.find(needle) != std::string::npos) ++n;
  }
  closedir(d);
  return n;
}

}  // namespace

TEST(Sandbox, PassingProgram) {
  const auto r = run_python_sandboxed("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n", quick());
  SCOPED_TRACE(describe(r) + "\nstderr: " + r.stderr_tail);
  EXPECT_TRUE(r.error.empty());
  EXPECT_TRUE(r.passed);
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.stdout_tail, "ok\n");
  EXPECT_FALSE(r.timed_out);
  std::printf("isolation here: %s\n", describe(r).c_str());
}

TEST(Sandbox, FailingAssert) {
  const auto r = run_python_sandboxed("assert 1 + 1 == 3, 'wrong'\n", quick());
  SCOPED_TRACE(describe(r));
  EXPECT_FALSE(r.passed);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.stderr_tail.find("AssertionError: wrong"), std::string::npos) << r.stderr_tail;
}

TEST(Sandbox, InfiniteLoopIsKilledByTheTimeout) {
  const auto r = run_python_sandboxed("while True:\n    pass\n", quick(1.0));
  SCOPED_TRACE(describe(r));
  EXPECT_FALSE(r.passed);
  EXPECT_TRUE(r.timed_out);
  EXPECT_TRUE(r.killed);
  EXPECT_LT(r.wall_seconds, 2.5);
}

TEST(Sandbox, ChildrenThatOutliveTheProgramAreKilled) {
  // A bounded fork loop: children sleep (they would outlive the program); the program exits at once.
  // Afterwards no process of the sandbox may remain, and the count of forks is capped when isolated.
  const std::string marker = "sparsecl_sbx_marker_" + std::to_string(::getpid());
  const std::string prog =
      "import os, sys, time\n"
      "n = 0\n"
      "for i in range(40):\n"
      "    try:\n"
      "        pid = os.fork()\n"
      "    except OSError:\n"
      "        break\n"
      "    if pid == 0:\n"
      "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '" + marker + "'])\n"
      "    n += 1\n"
      "print(n)\n";
  auto o = quick(5.0);
  o.max_processes = 12;
  const auto r = run_python_sandboxed(prog, o);
  SCOPED_TRACE(describe(r) + "\nstderr: " + r.stderr_tail);
  EXPECT_TRUE(r.passed);
  const int forked = std::atoi(r.stdout_tail.c_str());
  if (r.pids_isolated) {
    EXPECT_LT(forked, 12);
  }
  ::usleep(200 * 1000);
  EXPECT_EQ(count_processes_with(marker), 0);
}

TEST(Sandbox, ForkBombIsContained) {
  const auto probe = run_python_sandboxed("pass\n", quick());
  if (!probe.pids_isolated) GTEST_SKIP() << "no enforced process cap here: " << describe(probe);
  const std::string marker = "sparsecl_bomb_" + std::to_string(::getpid());
  const std::string prog =
      "import os, sys\n"
      "os.execv(sys.executable, [sys.executable, '-c', '''\n"
      "import os\n"
      "while True:\n"
      "    try:\n"
      "        os.fork()\n"
      "    except OSError:\n"
      "        pass\n"
      "''', '" + marker + "'])\n";
  auto o = quick(1.5);
  o.max_processes = 8;
  const auto r = run_python_sandboxed(prog, o);
  SCOPED_TRACE(describe(r));
  EXPECT_FALSE(r.passed);
  EXPECT_TRUE(r.timed_out);
  EXPECT_LT(r.wall_seconds, 3.0);
  ::usleep(200 * 1000);
  EXPECT_EQ(count_processes_with(marker), 0);
}

TEST(Sandbox, UnboundedAllocationHitsRlimitAs) {
  auto o = quick(5.0);
  o.memory_bytes = int64_t{256} << 20;
  const auto r = run_python_sandboxed("x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n", o);
  SCOPED_TRACE(describe(r));
  EXPECT_FALSE(r.passed);
  EXPECT_FALSE(r.timed_out);
  EXPECT_NE(r.stderr_tail.find("MemoryError"), std::string::npos) << r.stderr_tail;
}

TEST(Sandbox, HugeFileHitsRlimitFsize) {
  auto o = quick(5.0);
  o.max_file_bytes = int64_t{1} << 20;
  const auto r = run_python_sandboxed(
      "import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
      "with open('big.bin', 'wb') as f:\n    for i in range(64):\n        f.write(b'x' * (1 << 20))\n",
      o);
  SCOPED_TRACE(describe(r));
  EXPECT_FALSE(r.passed);
  EXPECT_NE(r.stderr_tail.find("File too large"), std::string::npos) << r.stderr_tail;
  // CPython ignores SIGXFSZ itself, so a plain oversized write fails with EFBIG too.
  const auto k = run_python_sandboxed("open('big.bin', 'wb').write(b'x' * (4 << 20))\n", o);
  EXPECT_FALSE(k.passed);
  EXPECT_NE(k.stderr_tail.find("File too large"), std::string::npos) << k.stderr_tail;
}

TEST(Sandbox, WritingInsideItsDirectoryWorks) {
  const auto r = run_python_sandboxed(
      "import os, tempfile\nopen('a.txt', 'w').write('hi')\n"
      "with tempfile.NamedTemporaryFile(dir=os.environ['TMPDIR']) as f:\n    f.write(b'x')\n"
      "print(open('a.txt').read())\n",
      quick());
  SCOPED_TRACE(describe(r) + "\n" + r.stderr_tail);
  EXPECT_TRUE(r.passed);
  EXPECT_EQ(r.stdout_tail, "hi\n");
}

TEST(Sandbox, WritingOutsideItsDirectoryFails) {
  const std::string target = "/tmp/sparsecl_sandbox_escape_" + std::to_string(::getpid());
  const auto r = run_python_sandboxed("open('" + target + "', 'w').write('escaped')\n", quick());
  const bool exists = ::access(target.c_str(), F_OK) == 0;
  ::unlink(target.c_str());
  if (!r.fs_isolated) GTEST_SKIP() << "no mount-namespace isolation here: " << describe(r);
  SCOPED_TRACE(describe(r));
  EXPECT_FALSE(r.passed);
  EXPECT_FALSE(exists);
  EXPECT_NE(r.stderr_tail.find("Read-only file system"), std::string::npos) << r.stderr_tail;
}

TEST(Sandbox, SocketsFailWithoutNetwork) {
  const std::string prog =
      "import socket\n"
      "for host in ['127.0.0.1', '1.1.1.1']:\n"
      "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
      "    s.settimeout(1.0)\n"
      "    try:\n"
      "        s.connect((host, 80))\n"
      "        print('connected', host)\n"
      "    except OSError as e:\n"
      "        print('refused', host, e.errno)\n";
  const auto r = run_python_sandboxed(prog, quick());
  if (!r.network_isolated) GTEST_SKIP() << "no network isolation here: " << describe(r);
  SCOPED_TRACE(describe(r) + "\n" + r.stderr_tail);
  EXPECT_TRUE(r.passed);
  EXPECT_EQ(r.stdout_tail.find("connected"), std::string::npos) << r.stdout_tail;
  EXPECT_NE(r.stdout_tail.find("refused 127.0.0.1"), std::string::npos) << r.stdout_tail;
  EXPECT_NE(r.stdout_tail.find("refused 1.1.1.1"), std::string::npos) << r.stdout_tail;
}

TEST(Sandbox, OutputIsCappedAndFallbackIsHonest) {
  auto o = quick();
  o.output_cap = 1000;
  const auto r = run_python_sandboxed("import sys\nsys.stdout.write('a' * 100000 + 'END')\n", o);
  EXPECT_TRUE(r.passed) << describe(r);
  EXPECT_EQ(r.stdout_tail.size(), 1000u);
  EXPECT_TRUE(r.stdout_truncated);
  EXPECT_EQ(r.stdout_tail.substr(997), "END");
  // Without namespaces nothing may be claimed.
  o.use_namespaces = false;
  const auto f = run_python_sandboxed("print(1)\n", o);
  EXPECT_TRUE(f.passed) << describe(f);
  EXPECT_FALSE(f.network_isolated);
  EXPECT_FALSE(f.fs_isolated);
  EXPECT_FALSE(f.pids_isolated);
  EXPECT_FALSE(f.notes.empty());
}

TEST(Sandbox, MissingInterpreterIsASandboxError) {
  auto o = quick();
  o.python = "/nonexistent/python3";
  const auto r = run_python_sandboxed("print(1)\n", o);
  EXPECT_FALSE(r.passed);
  EXPECT_NE(r.error.find("execve"), std::string::npos) << describe(r);
}
