// The function model against the PCIe Base Specification (6.x numbering; section and table
// named at each check): configuration space masks, BAR sizing and decode, capability lists,
// the PCI Express / PM capabilities' run-time rules, and spec validation. MSI-X and state
// snapshots: test_msix.cpp. Runs plain and under AddressSanitizer (tests/test_native.py).
#include <cerrno>
#include <cstring>
#include <vector>

#include "check.hpp"
#include "function_fixture.hpp"

using namespace function_fixture;
using mlx5tlp::ErrorKind;

namespace {

void test_header_and_command() {
  Function f(compile(spec()), nullptr);
  CHECK(rd(f, reg::kVendorId, 2) == 0x15b3 && rd(f, reg::kDeviceId, 2) == 0x1234);
  CHECK(rd(f, reg::kRevision, 4) == 0x02000007);  // §7.5.1.1.5/6: revision, then class code
  CHECK(rd(f, reg::kHeaderType, 1) == 0);          // §7.5.1.1.9: type 0, single function
  CHECK(rd(f, reg::kSubsystemId, 2) == 0x0042 && rd(f, reg::kInterruptPin, 1) == 1);
  wr(f, reg::kVendorId, 4, 0xffffffff);  // RO identity ignores writes
  CHECK(rd(f, reg::kVendorId, 4) == 0x123415b3);
  // §7.5.1.1.3 Table 7-4: only I/O, Memory, Bus Master, Parity, SERR#, INTx Disable are RW.
  wr(f, reg::kCommand, 2, 0xffff);
  CHECK(rd(f, reg::kCommand, 2) == 0x0547);
  // §7.5.1.1.8 Latency Timer hardwired 00h; §7.5.1.1.7 Cache Line Size RW.
  wr(f, reg::kCacheLineSize, 4, 0xffffffff);
  CHECK(rd(f, reg::kCacheLineSize, 1) == 0xff && rd(f, reg::kLatencyTimer, 1) == 0);
  CHECK(rd(f, reg::kHeaderType, 1) == 0 && rd(f, reg::kBist, 1) == 0);
  // Without I/O BARs the I/O Space Enable is hardwired 0 ("permitted to be hardwired").
  FunctionSpec s = spec();
  s.bars.pop_back();
  Function g(compile(s), nullptr);
  wr(g, reg::kCommand, 2, 0xffff);
  CHECK(rd(g, reg::kCommand, 2) == 0x0546);
}

void test_status_rw1c_and_byte_enables() {
  Function f(compile(spec()), nullptr);
  // §7.5.1.1.4: Capabilities List hardwired 1b; error bits RW1C.
  CHECK(rd(f, reg::kStatus, 2) == status::kCapabilitiesList);
  f.config().device_set_bits(reg::kStatus, 2, status::kReceivedMasterAbort | status::kSignaledTargetAbort);
  wr(f, reg::kStatus, 2, 0);  // writing 0 leaves RW1C bits alone
  CHECK(rd(f, reg::kStatus, 2) == (status::kCapabilitiesList | status::kReceivedMasterAbort |
                                   status::kSignaledTargetAbort));
  wr(f, reg::kStatus, 2, status::kReceivedMasterAbort | status::kCapabilitiesList);
  CHECK(rd(f, reg::kStatus, 2) == (status::kCapabilitiesList | status::kSignaledTargetAbort));
  // §2.2.7 First DW BE: only enabled bytes change. Command is bytes 0-1 of DW 4, Status 2-3.
  f.config_write(reg::kCommand, 0xffff0006, 0x1);  // byte 0 only; Status bytes not enabled
  CHECK(rd(f, reg::kCommand, 2) == 0x0006 && (rd(f, reg::kStatus, 2) & status::kSignaledTargetAbort) != 0);
  f.config_write(reg::kCommand, 0x08000000, 0x8);  // byte 3: clears Signaled Target Abort
  CHECK(rd(f, reg::kStatus, 2) == status::kCapabilitiesList && rd(f, reg::kCommand, 2) == 0x0006);
  // Reserved header bytes 35h-3Bh: RsvdP, read 0, writes ignored (§7.4).
  wr(f, 0x38, 4, 0xffffffff);
  CHECK(rd(f, 0x38, 4) == 0 && (rd(f, reg::kCapPtr, 4) & ~0xffu) == 0);
}

void test_bar_sizing() {
  Function f(compile(spec()), nullptr);
  // §7.5.1.2.1: write all 1s, read back the size mask with the type bits.
  for (int i = 0; i < 6; ++i) wr(f, uint16_t(reg::kBar0 + 4 * i), 4, 0xffffffff);
  CHECK(rd(f, 0x10, 4) == 0xfff0000c);  // 1 MiB, 64-bit (10b), prefetchable
  CHECK(rd(f, 0x14, 4) == 0xffffffff);  // upper half: all address bits
  CHECK(rd(f, 0x18, 4) == 0xffffc000);  // 16 KiB 32-bit non-prefetchable
  CHECK(rd(f, 0x1c, 4) == 0xffffff01);  // 256-byte I/O, bit 1 reserved
  CHECK(rd(f, 0x20, 4) == 0 && rd(f, 0x24, 4) == 0);  // unimplemented: hardwired zero
  // §7.5.1.2.4 Expansion ROM: address bits 31:11 implemented down to the size, Enable RW.
  wr(f, reg::kExpansionRom, 4, 0xfffffffe);
  CHECK(rd(f, reg::kExpansionRom, 4) == 0xffff0000);
  wr(f, reg::kExpansionRom, 4, 0xffffffff);
  CHECK(rd(f, reg::kExpansionRom, 4) == 0xffff0001);
  // A 64-bit BAR larger than 4 GiB: the upper register's low bits become read-only zero.
  FunctionSpec s = spec();
  s.bars[0].size = uint64_t(8) << 30;
  Function g(compile(s), nullptr);
  wr(g, 0x10, 4, 0xffffffff);
  wr(g, 0x14, 4, 0xffffffff);
  CHECK(rd(g, 0x10, 4) == 0x0000000c && rd(g, 0x14, 4) == 0xfffffffe);
}

void test_decode() {
  Function f(compile(spec()), nullptr);
  wr(f, 0x10, 4, 0x00100000);
  wr(f, 0x14, 4, 0x00000020);  // BAR0 = 0x20_0010_0000
  wr(f, 0x18, 4, 0xe0004000);  // BAR2 = 0xe000_4000
  wr(f, 0x1c, 4, 0x0000c100);  // BAR3 = I/O 0xc100
  wr(f, reg::kExpansionRom, 4, 0xe0100000);  // ROM, not enabled
  // §7.5.1.1.3: Memory Space Enable clear -> memory requests are Unsupported Requests.
  CHECK(f.decode_memory(0x2000100010, 4).status == Decode::disabled);
  wr(f, reg::kCommand, 2, command::kMemorySpace);
  DecodeResult r = f.decode_memory(0x2000100010, 4);
  CHECK(r.status == Decode::hit && r.bar == 0 && r.offset == 0x10);
  r = f.decode_memory(0xe0007ffc, 8);
  CHECK(r.status == Decode::crosses_end && r.bar == 2);
  CHECK(f.decode_memory(0xe0008000, 4).status == Decode::unclaimed);
  CHECK(f.decode_memory(0xe0100000, 4).status == Decode::unclaimed);  // ROM Enable clear
  wr(f, reg::kExpansionRom, 4, 0xe0100001);
  r = f.decode_memory(0xe010fff0, 16);
  CHECK(r.status == Decode::hit && r.bar == kRomBar && r.offset == 0xfff0);
  CHECK(f.decode_io(0xc1ff, 1).status == Decode::disabled);  // I/O Space Enable clear
  wr(f, reg::kCommand, 2, command::kMemorySpace | command::kIoSpace);
  r = f.decode_io(0xc1fc, 4);
  CHECK(r.status == Decode::hit && r.bar == 3 && r.offset == 0xfc);
  // §5.3.1: in D3hot only Configuration and Message Requests are accepted.
  const uint16_t pmc = find_cap(f, cap_id::kPowerManagement);
  wr(f, uint16_t(pmc + pm::kPmcsr), 2, pm::kD3hot);
  CHECK(f.power_state() == pm::kD3hot && !f.memory_enabled());
  CHECK(f.decode_memory(0x2000100010, 4).status == Decode::disabled);
  wr(f, uint16_t(pmc + pm::kPmcsr), 2, pm::kD0);  // No_Soft_Reset set: state kept
  CHECK(f.memory_enabled() && f.bar_base(0) == 0x2000100000ull);
}

void test_capability_lists() {
  Function f(compile(spec()), nullptr);
  // §7.5.1.1.11: pointer DW-aligned, non-zero; each next pointer DW-aligned in [40h, FFh].
  std::vector<uint8_t> ids;
  for (uint16_t p = uint16_t(rd(f, reg::kCapPtr, 1)); p != 0; p = uint16_t(rd(f, uint16_t(p + 1), 1))) {
    CHECK(p % 4 == 0 && p >= 0x40 && p < 0x100);
    ids.push_back(uint8_t(rd(f, p, 1)));
    if (ids.size() > 48) break;
  }
  CHECK((ids == std::vector<uint8_t>{0x10, 0x01, 0x11, 0x09}));
  const uint16_t vsc = find_cap(f, cap_id::kVendorSpecific);
  CHECK(rd(f, uint16_t(vsc + 2), 1) == 12);  // §7.9.4: length includes the 3 header bytes
  // §7.6.3: extended list from 100h, {ID, Version, Next}.
  std::vector<uint32_t> ext;
  for (uint16_t p = 0x100; p != 0;) {
    const uint32_t h = rd(f, p, 4);
    ext.push_back(h & 0xfffff);
    CHECK(p % 4 == 0);
    p = uint16_t(h >> 20);
    if (ext.size() > 16) break;
  }
  CHECK((ext == std::vector<uint32_t>{0x20001, 0x10003, 0x1000b}));
  // Vendor data: declared RW range writable, the rest read-only.
  wr(f, uint16_t(vsc + 3), 1, 0xee);
  wr(f, uint16_t(vsc + 7), 1, 0xee);
  CHECK(rd(f, uint16_t(vsc + 3), 1) == 1 && rd(f, uint16_t(vsc + 7), 1) == 0xee);
  // DSN §7.9.3: 64-bit RO.
  const uint16_t dsn = uint16_t(rd(f, 0x100, 4) >> 20);
  wr(f, uint16_t(dsn + 4), 4, 0);
  CHECK(rd(f, uint16_t(dsn + 4), 4) == 0x44556677 && rd(f, uint16_t(dsn + 8), 4) == 0x00112233);
}

void test_pcie_rules() {
  Function f(compile(spec()), nullptr);
  const uint16_t x = find_cap(f, cap_id::kPciExpress);
  CHECK(rd(f, uint16_t(x + pcie::kCaps), 2) == 0x0002);  // §7.5.3.2: v2, Endpoint
  CHECK((rd(f, uint16_t(x + pcie::kDevCap), 4) & 7u) == 2);  // 512 bytes supported
  CHECK(f.max_payload_size() == 128 && f.read_completion_boundary() == 64);
  CHECK(f.max_read_request_size() == 512);  // §7.5.3.4: MRRS default 010b
  wr(f, uint16_t(x + pcie::kDevCtl), 2, 1u << 5);  // 256
  CHECK(f.max_payload_size() == 256);
  // Above Supported (§7.5.3.4 "Permissible values ..."): reads back, the function uses 512.
  wr(f, uint16_t(x + pcie::kDevCtl), 2, 5u << 5);
  CHECK(((rd(f, uint16_t(x + pcie::kDevCtl), 2) >> 5) & 7u) == 5 && f.max_payload_size() == 512);
  wr(f, uint16_t(x + pcie::kLinkCtl), 2, pcie::kLinkCtlRcb);
  CHECK(f.read_completion_boundary() == 128);
  // §7.5.3.5: Device Status error bits RW1C.
  f.config().device_set_bits(uint16_t(x + pcie::kDevSta), 2, 0x9);
  wr(f, uint16_t(x + pcie::kDevSta), 2, 0x1);
  CHECK(rd(f, uint16_t(x + pcie::kDevSta), 2) == 0x8);
  // §7.5.3.16: Completion Timeout Value / Disable.
  CHECK(f.completion_timeout().min_us == 50 && f.completion_timeout().max_us == 50000);
  wr(f, uint16_t(x + pcie::kDevCtl2), 2, 0x6);  // 65 ms .. 210 ms (range B, supported)
  CHECK(f.completion_timeout().min_us == 65000 && f.completion_timeout().max_us == 210000);
  wr(f, uint16_t(x + pcie::kDevCtl2), 2, 0x9);  // range C: not supported -> default
  CHECK(f.completion_timeout().max_us == 50000 && !f.completion_timeout().disabled);
  wr(f, uint16_t(x + pcie::kDevCtl2), 2, 0x10);
  CHECK(f.completion_timeout().disabled);
}

// The builder splits a read with what the host programmed (§2.3.1.1): a 512-byte MRd at
// 0x...60; every completion but the last ends on an RCB boundary and carries at most MPS.
void test_completions_follow_programmed_mps_and_rcb() {
  Function f(compile(spec()), nullptr);
  const uint16_t x = find_cap(f, cap_id::kPciExpress);
  mlx5tlp::tlp::Tlp req;
  req.kind = mlx5tlp::tlp::Kind::MRd;
  req.address = 0x1000060;
  req.length = 128;
  req.first_be = 0xf;
  req.last_be = 0xf;
  req.requester_id = 0x0100;
  mlx5tlp::tlp::set_format(&req);
  std::vector<uint8_t> data(512);
  auto sizes = [&](const Function& fn) {
    mlx5tlp::tlp::Tlp out[mlx5tlp::tlp::kMaxCompletions];
    size_t n = 0;
    CHECK(mlx5tlp::tlp::plan_completions(req, data.data(), data.size(), fn.completion_params(0x0200),
                                         out, mlx5tlp::tlp::kMaxCompletions, &n) ==
          mlx5tlp::tlp::Status::ok);
    std::vector<size_t> v;
    for (size_t i = 0; i < n; ++i) v.push_back(out[i].data_len);
    return v;
  };
  CHECK((sizes(f) == std::vector<size_t>{96, 128, 128, 128, 32}));  // MPS 128, RCB 64
  wr(f, uint16_t(x + pcie::kDevCtl), 2, 1u << 5);  // MPS 256
  CHECK((sizes(f) == std::vector<size_t>{224, 256, 32}));
  wr(f, uint16_t(x + pcie::kLinkCtl), 2, pcie::kLinkCtlRcb);  // RCB 128
  CHECK(f.completion_params(0x0200).max_payload == 256 && f.completion_params(0x0200).rcb == 128);
  CHECK((sizes(f) == std::vector<size_t>{160, 256, 96}));
}

void test_power_management() {
  FunctionSpec s = spec();
  s.power_management.no_soft_reset = false;
  Function f(compile(s), nullptr);
  const uint16_t p = find_cap(f, cap_id::kPowerManagement);
  CHECK((rd(f, uint16_t(p + pm::kPmc), 2) & 7u) == 3);  // §7.5.2.1 version 011b
  // §7.5.2.2: writing an unsupported state (D1, D2 here) is discarded.
  wr(f, uint16_t(p + pm::kPmcsr), 2, pm::kD1);
  CHECK(f.power_state() == pm::kD0);
  wr(f, reg::kCommand, 2, command::kMemorySpace);
  wr(f, 0x18, 4, 0xe0004000);
  wr(f, uint16_t(p + pm::kPmcsr), 2, pm::kD3hot);
  CHECK(f.power_state() == pm::kD3hot && (rd(f, uint16_t(p + pm::kPmcsr), 2) & pm::kNoSoftReset) == 0);
  // No_Soft_Reset clear: D3hot -> D0 resets the function's registers.
  wr(f, uint16_t(p + pm::kPmcsr), 2, pm::kD0);
  CHECK(f.power_state() == pm::kD0 && rd(f, reg::kCommand, 2) == 0 && rd(f, 0x18, 4) == 0);
}

void test_validation_errors() {
  auto expect = [](FunctionSpec s, const char* field) {
    try {
      compile(s);
      std::fprintf(stderr, "compile accepted a spec with a bad %s\n", field);
      ++mlx5tlp_test::failures();
    } catch (const mlx5tlp::Error& e) {
      if (e.error_number() != EINVAL || e.kind() != ErrorKind::invalid_argument ||
          std::strstr(e.what(), field) == nullptr) {
        std::fprintf(stderr, "expected %s in: %s\n", field, e.what());
        ++mlx5tlp_test::failures();
      }
    }
  };
  FunctionSpec s = spec();
  s.bars[1].size = 100;
  expect(s, "bars[1].size");
  s = spec();
  s.bars[1].size = 64;  // below the PCIe 128-byte minimum
  expect(s, "bars[1].size");
  s = spec();
  s.bars.push_back({5, BarKind::mem64, 4096, false});
  expect(s, "bars[3].index");
  s = spec();
  s.bars.push_back({1, BarKind::mem32, 4096, false});  // upper half of BAR0
  expect(s, "bars[3].index");
  s = spec();
  s.bars[1].prefetchable = true;
  expect(s, "bars[1].prefetchable");
  s = spec();
  s.bars[2].size = 512;
  expect(s, "bars[2].size");
  s = spec();
  s.msix.vectors = 2048;  // 32 KiB table in a 16 KiB BAR
  expect(s, "msix.table_bar");
  s = spec();
  s.msix.table_bar = 3;  // I/O BAR
  expect(s, "msix.table_bar");
  s = spec();
  s.msix.pba_offset = 0x100;  // inside the table
  expect(s, "msix.pba_offset");
  s = spec();
  s.msix.table_offset = 4;
  expect(s, "msix.table_offset");
  s = spec();
  s.msix.offset = 0x42;
  expect(s, "msix.offset");
  s = spec();
  s.vendor_caps[0].offset = 0x40;  // where the PCIe capability goes
  s.pcie.offset = 0x40;
  expect(s, "vendor_caps[0].offset");
  s = spec();
  s.aer.offset = 0x200;  // the extended list must start at 0x100
  s.serial_number.offset = 0x300;
  s.vendor_ext_caps[0].offset = 0x400;
  expect(s, "extended capabilities");
  s = spec();
  s.expansion_rom.size = 1024;
  expect(s, "expansion_rom.size");
  s = spec();
  s.pcie.max_payload_supported = 8192;
  expect(s, "pcie.max_payload_supported");
  s = spec();
  s.vendor_caps[0].writable = {{8, 4}};
  expect(s, "vendor_caps[0].writable[0]");
  s = spec();
  s.identity.vendor_id = 0xffff;
  expect(s, "identity.vendor_id");
}

// Function::log_error directly (PCIe Base 6.x §6.2.5 Figure 6-2, §6.2.4.3, §6.2.4.2, §7.8.4);
// the engine's use of it, through TLPs: tests/test_engine_error_logging.py.
void test_error_logging() {
  Function f(compile(spec()), nullptr);
  const FunctionLayout& L = f.layout();
  auto A = [&](uint16_t r) { return uint16_t(L.aer + r); };
  const auto devsta = uint16_t(L.pcie + pcie::kDevSta), devctl = uint16_t(L.pcie + pcie::kDevCtl);
  auto fep = [&] { return rd(f, A(aer::kCapControl), 4) & aer::kFirstErrorPointerMask; };
  auto hlog = [&](unsigned dw) { return rd(f, uint16_t(A(aer::kHeaderLog) + 4 * dw), 4); };
  // A 4-DW MRd header (Fmt 001b), address 1_2345_6780h.
  const uint8_t mrd[16] = {0x20, 0, 0, 1, 0x01, 0x00, 0x05, 0x0f, 0, 0, 0, 0x01, 0x23, 0x45, 0x67, 0x80};
  // §6.2.4.3: advisory (non-fatal UR with a Completion); ANFE masked at reset: "no further
  // processing" — no uncorrectable status bit, nothing recorded, no Message.
  CHECK(f.log_error(RxError::unsupported_request, true, mrd, 16) == ErrorMessage::none);
  CHECK(rd(f, A(aer::kCorStatus), 4) == aer::kCorAdvisoryNonFatal);
  CHECK(rd(f, A(aer::kUncorStatus), 4) == 0 && fep() == 0);
  CHECK((rd(f, devsta, 2) & 0xf) == (pcie::kDevStaCed | pcie::kDevStaUrd));
  wr(f, A(aer::kCorMask), 4, 0);
  wr(f, devctl, 2, rd(f, devctl, 2) | pcie::kDevCtlCere | pcie::kDevCtlUrre);
  CHECK(f.log_error(RxError::unsupported_request, true, mrd, 16) == ErrorMessage::err_cor);
  CHECK(rd(f, A(aer::kUncorStatus), 4) == aer::kUncUnsupportedRequest && fep() == 20);
  // §7.8.4.8: header byte 0 in bits 31:24 of the first DW.
  CHECK(hlog(0) == 0x20000001u && hlog(1) == 0x0100050fu && hlog(2) == 0x00000001u &&
        hlog(3) == 0x23456780u);
  // The log is in use (§6.2.4.2): a second error sets its bit only. Malformed is fatal by
  // default; with neither Fatal Reporting Enable nor SERR#, no Message.
  CHECK(f.log_error(RxError::malformed_tlp, false, mrd, 6) == ErrorMessage::none);
  CHECK(rd(f, A(aer::kUncorStatus), 4) == (aer::kUncUnsupportedRequest | aer::kUncMalformedTlp));
  CHECK(fep() == 20 && hlog(3) == 0x23456780u);
  CHECK((rd(f, devsta, 2) & pcie::kDevStaFed) != 0);
  // Clearing the pointed-to bit moves the pointer to bit 0 (Implementation Note "First Error
  // Pointer Register Being Valid"); a truncated Malformed TLP is recorded as far as it goes.
  wr(f, A(aer::kUncorStatus), 4, aer::kUncUnsupportedRequest | aer::kUncMalformedTlp);
  CHECK(rd(f, A(aer::kUncorStatus), 4) == 0 && fep() == 0);
  wr(f, reg::kCommand, 2, rd(f, reg::kCommand, 2) | command::kSerrEnable);
  CHECK(f.log_error(RxError::malformed_tlp, false, mrd, 6) == ErrorMessage::err_fatal);
  CHECK(fep() == 18 && hlog(0) == 0x20000001u && hlog(1) == 0x01000000u && hlog(2) == 0 && hlog(3) == 0);
  // Bad input: a value outside RxError changes nothing; no TLP bytes: a zero header.
  std::vector<uint8_t> before(f.config().bytes(), f.config().bytes() + kConfigSize);
  CHECK(f.log_error(RxError(99), true, mrd, 16) == ErrorMessage::none);
  CHECK(std::memcmp(before.data(), f.config().bytes(), kConfigSize) == 0);
  wr(f, A(aer::kUncorStatus), 4, aer::kUncMalformedTlp);
  CHECK(f.log_error(RxError::poisoned_tlp, false, nullptr, 0) == ErrorMessage::err_nonfatal);
  CHECK(fep() == 12 && hlog(0) == 0 && (rd(f, reg::kStatus, 2) & status::kDetectedParityError) != 0);
}

}  // namespace

int main() {
  test_header_and_command();
  test_status_rw1c_and_byte_enables();
  test_bar_sizing();
  test_decode();
  test_capability_lists();
  test_pcie_rules();
  test_completions_follow_programmed_mps_and_rcb();
  test_power_management();
  test_validation_errors();
  test_error_logging();
  return mlx5tlp_test::finish("test_config_space");
}
