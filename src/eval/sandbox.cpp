// The sandbox for generated Python (see include/sparsecl/eval/sandbox.h for what it sets up and
// docs/eval.md for what it does and does not prevent). Process tree:
//   caller P --fork--> C1: setsid, unshare(user|mnt|net|pid), waits for P to write its uid/gid maps,
//                          becomes root-in-namespace (nobody outside), bind + read-only remounts
//                --fork--> C2: PID 1 of the new PID namespace, a minimal init reaping every child
//                          --fork--> C3: rlimits, drops every capability, stdio, env, exec python
// Results cross the process boundary through one MAP_SHARED page (no pipe protocol); P keeps the only
// copies of the output pipes' read ends and enforces the wall-clock timeout with SIGKILL to C2 (which
// tears down the whole PID namespace) and to the process group. Everything the children need (paths,
// argv, envp, the mount list) is built before fork, so they only make system calls.
#include "sparsecl/eval/sandbox.h"

#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "sparsecl/common/error.h"

namespace sparsecl::eval {
namespace {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

// Shared between P and the children (one anonymous MAP_SHARED page).
struct Shared {
  int userns = 0, netns = 0, mntns = 0, pidns = 0;
  int fs_ok = 0;                // every writable mount remounted read-only
  int dropped_to_nobody = 0;    // fallback: setuid(nobody) as root
  pid_t init_pid = 0;           // C2's pid as P sees it
  int prog_status_set = 0;
  int prog_status = 0;          // C3's raw wait status
  char setup_error[512] = {0};  // a child could not set up: the program never ran
  char notes[1536] = {0};       // what was unavailable
};

void append_note(Shared* s, const char* text) {
  const size_t used = std::strlen(s->notes);
  if (used + 2 >= sizeof(s->notes)) return;
  std::snprintf(s->notes + used, sizeof(s->notes) - used, "%s%s", used ? "; " : "", text);
}

void set_error(Shared* s, const char* what, int err) {
  std::snprintf(s->setup_error, sizeof(s->setup_error), "%s: %s", what, std::strerror(err));
}

bool write_all_fd(int fd, const char* data, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool write_text_file(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = write_all_fd(fd, text.data(), text.size());
  ::close(fd);
  return ok;
}

// Mount points from /proc/self/mountinfo (field 5, octal escapes decoded), in mount order.
std::vector<std::string> mount_points() {
  std::vector<std::string> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, dev, root, mp;
    if (!(ls >> id >> parent >> dev >> root >> mp)) continue;
    std::string decoded;
    for (size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        decoded += static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8));
        i += 3;
      } else {
        decoded += mp[i];
      }
    }
    out.push_back(decoded);
  }
  return out;
}

unsigned long mount_flags_of(const char* path, bool* readonly) {
  struct statvfs sv {};
  *readonly = false;
  if (::statvfs(path, &sv) != 0) return 0;
  unsigned long f = 0;
  if (sv.f_flag & ST_NOSUID) f |= MS_NOSUID;
  if (sv.f_flag & ST_NODEV) f |= MS_NODEV;
  if (sv.f_flag & ST_NOEXEC) f |= MS_NOEXEC;
  if (sv.f_flag & ST_NOATIME) f |= MS_NOATIME;
  if (sv.f_flag & ST_NODIRATIME) f |= MS_NODIRATIME;
  if (sv.f_flag & ST_RELATIME) f |= MS_RELATIME;
  *readonly = (sv.f_flag & ST_RDONLY) != 0;
  return f;
}

int remove_entry(const char* path, const struct stat*, int, struct FTW*) {
  ::remove(path);
  return 0;
}

// rm -rf without std::filesystem (see tests/core/test_dataset.cpp on remove_all in this build).
void remove_tree(const std::string& dir) {
  ::nftw(dir.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

void drop_all_capabilities() {
  for (int cap = 0; cap <= 63; ++cap) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno == EINVAL) break;
  }
  __user_cap_header_struct header{};
  header.version = _LINUX_CAPABILITY_VERSION_3;
  header.pid = 0;
  __user_cap_data_struct data[2]{};
  ::syscall(SYS_capset, &header, data);
  ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

void close_fds_from(int first) {
#ifdef SYS_close_range
  if (::syscall(SYS_close_range, first, ~0U, 0) == 0) return;
#endif
  for (int fd = first; fd < 4096; ++fd) ::close(fd);
}

struct ChildPlan {
  const char* dir = nullptr;
  const char* null_path = "/dev/null";
  std::vector<char*> argv, envp;
  std::vector<std::string> mounts;
  int out_w = -1, err_w = -1;
  int ready_w = -1, go_r = -1;
  bool use_namespaces = true;
  bool am_root = false;
  uid_t uid = 0;
  gid_t gid = 0;
  rlim_t cpu = 1, as = 0, nproc = 0, fsize = 0, nofile = 0;
};

[[noreturn]] void run_program(const ChildPlan& plan, Shared* s) {
  // C3: stdio, limits, credentials, exec.
  const int devnull = ::open(plan.null_path, O_RDONLY);
  if (devnull < 0 || ::dup2(devnull, 0) < 0 || ::dup2(plan.out_w, 1) < 0 || ::dup2(plan.err_w, 2) < 0) {
    set_error(s, "stdio", errno);
    ::_exit(126);
  }
  close_fds_from(3);
  if (::chdir(plan.dir) != 0) {
    set_error(s, "chdir", errno);
    ::_exit(126);
  }
  const struct {
    int resource;
    rlim_t value;
  } limits[] = {{RLIMIT_CPU, plan.cpu},     {RLIMIT_AS, plan.as},         {RLIMIT_NPROC, plan.nproc},
                {RLIMIT_FSIZE, plan.fsize}, {RLIMIT_NOFILE, plan.nofile}, {RLIMIT_CORE, 0}};
  for (const auto& l : limits) {
    struct rlimit rl {l.value, l.value};
    if (::setrlimit(l.resource, &rl) != 0) {
      set_error(s, "setrlimit", errno);
      ::_exit(126);
    }
  }
  if (!s->userns && plan.am_root) {
    // Fallback without a user namespace: run as nobody so that RLIMIT_NPROC and file permissions apply.
    if (::setgroups(0, nullptr) != 0 || ::setresgid(kNogroup, kNogroup, kNogroup) != 0 ||
        ::setresuid(kNobody, kNobody, kNobody) != 0) {
      set_error(s, "setuid(nobody)", errno);
      ::_exit(126);
    }
    s->dropped_to_nobody = 1;
  }
  drop_all_capabilities();
  ::execve(plan.argv[0], plan.argv.data(), plan.envp.data());
  set_error(s, "execve", errno);
  ::_exit(127);
}

[[noreturn]] void run_init(const ChildPlan& plan, Shared* s) {
  // C2: PID 1 of the namespace (or a plain process in the fallback). Reaps everything; records C3.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  const pid_t prog = ::fork();
  if (prog < 0) {
    set_error(s, "fork (program)", errno);
    ::_exit(126);
  }
  if (prog == 0) run_program(plan, s);
  ::close(plan.out_w);
  ::close(plan.err_w);
  for (;;) {
    int status = 0;
    const pid_t p = ::waitpid(-1, &status, 0);
    if (p < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p == prog) {
      s->prog_status = status;
      s->prog_status_set = 1;
      break;  // exiting as PID 1 kills whatever the program left behind
    }
  }
  ::_exit(0);
}

[[noreturn]] void run_setup(const ChildPlan& plan, Shared* s) {
  // C1: new session, namespaces, mounts.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  ::setsid();
  char ok = 0;
  if (plan.use_namespaces &&
      ::unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS) == 0) {
    s->userns = s->netns = s->mntns = s->pidns = 1;
    ok = 1;
  } else {
    if (plan.use_namespaces) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "user namespaces refused (%s)", std::strerror(errno));
      append_note(s, buf);
    }
    if (plan.use_namespaces && ::unshare(CLONE_NEWNET) == 0) {
      s->netns = 1;
    } else if (plan.use_namespaces) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "network namespace refused (%s): NO network isolation", std::strerror(errno));
      append_note(s, buf);
    }
  }
  // Tell P whether to write the id maps, then wait for it.
  if (!write_all_fd(plan.ready_w, &ok, 1)) ::_exit(126);
  char go = 0;
  if (::read(plan.go_r, &go, 1) != 1 || go != 1) {
    if (!s->setup_error[0]) std::snprintf(s->setup_error, sizeof s->setup_error, "id maps could not be written");
    ::_exit(126);
  }
  if (s->userns) {
    if (::setresgid(0, 0, 0) != 0 || ::setresuid(0, 0, 0) != 0) {
      set_error(s, "setresuid in the user namespace", errno);
      ::_exit(126);
    }
    if (plan.am_root) ::setgroups(0, nullptr);  // drop root's supplementary groups (gid 0 outside)
    // Mounts: private, the sandbox dir bound onto itself (writable), everything else read-only.
    bool fs_ok = ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0 &&
                 ::mount(plan.dir, plan.dir, nullptr, MS_BIND, nullptr) == 0;
    if (!fs_ok) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "bind of the sandbox dir failed (%s)", std::strerror(errno));
      append_note(s, buf);
    }
    int failed = 0;
    for (const auto& mp : plan.mounts) {
      if (mp == plan.dir) continue;
      bool readonly = false;
      const unsigned long flags = mount_flags_of(mp.c_str(), &readonly);
      if (readonly) continue;
      if (::mount(nullptr, mp.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, nullptr) != 0) {
        // Shadowed or vanished mount points cannot be reached by path, hence cannot be written either.
        if (errno == ENOENT || errno == EACCES) continue;
        if (++failed <= 3) {
          char buf[256];
          std::snprintf(buf, sizeof buf, "read-only remount of %s failed (%s)", mp.c_str(), std::strerror(errno));
          append_note(s, buf);
        }
      }
    }
    s->fs_ok = fs_ok && failed == 0;
  } else {
    append_note(s, "no mount namespace: files the user can write outside the sandbox dir stay writable");
  }
  const pid_t init = ::fork();
  if (init < 0) {
    set_error(s, "fork (init)", errno);
    ::_exit(126);
  }
  if (init == 0) run_init(plan, s);
  s->init_pid = init;  // a pid in P's namespace: C1 is still in it
  ::close(plan.out_w);
  ::close(plan.err_w);
  int status = 0;
  while (::waitpid(init, &status, 0) < 0 && errno == EINTR) {
  }
  ::_exit(0);
}

struct Capture {
  std::string tail;
  bool truncated = false;
  size_t cap = 0;
  void add(const char* data, size_t n) {
    tail.append(data, n);
    if (tail.size() > 2 * cap + 4096) {
      tail.erase(0, tail.size() - cap);
      truncated = true;
    }
  }
  void finish() {
    if (tail.size() > cap) {
      tail.erase(0, tail.size() - cap);
      truncated = true;
    }
  }
};

std::string make_temp_dir(const std::string& tmp_root) {
  std::string root = tmp_root;
  if (root.empty()) {
    const char* t = std::getenv("TMPDIR");
    root = (t && *t) ? t : "/tmp";
  }
  std::string templ = root + "/sparsecl_sandbox_XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) throw Error("sandbox: cannot create a temporary directory under " + root + ": " +
                                          std::strerror(errno));
  // The real path: mount points in mountinfo are canonical, and the bind must name the same path.
  char real[PATH_MAX];
  if (!::realpath(buf.data(), real)) throw Error(std::string("sandbox: realpath failed: ") + std::strerror(errno));
  return real;
}

}  // namespace

SandboxResult run_python_sandboxed(const std::string& program, const SandboxOptions& options,
                                   const std::string& tmp_root) {
  SandboxResult result;
  const auto t0 = std::chrono::steady_clock::now();
  const std::string dir = make_temp_dir(tmp_root);
  struct DirGuard {
    std::string d;
    ~DirGuard() { remove_tree(d); }
  } guard{dir};

  const bool am_root = ::geteuid() == 0;
  const uid_t outside_uid = am_root ? kNobody : ::geteuid();
  const gid_t outside_gid = am_root ? kNogroup : ::getegid();
  {
    const std::string file = dir + "/program.py";
    std::ofstream out(file, std::ios::binary);
    out << program;
    out.close();
    if (!out) throw Error("sandbox: cannot write " + file);
    ::chmod(dir.c_str(), 0700);
    if (am_root && (::chown(dir.c_str(), outside_uid, outside_gid) != 0 ||
                    ::chown(file.c_str(), outside_uid, outside_gid) != 0))
      throw Error("sandbox: cannot chown " + dir + ": " + std::strerror(errno));
  }

  // Everything the children need, built before fork.
  std::string python = options.python.empty() ? "/usr/bin/python3" : options.python;
  std::vector<std::string> args{python};
  for (const auto& f : options.python_flags) args.push_back(f);
  args.push_back("program.py");
  std::vector<std::string> env{"PATH=/usr/bin:/bin", "HOME=" + dir, "TMPDIR=" + dir, "LANG=C.UTF-8",
                               "PYTHONDONTWRITEBYTECODE=1"};
  ChildPlan plan;
  plan.dir = dir.c_str();
  for (auto& a : args) plan.argv.push_back(a.data());
  plan.argv.push_back(nullptr);
  for (auto& e : env) plan.envp.push_back(e.data());
  plan.envp.push_back(nullptr);
  plan.mounts = mount_points();
  plan.use_namespaces = options.use_namespaces;
  plan.am_root = am_root;
  plan.cpu = static_cast<rlim_t>(options.cpu_seconds > 0 ? options.cpu_seconds
                                                         : static_cast<int64_t>(std::ceil(options.timeout_s)) + 1);
  plan.as = static_cast<rlim_t>(options.memory_bytes);
  plan.nproc = static_cast<rlim_t>(options.max_processes);
  plan.fsize = static_cast<rlim_t>(options.max_file_bytes);
  plan.nofile = static_cast<rlim_t>(options.max_open_files);

  void* page = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) throw Error(std::string("sandbox: mmap failed: ") + std::strerror(errno));
  Shared* shared = new (page) Shared();
  struct PageGuard {
    void* p;
    ~PageGuard() { ::munmap(p, sizeof(Shared)); }
  } page_guard{page};

  int out_pipe[2], err_pipe[2], ready[2], go[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0 || ::pipe2(ready, O_CLOEXEC) != 0 ||
      ::pipe2(go, O_CLOEXEC) != 0)
    throw Error(std::string("sandbox: pipe failed: ") + std::strerror(errno));
  plan.out_w = out_pipe[1];
  plan.err_w = err_pipe[1];
  plan.ready_w = ready[1];
  plan.go_r = go[0];

  const pid_t setup = ::fork();
  if (setup < 0) {
    for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1], ready[0], ready[1], go[0], go[1]}) ::close(fd);
    throw Error(std::string("sandbox: fork failed: ") + std::strerror(errno));
  }
  if (setup == 0) run_setup(plan, shared);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  ::close(ready[1]);
  ::close(go[0]);

  // Id maps for the child's user namespace (root outside -> nobody; otherwise our own ids).
  char userns = 0;
  bool mapped = true;
  const bool setup_alive = ::read(ready[0], &userns, 1) == 1;  // else it died: no write (no SIGPIPE)
  if (setup_alive && userns == 1) {
    const std::string proc = "/proc/" + std::to_string(setup);
    if (!am_root) write_text_file(proc + "/setgroups", "deny");
    mapped = write_text_file(proc + "/uid_map", "0 " + std::to_string(outside_uid) + " 1\n") &&
             write_text_file(proc + "/gid_map", "0 " + std::to_string(outside_gid) + " 1\n");
    if (!mapped) result.error = std::string("sandbox: cannot write the id maps: ") + std::strerror(errno);
  }
  const char go_byte = mapped ? 1 : 0;
  if (setup_alive) write_all_fd(go[1], &go_byte, 1);
  ::close(go[1]);
  ::close(ready[0]);

  Capture out, err;
  out.cap = err.cap = options.output_cap;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  bool open_fds[2] = {true, true};
  const auto deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(options.timeout_s));
  bool setup_done = false;
  std::chrono::steady_clock::time_point drain_until{};
  const auto kill_all = [&] {
    if (shared->init_pid > 0) ::kill(shared->init_pid, SIGKILL);
    ::kill(-setup, SIGKILL);
  };
  char buf[8192];
  while (open_fds[0] || open_fds[1] || !setup_done) {
    const auto now = std::chrono::steady_clock::now();
    if (!result.timed_out && now >= deadline && !setup_done) {
      result.timed_out = result.killed = true;
      kill_all();
    }
    if (!setup_done) {
      int status = 0;
      const pid_t w = ::waitpid(setup, &status, WNOHANG);
      if (w == setup || (w < 0 && errno == ECHILD)) {  // ECHILD: the host process ignores SIGCHLD
        setup_done = true;
        // Whatever the program left running (only possible without a PID namespace) dies with its group.
        ::kill(-setup, SIGKILL);
        drain_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
      }
    } else if (now >= drain_until) {
      if (open_fds[0] || open_fds[1]) append_note(shared, "a process outside the group kept the output open");
      break;
    }
    for (int i = 0; i < 2; ++i) fds[i].fd = open_fds[i] ? (i == 0 ? out_pipe[0] : err_pipe[0]) : -1;
    const int r = ::poll(fds, 2, 20);
    if (r < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (!open_fds[i] || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? out : err).add(buf, static_cast<size_t>(n));
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        open_fds[i] = false;
      }
    }
  }
  if (!setup_done) {
    kill_all();
    int status = 0;
    while (::waitpid(setup, &status, 0) < 0 && errno == EINTR) {
    }
  }
  ::close(out_pipe[0]);
  ::close(err_pipe[0]);
  out.finish();
  err.finish();

  result.stdout_tail = std::move(out.tail);
  result.stderr_tail = std::move(err.tail);
  result.stdout_truncated = out.truncated;
  result.stderr_truncated = err.truncated;
  result.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  result.network_isolated = shared->netns != 0;
  result.fs_isolated = shared->mntns != 0 && shared->fs_ok != 0;
  result.pids_isolated = shared->pidns != 0 && shared->userns != 0 && (am_root ? outside_uid != 0 : true);
  if (shared->dropped_to_nobody)
    append_note(shared, "ran as nobody (RLIMIT_NPROC enforced, no PID namespace)");
  result.notes = shared->notes;
  if (shared->setup_error[0] && result.error.empty()) result.error = std::string("sandbox: ") + shared->setup_error;
  if (shared->prog_status_set) {
    const int st = shared->prog_status;
    if (WIFEXITED(st)) result.exit_code = WEXITSTATUS(st);
    if (WIFSIGNALED(st)) result.signal = WTERMSIG(st);
  } else if (result.timed_out) {
    result.signal = SIGKILL;
  }
  if (result.exit_code == 126 || result.exit_code == 127) {
    if (!result.error.empty()) result.exit_code = -1;
  }
  result.passed = result.error.empty() && !result.timed_out && shared->prog_status_set && result.exit_code == 0;
  return result;
}

std::string describe(const SandboxResult& r) {
  std::ostringstream s;
  if (!r.error.empty())
    s << "error: " << r.error;
  else if (r.passed)
    s << "passed";
  else if (r.timed_out)
    s << "timeout (killed)";
  else if (r.signal)
    s << "signal " << r.signal;
  else
    s << "exit " << r.exit_code;
  s << " in " << r.wall_seconds << " s [net " << (r.network_isolated ? "isolated" : "OPEN") << ", fs "
    << (r.fs_isolated ? "read-only outside dir" : "NOT isolated") << ", pids "
    << (r.pids_isolated ? "isolated" : "NOT isolated") << "]";
  if (!r.notes.empty()) s << " (" << r.notes << ")";
  return s.str();
}

}  // namespace sparsecl::eval
