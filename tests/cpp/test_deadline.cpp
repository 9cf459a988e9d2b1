// Deadline (the one timeout type) and UniqueFd (the one owning fd type).
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <limits>

#include "check.hpp"
#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/unique_fd.hpp"

using mlx5tlp::Deadline;
using mlx5tlp::ErrorKind;
using mlx5tlp::UniqueFd;
using namespace std::chrono_literals;

static void test_deadline() {
  CHECK(Deadline::never().is_never() && !Deadline::never().expired());
  CHECK(Deadline::never().remaining() == std::chrono::nanoseconds::max());
  CHECK(Deadline::after(0ns).expired() && Deadline::poll().expired());
  CHECK(Deadline::after(-5s).expired());
  CHECK(!Deadline::after(1h).expired() && !Deadline::after(1h).is_never());
  CHECK(Deadline::after(std::chrono::nanoseconds::max()).is_never());  // saturates
  CHECK(Deadline::in_seconds(INFINITY).is_never());
  CHECK(Deadline::in_seconds(1e300).is_never());
  CHECK(Deadline::in_seconds(0.0).expired());
  CHECK(!Deadline::in_seconds(30.0).expired());
  CHECK_THROWS_KIND(Deadline::in_seconds(NAN), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(Deadline::in_seconds(-0.001), ErrorKind::invalid_argument, EINVAL);
  CHECK(Deadline::duration_from_seconds(INFINITY, "t") == std::chrono::nanoseconds::max());
  CHECK(Deadline::after_or_never(std::chrono::nanoseconds::max()).is_never());
  timespec ts{};
  CHECK(!Deadline::never().remaining_timespec(&ts));
  CHECK(Deadline::after(2s).remaining_timespec(&ts) && ts.tv_sec <= 2 && ts.tv_sec >= 1);
  const Deadline a = Deadline::after(1s), b = Deadline::after(1h);
  CHECK(a.earliest(b).at() == a.at() && b.earliest(a).at() == a.at());
}

static void test_unique_fd() {
  int raw = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  CHECK(raw >= 0);
  {
    UniqueFd fd(raw);
    UniqueFd moved(std::move(fd));
    CHECK(!fd.valid() && moved.get() == raw);
    UniqueFd dup = UniqueFd::dup_of(moved.get());
    CHECK(dup.valid() && dup.get() != raw);
  }
  CHECK(::fcntl(raw, F_GETFD) == -1 && errno == EBADF);  // closed exactly once, by its owner
  UniqueFd released(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  const int kept = released.release();
  CHECK(!released.valid() && ::fcntl(kept, F_GETFD) != -1);
  ::close(kept);
  errno = 1234;
  UniqueFd keeps_errno(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  errno = 1234;
  keeps_errno.reset();
  CHECK(errno == 1234);
}

int main() {
  test_deadline();
  test_unique_fd();
  return mlx5tlp_test::finish("test_deadline");
}
