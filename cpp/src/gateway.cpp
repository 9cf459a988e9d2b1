#include "mlx5tlp/gateway.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

namespace {

using Clock = std::chrono::steady_clock;

// ---- fork awareness: a child never uses (or joins) its parent's writer threads ----
std::atomic<uint64_t> g_fork_gen{0};
std::mutex g_lock_fds_mu;
std::set<int>* g_lock_fds = nullptr;  // page-lock fds of this process's open gateways

void atfork_prepare() { g_lock_fds_mu.lock(); }
void atfork_parent() { g_lock_fds_mu.unlock(); }
void atfork_child() {
  // relaxed: the child is single-threaded here.
  g_fork_gen.fetch_add(1, std::memory_order_relaxed);
  // The inherited fds share the parent's lock (same open file description): closing our copies
  // keeps a long-lived child from holding the parent's page once the parent lets it go.
  if (g_lock_fds != nullptr) {
    for (int fd : *g_lock_fds) ::close(fd);
    g_lock_fds->clear();
  }
  g_lock_fds_mu.unlock();
}

void register_lock_fd(int fd, bool add) {
  static std::once_flag once;
  std::call_once(once, [] {
    g_lock_fds = new std::set<int>();  // lives for the process: atfork handlers may run at exit
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
  });
  std::lock_guard<std::mutex> l(g_lock_fds_mu);
  if (add) g_lock_fds->insert(fd);
  else g_lock_fds->erase(fd);
}

std::string page_lock_path(const Var& var) {
  const Context& ctx = *var.context();
  char guid[24];
  std::snprintf(guid, sizeof guid, "%016llx", static_cast<unsigned long long>(ctx.node_guid()));
  const std::string page = std::to_string(var.page_id());
  const auto& sim = ctx.lib().sym().sim;
  if (sim.device_dir != nullptr) {  // the software device: beside the device's own files
    char dir[4096];
    if (sim.device_dir(dir, sizeof dir) == 0)
      return std::string(dir) + "/" + ctx.name() + "/gw" + page + ".lock";
  }
  const char* env = std::getenv("MLX5TLP_LOCK_DIR");
  std::string dir = env != nullptr && *env != '\0' ? env : "/dev/shm";
  return dir + "/mlx5tlp-gw-" + std::to_string(getuid()) + "-" + ctx.name() + "-" + guid + "-" +
         page + ".lock";
}

// One committer per page, across processes: an OFD write lock, released when the last fd of
// its open file description closes (also when the process dies).
int lock_page(const Var& var) {
  const std::string path = page_lock_path(var);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) throw_errno("open gateway page lock " + path, errno_or_eio(), false);
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    const int err = errno;
    ::close(fd);
    if (err == EAGAIN || err == EACCES)
      throw Error(ErrorKind::generic, "open gateway", EBUSY,
                  "TLP gateway page " + std::to_string(var.page_id()) + " of device " +
                      var.context()->name() +
                      " already has a writer (in this or another process): the hardware allows "
                      "one committer per page");
    throw_errno("lock gateway page " + path, err, false);
  }
  register_lock_fd(fd, true);
  return fd;
}

}  // namespace

std::shared_ptr<Gateway> Gateway::open(std::shared_ptr<Var> var,
                                       std::unique_ptr<GatewayLayout> layout,
                                       const GatewayOptions& options) {
  if (!var->is_tlp())
    throw Error(ErrorKind::invalid_argument, "open gateway", EINVAL,
                "VAR page " + std::to_string(var->page_id()) +
                    " is a VirtIO VAR, not a TLP response gateway page");
  if (options.batch_max == 0)
    throw Error(ErrorKind::invalid_argument, "open gateway", EINVAL, "batch_max must be >= 1");
  if (!layout) layout = make_layout(var->context()->lib().sym().sim.mmap != nullptr ? "sim" : "raw_tlp");
  int fd = lock_page(*var);
  try {
    Mapping m = var->map(PROT_READ | PROT_WRITE);
    layout->attach(static_cast<uint8_t*>(m.data()), m.size());
    std::shared_ptr<Gateway> gw(new Gateway(std::move(m), std::move(layout), options, fd));
    if (!gw->direct_) gw->writer_ = std::make_unique<std::thread>([g = gw.get()] { g->run(); });
    gw->var()->context()->adopt(gw);
    return gw;
  } catch (...) {
    register_lock_fd(fd, false);
    ::close(fd);
    throw;
  }
}

Gateway::Gateway(Mapping mapping, std::unique_ptr<GatewayLayout> layout, const GatewayOptions& o,
                 int lock_fd)
    : var_(mapping.var()),
      mapping_(std::move(mapping)),
      layout_(std::move(layout)),
      ring_(o.direct ? nullptr : std::make_unique<Ring>(o.ring_slots, (layout_->max_record() + 7) / 8 * 8)),
      direct_(o.direct),
      batch_max_(o.batch_max),
      drain_timeout_(o.drain_timeout),
      max_record_(layout_->max_record()),
      fork_gen_(g_fork_gen.load(std::memory_order_relaxed)),
      lock_fd_(lock_fd) {}

Gateway::~Gateway() {
  try {
    close();
  } catch (...) {
    // close() reports undeliverable records; a destructor cannot.
  }
}

void Gateway::check_usable(const char* op) const {
  if (closed_.load(std::memory_order_acquire))
    throw Error(ErrorKind::invalid_handle, op, EBADF, "the gateway is closed");
  // relaxed: only the forking thread changes it, before any thread of the child runs.
  if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_)
    throw Error(ErrorKind::invalid_handle, op, EBADF,
                "this gateway was opened before fork(); a child does not inherit its writer: "
                "open a new gateway in this process");
}

void Gateway::check_record(size_t len, const char* op) const {
  if (len == 0 || len > max_record_)
    throw Error(ErrorKind::invalid_argument, op, EINVAL,
                "a record is 1.." + std::to_string(max_record_) + " bytes for layout '" +
                    layout_->name() + "', not " + std::to_string(len));
}

// ---------------------------------------------------------------- direct mode
size_t Gateway::write_direct(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                             size_t n, Deadline deadline) {
  const bool batched = layout_->batched_doorbell();
  size_t done = 0;
  unsigned spins = 0;
  while (done < n) {
    size_t credits = layout_->credits();
    if (credits == 0) {
      credit_waits_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
      if (deadline.expired()) break;
      ring_detail::backoff(std::min(spins++, 200u));
      continue;
    }
    const size_t k = std::min({credits, n - done, batch_max_});
    layout_->write_batch(buf, offsets + done, lengths + done, k);
    done += k;
    // release: a flush()/stats() reader that sees the count sees the page writes before it.
    written_.store(written_.load(std::memory_order_relaxed) + k, std::memory_order_release);
    batches_.fetch_add(batched ? 1 : k, std::memory_order_relaxed);
    if (k > max_batch_.load(std::memory_order_relaxed)) max_batch_.store(k, std::memory_order_relaxed);
  }
  return done;
}

bool Gateway::write(const uint8_t* rec, size_t len, Deadline deadline) {
  const uint32_t off = 0, l = uint32_t(len);
  check_record(len, "write");
  return write_batch(rec, &off, &l, 1, deadline) == 1;
}

size_t Gateway::write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                            size_t n, Deadline deadline) {
  check_usable("write");
  if (!direct_)
    throw Error(ErrorKind::invalid_argument, "write", EINVAL,
                "this gateway runs the doorbell loop: use post(); write() is for direct mode");
  for (size_t i = 0; i < n; ++i) check_record(lengths[i], "write_batch");
  // acquire: pairs with the release below, so one direct caller's page writes precede the next's.
  if (direct_busy_.exchange(true, std::memory_order_acquire))
    throw Error(ErrorKind::invalid_argument, "write", EBUSY,
                "direct mode is for one thread at a time; use a doorbell-loop gateway and post()");
  struct Unbusy {
    std::atomic<bool>& f;
    ~Unbusy() { f.store(false, std::memory_order_release); }  // release: see the exchange above
  } unbusy{direct_busy_};
  return write_direct(buf, offsets, lengths, n, deadline);
}

// ---------------------------------------------------------------- doorbell loop
// Marks a producer inside post(): close() sets closed_ then waits for inflight_ to drain, and a
// producer increments inflight_ then checks closed_; both sides use seq_cst, so either the
// producer sees closed_ (and backs out) or close() sees the producer (and waits for it).
struct Gateway::Inflight {
  Gateway& g;
  explicit Inflight(Gateway& gw, const char* op) : g(gw) {
    g.inflight_.fetch_add(1, std::memory_order_seq_cst);
    if (g.closed_.load(std::memory_order_seq_cst)) {
      g.inflight_.fetch_sub(1, std::memory_order_release);
      throw Error(ErrorKind::invalid_handle, op, EBADF, "the gateway is closed");
    }
  }
  ~Inflight() { g.inflight_.fetch_sub(1, std::memory_order_release); }  // release: our push
  Inflight(const Inflight&) = delete;
  Inflight& operator=(const Inflight&) = delete;
};

void Gateway::wake_writer() noexcept {
  // Dekker with the writer's park(): our publication (in the ring) and its parked_ store are
  // both followed by a full fence before reading the other side, so one of us sees the other.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (parked_.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> l(park_mu_);
    park_cv_.notify_one();
  }
}

bool Gateway::post(const uint8_t* rec, size_t len, Deadline deadline) {
  check_usable("post");
  if (direct_)
    throw Error(ErrorKind::invalid_argument, "post", EINVAL,
                "this gateway is in direct mode: use write()");
  check_record(len, "post");
  Inflight in(*this, "post");
  bool ok = ring_->try_push(rec, len);
  if (!ok && !deadline.expired()) {
    wake_writer();
    ok = ring_->push(rec, len, deadline);  // counts its own full wait (stats() adds it)
  } else if (!ok) {
    full_waits_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
  }
  if (ok) wake_writer();
  return ok;
}

size_t Gateway::post_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                           size_t n, Deadline deadline) {
  check_usable("post_batch");
  if (direct_)
    throw Error(ErrorKind::invalid_argument, "post_batch", EINVAL,
                "this gateway is in direct mode: use write_batch()");
  for (size_t i = 0; i < n; ++i) check_record(lengths[i], "post_batch");
  Inflight in(*this, "post_batch");
  size_t done = 0;
  unsigned spins = 0;
  bool waited = false;
  while (done < n) {
    const size_t k = ring_->try_push_batch(buf, offsets + done, lengths + done, n - done);
    done += k;
    if (k != 0) {
      wake_writer();
      spins = 0;
      continue;
    }
    if (!waited) full_waits_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
    waited = true;
    if (deadline.expired()) break;
    ring_detail::backoff(std::min(spins++, 200u));
  }
  return done;
}

bool Gateway::flush(Deadline deadline) {
  check_usable("flush");
  if (direct_) return true;  // direct writes are in the page when write() returns
  const uint64_t target = ring_->reserved_total();
  for (unsigned i = 0;; ++i) {
    // acquire: pairs with the writer's release, so the page holds those records.
    if (written_.load(std::memory_order_acquire) >= target) return true;
    if (closed_.load(std::memory_order_acquire) || deadline.expired()) return false;
    wake_writer();
    ring_detail::backoff(std::min(i, 200u));
  }
}

size_t Gateway::drain_batch(size_t max) noexcept {
  const bool batched = layout_->batched_doorbell();
  GatewayLayout* layout = layout_.get();
  const size_t n = ring_->consume(max, [layout, batched](const uint8_t* d, uint32_t len) {
    layout->write(d, len);
    if (!batched) layout->doorbell();
  });
  if (n == 0) return 0;
  if (batched) layout->doorbell();
  // release: flush() acquires this count and may then rely on the page contents.
  written_.store(written_.load(std::memory_order_relaxed) + n, std::memory_order_release);
  batches_.fetch_add(batched ? 1 : n, std::memory_order_relaxed);  // relaxed: statistics
  if (n > max_batch_.load(std::memory_order_relaxed)) max_batch_.store(n, std::memory_order_relaxed);
  return n;
}

void Gateway::run() noexcept {
  unsigned idle = 0;
  bool draining = false;
  Deadline deadline = Deadline::never();
  for (;;) {
    const size_t credits = layout_->credits();
    if (credits > 0 && drain_batch(std::min(credits, batch_max_)) > 0) {
      idle = 0;
      continue;
    }
    // stop_ first, then the ring: close() stores stop_ only after every accepted post is in the
    // ring, so a writer that sees stop_ and then an empty ring has really drained everything.
    // acquire: pairs with close()'s release of stop_.
    const bool stopping = stop_.load(std::memory_order_acquire);
    const bool pending = !ring_->empty();
    if (stopping) {
      if (!pending) break;
      if (!draining) deadline = Deadline::after_or_never(drain_timeout_);
      draining = true;
      if (deadline.expired()) break;  // the device stopped returning credits
    }
    if (pending) {  // records wait for device credits
      credit_waits_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
      ring_detail::backoff(std::min(idle++, 200u));
      continue;
    }
    // Idle: spin a little (a completion usually follows soon), then park.
    if (++idle < 4096) {
      ring_detail::cpu_relax();
      continue;
    }
    std::unique_lock<std::mutex> l(park_mu_);
    parked_.store(true, std::memory_order_relaxed);
    // See wake_writer(): fence between our parked_ store and our look at the ring.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (ring_->empty() && !stop_.load(std::memory_order_acquire))
      park_cv_.wait_for(l, std::chrono::milliseconds(5));
    parked_.store(false, std::memory_order_relaxed);
    idle = 0;
  }
  size_t left = 0;
  while (ring_->consume(ring_->capacity(), [&left](const uint8_t*, uint32_t) { ++left; }) != 0) {
  }
  lost_.store(left, std::memory_order_release);  // release: close() reads it after join anyway
}

void Gateway::close() {
  std::lock_guard<std::mutex> l(close_mu_);
  if (closed_.load(std::memory_order_acquire)) return;
  // seq_cst: pairs with Inflight (see there); later calls see the gateway closed.
  closed_.store(true, std::memory_order_seq_cst);
  if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_) {
    // A forked child: the writer thread does not exist here and must not be joined; leak the
    // parent's thread handle (destroying a joinable std::thread would terminate). The atfork
    // handler already closed our copy of the lock fd.
    static_cast<void>(writer_.release());
    mapping_.reset();
    return;
  }
  // seq_cst: see Inflight. Once no producer is inside post(), every accepted record is in the ring.
  for (unsigned i = 0; inflight_.load(std::memory_order_seq_cst) != 0; ++i)
    ring_detail::backoff(std::min(i, 200u));
  if (writer_) {
    stop_.store(true, std::memory_order_release);  // release: pairs with run()'s acquire
    {
      std::lock_guard<std::mutex> pl(park_mu_);
      park_cv_.notify_one();
    }
    writer_->join();
    writer_.reset();
  }
  mapping_.reset();  // munmap: the Var may be freed now
  register_lock_fd(lock_fd_, false);
  ::close(lock_fd_);  // releases the page to the next committer
  const uint64_t lost = lost_.load(std::memory_order_acquire);
  if (lost != 0)
    throw Error(ErrorKind::resource_exhausted, "close gateway", ETIMEDOUT,
                std::to_string(lost) + " posted record(s) could not be written: the device " +
                    "returned no credits within the drain timeout");
}

GatewayStats Gateway::stats() const noexcept {
  GatewayStats s;
  // relaxed everywhere: a snapshot of independent counters.
  s.written = written_.load(std::memory_order_relaxed);
  s.posted = direct_ ? s.written : ring_->reserved_total();
  s.batches = batches_.load(std::memory_order_relaxed);
  s.max_batch = max_batch_.load(std::memory_order_relaxed);
  s.full_waits = full_waits_.load(std::memory_order_relaxed) +
                 (ring_ ? ring_->stats().full_waits : 0);
  s.credit_waits = credit_waits_.load(std::memory_order_relaxed);
  s.lost = lost_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace mlx5tlp
