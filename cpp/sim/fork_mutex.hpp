// A process-local mutex that a pthread_atfork child handler can reset.
//
// After fork() only the forking thread exists in the child. The at-fork prepare handler takes
// every ForkMutex (so no other thread is inside a critical section at the fork) and the parent
// handler releases them. The child cannot simply unlock: a recursive mutex records its owner's
// thread id, which the child's thread does not have, so the unlock would fail and leave it
// locked forever. The child handler re-initialises them instead (state: unlocked, no owner).
#pragma once

#include <pthread.h>

namespace mlx5tlp::sim {

class ForkMutex {
 public:
  explicit ForkMutex(bool recursive = false) noexcept : recursive_(recursive) { init(); }
  ~ForkMutex() { pthread_mutex_destroy(&m_); }
  ForkMutex(const ForkMutex&) = delete;
  ForkMutex& operator=(const ForkMutex&) = delete;

  void lock() noexcept { pthread_mutex_lock(&m_); }
  void unlock() noexcept { pthread_mutex_unlock(&m_); }
  // Only in an at-fork child handler, where no other thread exists.
  void reset_in_child() noexcept { init(); }

 private:
  void init() noexcept {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    if (recursive_) pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&m_, &a);
    pthread_mutexattr_destroy(&a);
  }
  pthread_mutex_t m_;
  bool recursive_;
};

}  // namespace mlx5tlp::sim
