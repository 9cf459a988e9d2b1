"""Fuzz target: export envelopes (python/mlx5tlp/envelope.py) and the import path on the
software device (``import_blob``, ``Context.import_var`` / ``import_umem`` / ``import_devx_obj``).

Input: one flag byte, then the envelope. Flag bit 0 recomputes the CRC where the header puts it
and bit 1 re-signs a keyed envelope with the fuzz key, so that mutations reach every check after
the CRC and the HMAC, and the import itself with forged raw exports (a CRC-valid forgery is what
a hostile peer sends). Properties, for any input:

* ``describe``, ``peek_kind``, ``peek_device`` and ``open_envelope`` raise nothing but
  ``ExportFormatError``;
* the imports raise nothing but ``mlx5tlp.Error`` subclasses (no ``TypeError``, ``ValueError``,
  ``KeyError``, ``struct.error``, ``RuntimeError``, no crash of the extension);
* a VAR import that succeeds grants a live VAR's page: its mapping offset is that of a VAR the
  harness exported. UMEM and DEVX-object imports are checked only at first use
  (docs/export-format.md): their successes are counted, not judged. This fuzzer showed that a
  CRC-valid forgery with a live VAR's offset but any handle, page id or length imports
  (docs/fuzzing.md, "Limits found").

Runs under atheris (libFuzzer's engine, coverage of the Python code) when it is installed, else
with a built-in mutator over the seeds (same properties; "cov" then counts distinct outcomes).
The device is the one tests/fuzz/make_corpus.py exported the seeds from (same name and config,
same allocation order), so the seeds import successfully.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

# A fixed private device directory, emptied at every start: libFuzzer ends the process with
# exit(), so no cleanup at exit can be relied on.
_SIM_DIR = Path(__file__).resolve().parents[2] / "build" / "fuzz" / "sim-envelope"
shutil.rmtree(_SIM_DIR, ignore_errors=True)
_SIM_DIR.mkdir(mode=0o700, parents=True)
os.environ["MLX5TLP_BACKEND"] = "sim"
os.environ["MLX5TLP_SIM_DIR"] = str(_SIM_DIR)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpus  # noqa: E402

try:
    import atheris  # type: ignore[import-not-found]
except ImportError:
    atheris = None
import mlx5tlp  # noqa: E402
from mlx5tlp import envelope, sim  # noqa: E402
from mlx5tlp._object import import_blob  # noqa: E402

KEY = make_corpus.FUZZ_KEY
_HEADER = struct.Struct("<8sHHIIHHHBBIQ")


def _fields(kind: int, raw: bytes) -> tuple[Any, ...]:
    """What identifies the object a raw export names (padding excluded)."""
    if kind == envelope.Kind.VAR and len(raw) >= 24:
        handle, page_id, length = struct.unpack_from("<III", raw, 0)
        (mmap_off,) = struct.unpack_from("<q", raw, 16)
        return ("VAR", handle, page_id, length, mmap_off)
    if kind == envelope.Kind.UMEM and len(raw) >= 8:
        return ("UMEM", *struct.unpack_from("<II", raw, 0))
    return ("other", raw)


class Harness:
    def __init__(self) -> None:
        sim.create_device("fuzzseed", **make_corpus.SIM_STATE_CONFIG)  # type: ignore[arg-type]
        self.ctx = mlx5tlp.open_device("fuzzseed", backend="sim")
        self.buf = make_corpus.mmap_buffer(1 << 16)
        # The seed script's allocation order: the same handles, pages and ids.
        tlp_vars = [self.ctx.alloc_var(tlp=True) for _ in range(2)]
        virtio = self.ctx.alloc_var()
        umem = self.ctx.reg_umem(self.buf)
        self.live = [*tlp_vars, virtio, umem]
        self.live_fields = set()
        for o in self.live:
            env = envelope.open_envelope(
                o.export(),
                expected_kind=None,
                raw_size=self.ctx.export_size,
                device=self.ctx.identity,
            )
            self.live_fields.add(_fields(env.kind, env.raw))
        self.outcomes: set[str] = set()

    def one(self, data: bytes) -> None:
        if not data:
            return
        flags, blob = data[0], fixup(data[0], data[1:])
        key = KEY if len(blob) > 36 and blob[36] & envelope.OPT_KEYED else None
        for call in (
            envelope.describe,
            envelope.peek_kind,
            envelope.peek_device,
            lambda b: envelope.open_envelope(
                b,
                expected_kind=None,
                raw_size=self.ctx.export_size,
                device=self.ctx.identity,
                key=key,
            ),
        ):
            try:
                call(blob)
                self.outcomes.add("ok")
            except envelope.ExportFormatError as exc:
                self.outcomes.add(_shape(exc))
        importers = (
            lambda b: import_blob(self.ctx, b, key=key),
            self.ctx.import_var,
            self.ctx.import_umem,
            self.ctx.import_devx_obj,
        )
        for imp in importers[: 1 + (flags >> 2) % 4]:
            try:
                obj = imp(blob) if imp is importers[0] else imp(blob, key=key)
            except mlx5tlp.Error as exc:
                self.outcomes.add(_shape(exc))
                continue
            try:
                env = envelope.open_envelope(
                    blob,
                    expected_kind=None,
                    raw_size=self.ctx.export_size,
                    device=self.ctx.identity,
                    key=key,
                )
                got = _fields(env.kind, env.raw)
                # docs/export-format.md: a VAR import is checked with the kernel by a mapping
                # probe, and every import by the software device's identity check, so what
                # imports is exactly a live object: a VAR's handle, page id, length and mapping
                # offset, a UMEM's handle and id.
                if got[0] in ("VAR", "UMEM") and got not in self.live_fields:
                    raise AssertionError(
                        f"forged object imported: {got} is no live object "
                        f"(live: {sorted(self.live_fields)})"
                    )
                self.outcomes.add(f"imported {got[0]}")
            finally:
                obj.close()  # an import's close() is unimport: the exporter's object stays


def _shape(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {re.sub(r'[0-9a-fx]{2,}', 'N', str(exc))[:60]}"


def fixup(flags: int, blob: bytes) -> bytes:
    """Recompute the CRC (flag bit 0) and the HMAC (bit 1) where the header says they are."""
    if len(blob) < _HEADER.size or not flags & 3:
        return blob
    f = _HEADER.unpack_from(blob, 0)
    crc_at = _HEADER.size + f[5] + f[6] + f[7] + f[4]
    if crc_at + 4 > len(blob):
        return blob
    b = bytearray(blob)
    if flags & 1:
        struct.pack_into("<I", b, crc_at, zlib.crc32(b[:crc_at]) & 0xFFFFFFFF)
    if flags & 2 and f[8] & envelope.OPT_KEYED and crc_at + 4 + 32 <= len(b):
        import hashlib
        import hmac

        b[crc_at + 4 : crc_at + 36] = hmac.new(KEY, bytes(b[: crc_at + 4]), hashlib.sha256).digest()
    return bytes(b)


def _builtin(h: Harness, argv: list[str]) -> None:
    """A small mutation fuzzer with libFuzzer's command line (what run.py passes)."""
    opts = {m.group(1): int(m.group(2)) for a in argv if (m := re.fullmatch(r"-(\w+)=(\d+)", a))}
    paths = [Path(a) for a in argv if not a.startswith("-")]
    files = [p for a in paths for p in (sorted(a.iterdir()) if a.is_dir() else [a]) if p.is_file()]
    seeds = [p.read_bytes() for p in files]
    if all(not a.is_dir() for a in paths) and paths:  # replay mode: files only
        for s in seeds:
            h.one(s)
        print(f"Done {len(seeds)} runs in 0 second(s)")
        return
    rng = random.Random(opts.get("seed", 0))
    deadline = time.monotonic() + opts.get("max_total_time", 10)
    runs, limit, max_len = 0, opts.get("runs", -1), opts.get("max_len", 2048)
    pool = seeds or [b"\x01"]
    while time.monotonic() < deadline and runs != limit:
        d = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and d:
                d[rng.randrange(len(d))] = rng.randrange(256)
            elif op == 1 and d:
                del d[rng.randrange(len(d))]
            elif op == 2:
                d.insert(rng.randrange(len(d) + 1), rng.randrange(256))
            elif d:
                d[0] = rng.randrange(256)
        before = len(h.outcomes)
        h.one(bytes(d[:max_len]))
        if len(h.outcomes) > before:
            pool.append(bytes(d[:max_len]))
        runs += 1
    print(f"#{runs}\tDONE   cov: {len(h.outcomes)} ft: {len(h.outcomes)} corp: {len(pool)}")
    print(f"Done {runs} runs in {opts.get('max_total_time', 10)} second(s)")


def _instrument_package() -> None:
    """Coverage of the package's own Python code (instrument_all() would also instrument the
    standard library: ~25 s at every start; instrument_imports() misses the editable install's
    import hook)."""
    for name, mod in list(sys.modules.items()):
        if name != "mlx5tlp" and not name.startswith("mlx5tlp."):
            continue
        for obj in list(vars(mod).values()):
            members = vars(obj).values() if inspect.isclass(obj) else [obj]
            for f in members:
                f = getattr(f, "__func__", f)
                if inspect.isfunction(f) and f.__module__ == name:
                    atheris.instrument_func(f)


def main() -> None:
    h = Harness()
    if atheris is None:
        _builtin(h, sys.argv[1:])
        return
    _instrument_package()
    atheris.Setup(sys.argv, h.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
