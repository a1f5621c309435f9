/**
 * The Linux system calls the file driver needs and Node does not offer, through the `koffi` FFI:
 * `lseek(SEEK_DATA/SEEK_HOLE)` (sparse maps), `fallocate` (punch holes, zero ranges),
 * `fcntl(F_OFD_GETLK/F_OFD_SETLK)` (QEMU-compatible image locks) and `copy_file_range` (copy offload).
 * Constants from Linux's uapi headers (`<linux/fs.h>`, `<linux/falloc.h>`, `<asm-generic/fcntl.h>`).
 */
import { createRequire } from "node:module";

/** `lseek` whence: next data at or after the offset. */
export const SEEK_DATA = 3;
/** `lseek` whence: next hole at or after the offset. */
export const SEEK_HOLE = 4;
/** `fallocate` mode: do not change the file size. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
/** `fallocate` mode: deallocate the range (must be combined with KEEP_SIZE). */
export const FALLOC_FL_PUNCH_HOLE = 0x02;
/** `fallocate` mode: make the range read as zeroes (may extend the file). */
export const FALLOC_FL_ZERO_RANGE = 0x10;
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
/** Lock types of `struct flock`. */
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
/** Linux errno values the driver tells apart. */
export const ENXIO = 6;
export const EINTR = 4;
export const EAGAIN = 11;
export const EACCES = 13;
export const EINVAL = 22;
/** `madvise` advice: back the range with transparent huge pages where the kernel can. */
export const MADV_HUGEPAGE = 14;
export const EXDEV = 18;
export const EBADF = 9;
export const ENOSPC = 28;
export const ENOSYS = 38;
export const EOPNOTSUPP = 95;

/** The system calls, each returning the C result and (when it failed) errno. */
export interface FileSyscalls {
  /** `lseek(fd, offset, whence)`: the new position, or `-errno` (`-ENXIO` past the last data). */
  lseek(fd: number, offset: number, whence: number): number;
  /** `fallocate(fd, mode, offset, len)` off the event loop: 0 or `-errno`. */
  fallocate(fd: number, mode: number, offset: number, len: number): Promise<number>;
  /**
   * `copy_file_range(fdIn, &offIn, fdOut, &offOut, len, 0)` off the event loop: bytes copied (0 at the end
   * of the input file; may be short), or `-errno` (`-EXDEV`, `-EOPNOTSUPP`, `-ENOSYS`, `-EINVAL` when the
   * kernel or file systems cannot copy between these files). Optional: absent, copy offload is off.
   */
  copyFileRange?(fdIn: number, offIn: number, fdOut: number, offOut: number, len: number): Promise<number>;
  /** The memory address of a buffer's first byte (to align I/O buffers). Optional. */
  addressOf?(buf: Uint8Array): number;
  /**
   * `madvise(buf, buf.length, MADV_HUGEPAGE)` on a buffer whose first byte is page-aligned: 0 or `-errno`.
   * Optional.
   */
  adviseHugePages?(buf: Uint8Array): number;
  /** `fcntl(fd, F_OFD_SETLK, {type, SEEK_SET, start, len})`: 0 or `-errno`. */
  ofdSetLock(fd: number, type: number, start: number, len: number): number;
  /**
   * `fcntl(fd, F_OFD_GETLK, {type, SEEK_SET, start, len})`: the type of a conflicting lock another open
   * file description holds (`F_RDLCK`/`F_WRLCK`), `F_UNLCK` when none, or `-errno`.
   */
  ofdGetLock(fd: number, type: number, start: number, len: number): number;
}

interface Flock {
  l_type: number;
  l_whence: number;
  l_start: number;
  l_len: number;
  l_pid: number;
}

type Fn = ((...args: unknown[]) => unknown) & {
  async: (...args: unknown[]) => void;
};

/**
 * `copy_file_range` on the thread pool. The offsets are passed by value (the kernel's copies, not the
 * file positions, move), and errno of a failed call on a worker thread is not visible here: the failed
 * call is repeated synchronously to learn why (the copy is idempotent: it writes the same bytes again).
 */
function copyRangeCall(
  fn: Fn,
  errno: () => number,
): (fdIn: number, offIn: number, fdOut: number, offOut: number, len: number) => Promise<number> {
  return (fdIn, offIn, fdOut, offOut, len) =>
    new Promise((resolve) => {
      fn.async(fdIn, [offIn], fdOut, [offOut], len, 0, (err: unknown, r: unknown) => {
        const n = Number(r);
        if ((err === null || err === undefined) && n >= 0) return resolve(n);
        for (;;) {
          const again = Number(fn(fdIn, [offIn], fdOut, [offOut], len, 0));
          if (again >= 0) return resolve(again);
          const e = errno();
          if (e !== EINTR) return resolve(-e);
        }
      });
    });
}

let cached: FileSyscalls | null | undefined;
let loadError: unknown;

/** Why {@link loadSyscalls} returned `null` (for the one log line). */
export function syscallLoadError(): unknown {
  return loadError;
}

/**
 * Loads the system calls once. Returns `null` when koffi or libc cannot be loaded (another OS, no
 * prebuilt binary); the file driver then falls back feature by feature.
 */
export function loadSyscalls(): FileSyscalls | null {
  if (cached !== undefined) return cached;
  try {
    if (process.platform !== "linux") throw new Error(`unsupported platform ${process.platform}`);
    const require = createRequire(import.meta.url);
    const koffi = require("koffi") as typeof import("koffi");
    const libc = koffi.load("libc.so.6");
    const lseek = libc.func("int64_t lseek(int fd, int64_t off, int whence)") as Fn;
    const fallocate = libc.func("int fallocate(int fd, int mode, int64_t off, int64_t len)") as Fn;
    // glibc ≥ 2.27 has the wrapper; an older one leaves copy offload off.
    let copyFileRange: Fn | undefined;
    try {
      copyFileRange = libc.func(
        "int64_t copy_file_range(int fd_in, _Inout_ int64_t *off_in, int fd_out, _Inout_ int64_t *off_out, size_t len, unsigned int flags)",
      ) as Fn;
    } catch {
      copyFileRange = undefined;
    }
    const madvise = libc.func("int madvise(void *addr, size_t len, int advice)") as Fn;
    // Anonymous struct type: a named one could clash if a second copy of this module loads.
    const flock = koffi.struct({
      l_type: "short",
      l_whence: "short",
      l_start: "int64_t",
      l_len: "int64_t",
      l_pid: "int",
    });
    const fcntl = libc.func("fcntl", "int", ["int", "int", koffi.inout(koffi.pointer(flock))]) as Fn;
    const errno = (): number => koffi.errno();
    const lock = (fd: number, cmd: number, type: number, start: number, len: number): Flock | number => {
      const lk: Flock = { l_type: type, l_whence: 0, l_start: start, l_len: len, l_pid: 0 };
      for (;;) {
        const r = fcntl(fd, cmd, lk) as number;
        if (r === 0) return lk;
        const e = errno();
        if (e !== EINTR) return -e;
      }
    };
    cached = {
      lseek(fd, offset, whence) {
        const r = Number(lseek(fd, offset, whence));
        return r < 0 ? -errno() : r;
      },
      fallocate(fd, mode, offset, len) {
        return new Promise((resolve) => {
          fallocate.async(fd, mode, offset, len, (err: unknown, r: number) => {
            if (err === null || err === undefined) {
              if (r === 0) return resolve(0);
            }
            // errno of a call on a worker thread is not visible here: repeat the (idempotent) call
            // synchronously to learn why it failed.
            for (;;) {
              const again = fallocate(fd, mode, offset, len) as number;
              if (again === 0) return resolve(0);
              const e = errno();
              if (e !== EINTR) return resolve(-e);
            }
          });
        });
      },
      ...(copyFileRange === undefined ? {} : { copyFileRange: copyRangeCall(copyFileRange, errno) }),
      addressOf: (buf) => Number(koffi.address(buf)),
      adviseHugePages(buf) {
        const r = madvise(buf, buf.length, MADV_HUGEPAGE) as number;
        return r === 0 ? 0 : -errno();
      },
      ofdSetLock(fd, type, start, len) {
        const r = lock(fd, F_OFD_SETLK, type, start, len);
        return typeof r === "number" ? r : 0;
      },
      ofdGetLock(fd, type, start, len) {
        const r = lock(fd, F_OFD_GETLK, type, start, len);
        return typeof r === "number" ? r : r.l_type;
      },
    };
  } catch (e) {
    loadError = e;
    cached = null;
  }
  return cached;
}
