#include "mlx5tlp/gateway_layout.hpp"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#endif

#include "mlx5tlp/error.hpp"
#include "mlx5tlp/futex.hpp"
#include "mlx5tlp/ring_wait.hpp"

namespace mlx5tlp {

void GatewayLayout::write_batch(const uint8_t* buf, const uint32_t* offsets,
                                const uint32_t* lengths, size_t n) noexcept {
  const bool batched = batched_doorbell();
  for (size_t i = 0; i < n; ++i) {
    write(buf + offsets[i], lengths[i]);
    if (!batched) doorbell();
  }
  if (batched && n != 0) doorbell();
}

bool GatewayLayout::wait_credits(const Deadline& deadline, size_t want) noexcept {
  // Bounded: 64 spins then 64 yields (ring_detail::backoff), never a sleep; the writer calls
  // again while records wait, and re-checks the gateway's state in between.
  for (unsigned i = 0; i < 128; ++i) {
    if (credits() >= want) return true;
    if (deadline.expired()) return false;
    ring_detail::backoff(i);
  }
  return credits() >= want;
}

void SimRingLayout::attach(uint8_t* page, size_t length) {
  // acquire: the device wrote the geometry before the magic (release).
  const uint32_t magic = __atomic_load_n(reinterpret_cast<uint32_t*>(page + kMagicOff),
                                         __ATOMIC_ACQUIRE);
  uint32_t ver = 0;
  std::memcpy(&ver, page + kVersion, 4);
  std::memcpy(&count_, page + kCount, 4);
  slot_size_ = ver >> 16;
  if (magic != kMagic || (ver & 0xffff) != 1 || slot_size_ < 16 || slot_size_ % 8 != 0 ||
      count_ == 0 || kSlots + size_t(count_) * slot_size_ > length)
    throw Error(ErrorKind::invalid_argument, "attach gateway layout 'sim'", EINVAL,
                "the page is not a software-device TLP gateway page (use the layout of the "
                "device you run on)");
  page_ = page;
  // Continue from what an earlier gateway on this page published.
  produced_ = __atomic_load_n(reinterpret_cast<uint64_t*>(page + kDoorbell), __ATOMIC_RELAXED);
  next_slot_ = uint32_t(produced_ % count_);
}

size_t SimRingLayout::credits() noexcept {
  // acquire: the device model's copy-out of a slot happens-before we overwrite it.
  const uint64_t consumed =
      __atomic_load_n(reinterpret_cast<uint64_t*>(page_ + kConsumer), __ATOMIC_ACQUIRE);
  const uint64_t in_flight = produced_ - consumed;
  return in_flight >= count_ ? 0 : size_t(count_ - in_flight);
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the credit futex is the consumer index's low 32 bits, at page + 0x40 on LE");

bool SimRingLayout::wait_credits(const Deadline& deadline, size_t want) noexcept {
  if (want == 0) want = 1;
  // A device model that is polling returns credits within microseconds: spin a little first.
  for (unsigned i = 0; i < 128; ++i) {
    if (credits() >= want) return true;
    ring_detail::cpu_relax();
  }
  auto* waiting = reinterpret_cast<uint32_t*>(page_ + kWriterWaiting);
  auto* consumer = reinterpret_cast<uint64_t*>(page_ + kConsumer);
  // Dekker with the device model (another process): we store writer_waiting then load the
  // consumer index; it stores the consumer index then loads writer_waiting. The full fence
  // between our store and our load (and the model's own) means one of us sees the other.
  // relaxed + fence: the fence is what orders the store before the load below.
  __atomic_store_n(waiting, 1u, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  // acquire: as in credits(): the model's copy-out of a slot happens-before we overwrite it.
  const uint64_t consumed = __atomic_load_n(consumer, __ATOMIC_ACQUIRE);
  bool ok = produced_ - consumed + want <= count_;
  if (!ok) {
    const Deadline until =
        deadline.earliest(Deadline::after(std::chrono::nanoseconds(kCreditWaitCap)));
    // Blocking point: a shared futex on the consumer index's low word, woken by the device
    // model after it consumes (or by wake_credit_waiter()); FUTEX_WAIT returns at once if the
    // index moved since we read it.
    futex_wait(consumer, static_cast<uint32_t>(consumed), until, /*shared=*/true);
    ok = credits() >= want;
  }
  // relaxed: a hint for the device model; a stale 1 costs it one needless FUTEX_WAKE.
  __atomic_store_n(waiting, 0u, __ATOMIC_RELAXED);
  return ok;
}

void SimRingLayout::wake_credit_waiter() noexcept {
  // The page pointer is set by attach() before the writer starts and never changes.
  if (page_ != nullptr) futex_wake(page_ + kConsumer, INT_MAX, /*shared=*/true);
}

void SimRingLayout::write(const uint8_t* record, size_t len) noexcept {
  auto* slot = reinterpret_cast<volatile uint64_t*>(page_ + kSlots + size_t(next_slot_) * slot_size_);
  slot[0] = uint64_t(len);  // u32 length, u32 zero: one 8-byte store
  copy_to_device(slot + 1, record, len);
  ++produced_;
  if (++next_slot_ == count_) next_slot_ = 0;
}

void SimRingLayout::write_batch(const uint8_t* buf, const uint32_t* offsets,
                                const uint32_t* lengths, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i) SimRingLayout::write(buf + offsets[i], lengths[i]);
  if (n != 0) doorbell();
}

void SimRingLayout::doorbell() noexcept {
  // The slot stores must reach the page before the doorbell says they are there.
  store_fence();
  // release: pairs with the device model's acquire load of the doorbell; a single 64-bit store.
  __atomic_store_n(reinterpret_cast<uint64_t*>(page_ + kDoorbell), produced_, __ATOMIC_RELEASE);
}

// ---------------------------------------------------------------- raw_tlp (provisional)
namespace {

// CPUID.(EAX=7,ECX=0):ECX[28] (Intel SDM vol. 2, MOVDIR64B); Linux exposes Arm FEAT_LS64 as
// bit 3 of AT_HWCAP3, which is what rdma-core v63 tests (util/mmio.c, aarch64_has_ls64).
const char* detect_store64() noexcept {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) != 0 && (c & (1u << 28)) != 0) return "movdir64b";
#elif defined(__aarch64__)
  constexpr unsigned long kAtHwcap3 = 29, kHwcap3Ls64 = 1ul << 3;
  if ((getauxval(kAtHwcap3) & kHwcap3Ls64) != 0) return "st64b";
#endif
  return nullptr;
}

// One single-copy-atomic 64-byte store of src (any alignment) to dst (64-byte aligned).
inline void store64(uint8_t* dst, const uint8_t* src) noexcept {
#if defined(__x86_64__)
  // MOVDIR64B: a 64-byte direct store, one write transaction; weakly ordered like a WC store,
  // so the record's store_fence() orders it before what follows.
  asm volatile("movdir64b (%1), %0" : : "r"(dst), "r"(src) : "memory");
#elif defined(__aarch64__)
  // ST64B x0..x7 -> [x8]: assembled by hand (0xf83f9000 | Rn << 5 | Rt) so that the build does
  // not need -march=armv8.7-a+ls64; used only when AT_HWCAP3 says the CPU has FEAT_LS64.
  register uint64_t x0 asm("x0"), x1 asm("x1"), x2 asm("x2"), x3 asm("x3");
  register uint64_t x4 asm("x4"), x5 asm("x5"), x6 asm("x6"), x7 asm("x7");
  uint64_t w[8];
  __builtin_memcpy(w, src, 64);
  x0 = w[0]; x1 = w[1]; x2 = w[2]; x3 = w[3]; x4 = w[4]; x5 = w[5]; x6 = w[6]; x7 = w[7];
  register uint8_t* x8 asm("x8") = dst;
  asm volatile(".inst 0xf83f9100" : : "r"(x0), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5),
               "r"(x6), "r"(x7), "r"(x8) : "memory");
#else
  (void)dst;
  (void)src;
#endif
}

// Eight aligned 8-byte stores of one 64-byte chunk: `rem` (1..64) record bytes, zero-padded.
// Whole words first, then at most one partial word (TLP records are whole DWs: 4 bytes), then
// zeros; fixed-size loads only, no call to memcpy in the inner loop.
__attribute__((always_inline)) inline void store8_chunk(volatile uint64_t* dst, const uint8_t* src, size_t rem) noexcept {
  const size_t full = rem / 8;
  size_t w = 0;
  for (; w < full; ++w) {
    uint64_t x;
    __builtin_memcpy(&x, src + 8 * w, 8);  // the source may be unaligned; the store is one word
    dst[w] = x;
  }
  if (const size_t tail = rem % 8; tail != 0) {
    uint64_t x = 0;
    size_t i = 0;
    if (tail >= 4) {
      uint32_t lo;
      __builtin_memcpy(&lo, src + 8 * w, 4);
      x = lo;
      i = 4;
    }
    for (; i < tail; ++i) x |= uint64_t(src[8 * w + i]) << (8 * i);
    dst[w++] = x;
  }
  for (; w < 8; ++w) dst[w] = 0;
}

}  // namespace

const char* cpu_store64() noexcept {
  static const char* const path = detect_store64();  // once: CPUID / getauxval
  return path;
}

RawTlpLayout::RawTlpLayout(size_t slot_size, StorePath path)
    : slot_size_(slot_size), path_(path), store64_(path == StorePath::store64) {
  if (path == StorePath::store64 && cpu_store64() == nullptr)
    throw Error(ErrorKind::not_supported, "gateway layout 'raw_tlp'", ENOTSUP,
                "store64 asks for a single-copy-atomic 64-byte store (x86 MOVDIR64B, Arm "
                "ST64B/FEAT_LS64), which this CPU does not have; use store8");
}

void RawTlpLayout::set_device_memory(bool mmio) noexcept {
  if (path_ != StorePath::automatic) return;
  const char* env = std::getenv("MLX5TLP_STORE64");
  const bool env_off = env != nullptr && std::strcmp(env, "0") == 0;
  store64_ = mmio && !env_off && cpu_store64() != nullptr;
}

void RawTlpLayout::attach(uint8_t* page, size_t length) {
  if (slot_size_ == 0 || slot_size_ % 64 != 0 || length % slot_size_ != 0)
    throw Error(ErrorKind::invalid_argument, "attach gateway layout 'raw_tlp'", EINVAL,
                "slot size " + std::to_string(slot_size_) +
                    " must be a multiple of 64 dividing the page length " + std::to_string(length));
  if (reinterpret_cast<uintptr_t>(page) % 64 != 0)
    throw Error(ErrorKind::invalid_argument, "attach gateway layout 'raw_tlp'", EINVAL,
                "the page is not 64-byte aligned");
  page_ = page;
  slots_ = length / slot_size_;
}

// The record as ceil(len / 64) whole 64-byte chunks, zero-padded, in ascending address order
// (as rdma-core's mmio_memcpy_x64 writes BlueFlame WQEs): full chunks straight from the
// record, the last partial one through a zero-padded 64-byte buffer (store64) or word by word.
template <bool Store64>
__attribute__((always_inline)) inline void RawTlpLayout::put(uint8_t* slot, const uint8_t* record,
                                                             size_t len) noexcept {
  size_t done = 0;
  for (; done + 64 <= len; done += 64) {
    if (Store64) store64(slot + done, record + done);
    else store8_chunk(reinterpret_cast<volatile uint64_t*>(slot + done), record + done, 64);
  }
  if (done < len) {
    if (Store64) {
      alignas(64) uint8_t last[64] = {};
      __builtin_memcpy(last, record + done, len - done);
      store64(slot + done, last);
    } else {
      store8_chunk(reinterpret_cast<volatile uint64_t*>(slot + done), record + done, len - done);
    }
  }
}

void RawTlpLayout::write(const uint8_t* record, size_t len) noexcept {
  // Wire order is the TLP's byte order: copied as is.
  uint8_t* slot = page_ + next_ * slot_size_;
  if (store64_) put<true>(slot, record, len);
  else put<false>(slot, record, len);
  if (++next_ == slots_) next_ = 0;
}

template <bool Store64>
void RawTlpLayout::put_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                             size_t n) noexcept {
  // Locals, not members: the compiler must assume a volatile store may alias a member and
  // would reload them after every store.
  uint8_t* const first = page_;
  uint8_t* const end = page_ + slots_ * slot_size_;
  const size_t stride = slot_size_;
  uint8_t* slot = first + next_ * stride;
  for (size_t i = 0; i < n; ++i) {
    put<Store64>(slot, buf + offsets[i], lengths[i]);
    store_fence();  // provisional: publish each record before the next one starts
    slot += stride;
    if (slot == end) slot = first;  // wrap without a division
  }
  next_ = size_t(slot - first) / stride;  // once per batch
}

void RawTlpLayout::write_batch(const uint8_t* buf, const uint32_t* offsets,
                               const uint32_t* lengths, size_t n) noexcept {
  // The store path is chosen once per batch, not per record.
  if (store64_) put_batch<true>(buf, offsets, lengths, n);
  else put_batch<false>(buf, offsets, lengths, n);
}

std::unique_ptr<GatewayLayout> make_layout(const std::string& spec) {
  if (spec == "sim") return std::make_unique<SimRingLayout>();
  if (spec.rfind("raw_tlp", 0) == 0) {
    std::string rest = spec.substr(7);
    StorePath path = StorePath::automatic;
    for (const char* suffix : {":store8", ":store64"}) {
      const size_t n = std::strlen(suffix);
      if (rest.size() >= n && rest.compare(rest.size() - n, n, suffix) == 0) {
        path = suffix[6] == '8' ? StorePath::store8 : StorePath::store64;
        rest.resize(rest.size() - n);
        break;
      }
    }
    if (rest.empty()) return std::make_unique<RawTlpLayout>(512, path);
    if (rest[0] == ':' && rest.size() > 1 && rest[1] >= '0' && rest[1] <= '9') {
      char* end = nullptr;
      const unsigned long n = std::strtoul(rest.c_str() + 1, &end, 10);
      if (end != nullptr && *end == '\0' && n > 0) return std::make_unique<RawTlpLayout>(n, path);
    }
  }
  throw Error(ErrorKind::invalid_argument, "gateway layout", EINVAL,
              "unknown layout '" + spec +
                  "' (expected 'sim' or 'raw_tlp[:<slot bytes>][:store8|:store64]')");
}

}  // namespace mlx5tlp
