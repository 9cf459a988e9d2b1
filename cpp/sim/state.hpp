// The software device's shared state: one file per device, mapped MAP_SHARED by every process
// that uses the device. It plays the kernel's and the firmware's part: which contexts are alive,
// which objects exist, who owns which gateway page, and the host's request channels.
//
// The file is input from other processes: DeviceMap validates every field on open
// (validate.cpp) and the code keeps private copies of what it must trust (the configuration,
// the geometry). It holds no process-local pointers and no pthread objects: the device mutex
// is an OFD lock on the state file (device_map.cpp), so a corrupt file can never wedge or
// crash a process that opens it.
//
// Liveness follows the kernel. A context is an open file description (OFD) of the device's
// `bar` file; it holds an OFD write lock on one byte (kCtxLockBase + slot). The lock lives
// exactly as long as some fd refers to that OFD in any process (dup, fork and SCM_RIGHTS share
// it; a SIGKILLed process's fds close), so "no lock held" means "last fd closed": the device
// then reclaims the context's objects, as the kernel does. Request-channel claimer sessions
// (channel.hpp) and the device model (host.cpp) hold lock bytes the same way.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "mlx5tlp/sim_abi.h"

#define M5A_EXPORT extern "C" __attribute__((visibility("default")))

// Every rdma-core function the software device exports, declared from the one prototype list
// (mlx5tlp/abi_functions.h) that tests/cpp/abi_conformance.c checks against rdma-core's own
// headers: a definition below with another return or parameter type fails to compile.
#define M5A_STRUCT(tag) struct m5a_##tag
#define M5A_ENUM(tag) int
#define M5A_FUNCTION(ret, name, params) M5A_EXPORT ret name params;
#define M5A_FUNCTION_63 M5A_FUNCTION
#include "mlx5tlp/abi_functions.h"
#undef M5A_FUNCTION_63
#undef M5A_FUNCTION
#undef M5A_ENUM
#undef M5A_STRUCT

namespace mlx5tlp::sim {

constexpr uint64_t kStateMagic = 0x3154534c54354c4dull;  // "ML5TLST1"
// 3: two mark records per request slot, each with the answer's progress (a v2 file is refused)
constexpr uint32_t kStateVersion = 3;
constexpr uint32_t kMaxContexts = 64;
constexpr uint32_t kMaxObjects = 1024;
constexpr uint32_t kMaxGwPages = 15;  // tlp_rsp_gw_num_pages is a 4-bit PRM field
constexpr uint32_t kMaxVirtioPages = 256;
constexpr uint32_t kVirtioPageSize = 4096;
constexpr uint32_t kObjDataMax = 256;  // bytes of a DEVX object's last create/modify inbox kept
constexpr uint32_t kChannels = 8;
constexpr uint32_t kRequestSlots = 64;
constexpr uint32_t kRequestMax = 16 + 4096;  // 4DW header + 1024 DW payload
constexpr uint32_t kMaxSessions = 64;
constexpr uint32_t kKnownDeviceFlags = M5A_SIM_DEV_NO_VAR | M5A_SIM_DEV_NO_VAR_FLAGS_ATTR;

// Lock bytes, far beyond the data of the files they are taken on.
constexpr off_t kLockBase = off_t(1) << 40;
constexpr off_t kCtxLockBase = kLockBase;                 // bar: + context slot
constexpr off_t kSessionLockBase = kLockBase + 4096;      // bar: + session slot
constexpr off_t kHostLock = kLockBase + 8192;             // bar: the device model
constexpr off_t kDeviceMutexLock = kLockBase;             // state: the device mutex

enum class ObjKind : uint32_t { none = 0, tlp_var, virtio_var, umem, devx_obj };
constexpr uint32_t kLastKind = uint32_t(ObjKind::devx_obj);

// Fault injection (mlx5tlp_sim_inject_fault): one entry per operation.
enum class FaultOp : uint32_t { umem_dereg = 0, devx_obj_destroy, devx_obj_query, devx_obj_modify,
                                devx_obj_create, count };

struct CtxSlot {
  uint32_t live;  // 1 while an OFD holds the slot's lock byte
  uint32_t gen;   // bumped on every allocation of the slot
};

struct Object {
  ObjKind kind;
  uint32_t ctx_slot;
  uint32_t ctx_gen;
  uint32_t handle;     // "kernel" handle: lowest free per context, as the kernel's idr
  uint32_t id;         // page_id / umem_id / object_id (umem/object ids are device-unique)
  uint32_t type;       // DEVX: general object type or create opcode
  uint64_t aux;        // VAR: mmap_off; UMEM: size
  uint32_t length;     // VAR: page length
  uint32_t data_len;   // DEVX: bytes in data
  uint64_t pin_token;  // UMEM: the registering process (RLIMIT_MEMLOCK accounting)
  uint64_t pin_pages;  // UMEM: pages pinned, counted as ib_umem_get does
  uint8_t data[kObjDataMax];
};

struct Fault {
  uint32_t err;    // errno to fail with
  uint32_t count;  // calls left to fail
};

// The kernel's view of one TLP gateway page.
constexpr uint32_t kPageDraining = 0xffffffffu;
struct GwPage {
  std::atomic<uint32_t> owner;     // object index + 1; 0 free; kPageDraining: freed, records left
  uint32_t pad;
  std::atomic<uint64_t> gen;       // allocation generation (also in the page header)
  std::atomic<uint64_t> consumed;  // records the device model consumed (its trusted copy)
};

struct SessionSlot {
  std::atomic<uint32_t> gen;  // bumped on every allocation of the slot
  uint32_t pid;               // for diagnostics only
};

// A host->function request channel: a bounded ring whose slots carry one 64-bit state word
// each (see channel.hpp for the encoding and the protocol). The words sit together so that a
// claimer scans eight cache lines, not sixty-four 4 KiB slots.
// A claim's mark: "the first `before` units of the answer are published; the first `after`
// (M5A_SIM_PROGRESS_ALL: all of it) once gateway page `page`'s doorbell count reaches `seq`,
// while the page is still allocation `gen`". `check` (channel.cpp mark_check) binds the fields
// to the claim's position: a damaged record, or one left from an older claim of the slot, is
// refused, never read as this claim's progress.
struct MarkRecord {
  uint32_t page;
  uint32_t before;
  uint64_t seq;
  uint64_t gen;
  uint32_t after;
  uint32_t check;
};

// Two mark records: the owner writes the one the word does not select, then flips the word's
// MARK_SELECT bit with the CAS that sets MARKED, so a claimer killed while re-marking leaves the
// previous mark whole (a split answer's progress is never lost between two doorbells).
struct RequestSlot {
  uint32_t len;
  uint32_t pad;
  MarkRecord mark[2];
  uint8_t data[kRequestMax];
};

struct RequestChannel {
  alignas(64) std::atomic<uint64_t> head;  // next position the host fills (host-written only)
  alignas(64) std::atomic<uint64_t> tail;  // claim hint: no position below it is READY
  alignas(64) std::atomic<uint64_t> word[kRequestSlots];
  RequestSlot slot[kRequestSlots];
};

struct DeviceState {
  uint64_t magic;
  uint32_t version;
  uint32_t state_size;
  m5a_sim_device_config cfg;
  uint32_t next_id;      // umem_id / object_id allocator (device-unique)
  // Request wake-up word (mlx5tlp_sim_function_wait): bit 31 "a function waits", bits 0..30 a
  // sequence bumped by a push that found the bit set, and by mlx5tlp_sim_function_wake. A
  // shared futex word; it sits where v2 had a reserved zero word, so the layout is unchanged.
  std::atomic<uint32_t> req_wake;
  uint64_t reclaimed;    // objects reclaimed from dead contexts
  uint64_t page_gen;     // gateway page allocation counter
  uint64_t host_epoch;   // bumped by every device model that attaches
  uint64_t stale_requests;     // requests discarded by epochs and resets (cumulative)
  uint64_t stale_completions;  // unconsumed completion records discarded (cumulative)
  CtxSlot ctx[kMaxContexts];
  SessionSlot sessions[kMaxSessions];
  Fault faults[uint32_t(FaultOp::count)];
  GwPage gw[kMaxGwPages];
  uint32_t virtio_owner[kMaxVirtioPages];  // object index + 1, 0 = free
  Object obj[kMaxObjects];
  RequestChannel chan[kChannels];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory atomics must be lock-free");
static_assert(sizeof(std::atomic<uint64_t>) == 8, "a shared atomic is its plain value");

// ---- gateway page layout of the software device (docs/sim.md) ----
// The page is a ring of fixed-size slots. The writer fills slots, then publishes them by storing
// the new producer count into `doorbell`; the device model consumes and stores `consumer`.
// Every process that maps the page can write all of it: the device model reads only the
// doorbell and the slot lengths from it, with its own geometry and bounds.
namespace gw {
constexpr uint32_t kMagic = 0x5747354d;  // "M5GW"
constexpr uint32_t kLayoutVersion = 1;
constexpr uint32_t kDoorbell = 0x00;       // u64 records published (the doorbell store)
constexpr uint32_t kMagicOff = 0x08;       // u32
constexpr uint32_t kVersionOff = 0x0c;     // u16 layout version, u16 slot size
constexpr uint32_t kSlotCount = 0x10;      // u32
constexpr uint32_t kPageId = 0x14;         // u32
constexpr uint32_t kGeneration = 0x18;     // u64
constexpr uint32_t kConsumer = 0x40;       // u64 records consumed (credits come from here)
constexpr uint32_t kWriterWaiting = 0x48;  // u32 set by a writer futex-waiting on the consumer
constexpr uint32_t kSlots = 0x80;          // first slot; each slot: u32 length, u32 0, TLP bytes
constexpr uint32_t kSlotHeader = 8;
}  // namespace gw

// Big-endian helpers for PRM mailboxes and TLP headers.
inline uint32_t get_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}
inline uint16_t get_be16(const uint8_t* p) { return uint16_t((p[0] << 8) | p[1]); }
inline void put_be32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}
inline void put_be64(uint8_t* p, uint64_t v) {
  put_be32(p, uint32_t(v >> 32));
  put_be32(p + 4, uint32_t(v));
}

}  // namespace mlx5tlp::sim
