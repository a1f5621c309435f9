/**
 * The `file` protocol driver (QEMU's file-posix for regular files): positional I/O on a file handle,
 * holes punched with `fallocate`, sparse block status from `lseek(SEEK_DATA/SEEK_HOLE)`, truncation with
 * preallocation, QEMU-compatible OFD image locks driven by the graph's permissions, and copy offload
 * between two files with `copy_file_range`.
 *
 * Without the FFI (koffi not loadable) every feature falls back on its own, logged once: block status
 * reports everything as data, discard writes zeroes, zero writes write zero buffers, no image locks, no
 * copy offload (the copy engine then reads and writes).
 */
import { constants as fsConstants, read as fsRead, write as fsWrite, readFileSync } from "node:fs";
import { type FileHandle, open, stat } from "node:fs/promises";
import {
  BlkError,
  type BlkErrorCode,
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type CopyRangeDest,
  type CopyRangeSource,
  type FlushFlags,
  type OpenContext,
  PERM,
  PERM_ALL,
  type TruncateFlags,
  type ZeroFlags,
} from "@blk/core";
import {
  expectBool,
  expectEnum,
  expectInt,
  expectObject,
  expectString,
  rejectUnexpected,
} from "../registry/options.ts";
import { ImageLocks } from "./locks.ts";
import {
  EBADF,
  EINTR,
  EINVAL,
  ENOSYS,
  ENXIO,
  EOPNOTSUPP,
  EXDEV,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  type FileSyscalls,
  loadSyscalls,
  SEEK_DATA,
  SEEK_HOLE,
  syscallLoadError,
} from "./sys.ts";

export { ImageLockError, LOCK_BASE_PERM, LOCK_BASE_SHARED, lockBytes } from "./locks.ts";
export { type FileSyscalls, loadSyscalls } from "./sys.ts";

/** QEMU's `PreallocMode`. */
export type PreallocMode = "off" | "metadata" | "falloc" | "full";

/** `BlockdevOptionsFile`: the `file` driver's blockdev options (QEMU's names). */
export interface FileOptions {
  /** Path of the image file. */
  filename: string;
  /** Image locking: `auto` (default: lock when OFD locks are available), `on`, `off`. */
  locking?: "auto" | "on" | "off";
  /** Accepted for compatibility; blk always uses Node's thread pool. */
  aio?: "threads" | "native" | "io_uring";
  /** Accepted for compatibility; ignored. */
  "aio-max-batch"?: number;
  /** Accepted for compatibility; ignored. */
  "drop-cache"?: boolean;
  /** Accepted for compatibility; ignored. */
  "x-check-cache-dropped"?: boolean;
  /** Persistent-reservation manager: not supported (ENOTSUP when given). */
  "pr-manager"?: string;
}

/** `BlockdevCreateOptionsFile`: what `create` takes (QEMU's names). */
export interface FileCreateOptions extends FileOptions {
  /** Size in bytes. */
  size: number;
  /** Preallocation of the data (default `off`; `metadata` is refused as QEMU does). */
  preallocation?: PreallocMode;
  /** Accepted for compatibility (btrfs NOCOW); ignored. */
  nocow?: boolean;
  /** Accepted for compatibility; ignored. */
  "extent-size-hint"?: number;
}

/** Extra context a caller may pass to `open` (common node options core does not forward yet). */
export interface FileOpenExtras {
  /** `cache.direct`: O_DIRECT is not supported (ENOTSUP). */
  cacheDirect?: boolean;
}

const SECTOR = 512;
/** QEMU allocates this much at offset 0 when a file grows from empty (block-size probing). */
const FIRST_BLOCK = 4096;
const ZERO_CHUNK = 1 << 20;

let warned = false;
function warnNoSyscalls(): void {
  if (warned) return;
  warned = true;
  const why = syscallLoadError();
  process.emitWarning(
    `blk file driver: koffi could not load (${why instanceof Error ? why.message : String(why)}); ` +
      "sparse maps, hole punching, zero ranges and image locks are disabled",
    { code: "BLK_FILE_NO_SYSCALLS" },
  );
}

const STRERROR: Record<string, [BlkErrorCode, string]> = {
  ENOENT: ["ENOENT", "No such file or directory"],
  EACCES: ["EACCES", "Permission denied"],
  EPERM: ["EPERM", "Operation not permitted"],
  EROFS: ["EROFS", "Read-only file system"],
  EISDIR: ["EINVAL", "Is a directory"],
  ENOSPC: ["ENOSPC", "No space left on device"],
  EFBIG: ["EFBIG", "File too large"],
  EIO: ["EIO", "Input/output error"],
  EEXIST: ["EEXIST", "File exists"],
  EBUSY: ["EBUSY", "Device or resource busy"],
  EAGAIN: ["EAGAIN", "Resource temporarily unavailable"],
  EINVAL: ["EINVAL", "Invalid argument"],
  ENOTDIR: ["ENOENT", "Not a directory"],
  ENAMETOOLONG: ["EINVAL", "File name too long"],
  ELOOP: ["EINVAL", "Too many levels of symbolic links"],
  ENXIO: ["ENOENT", "No such device or address"],
  ENODEV: ["ENOENT", "No such device"],
  EMFILE: ["EIO", "Too many open files"],
  ENFILE: ["EIO", "Too many open files in system"],
  ETXTBSY: ["EBUSY", "Text file busy"],
  EDQUOT: ["ENOSPC", "Disk quota exceeded"],
  ENOMEM: ["EIO", "Cannot allocate memory"],
};

/** Maps a Node fs error to a BlkError (`prefix: strerror`). */
function fsError(e: unknown, prefix?: string, offset?: number): BlkError {
  const code = (e as { code?: unknown } | null)?.code;
  const known = typeof code === "string" ? STRERROR[code] : undefined;
  const [c, text] = known ?? ["EIO", e instanceof Error ? e.message : String(e)];
  const msg = prefix === undefined ? text : `${prefix}: ${text}`;
  return new BlkError(c, msg, offset === undefined ? { cause: e } : { cause: e, offset });
}

function errnoError(neg: number, what: string, offset?: number): BlkError {
  const e = -neg;
  const code: BlkErrorCode =
    e === 28
      ? "ENOSPC"
      : e === 27
        ? "EFBIG"
        : e === EOPNOTSUPP || e === ENOSYS
          ? "ENOTSUP"
          : e === 22
            ? "EINVAL"
            : "EIO";
  return new BlkError(code, `${what} failed: errno ${e}`, offset === undefined ? {} : { offset });
}

const roundUp = (n: number, a: number): number => Math.ceil(n / a) * a;

/** Options of {@link makeFileDriver}. */
export interface FileDriverConfig {
  /** The system calls to use; `null` forces the no-FFI fallbacks (tests); default: koffi, when it loads. */
  syscalls?: FileSyscalls | null;
}

/**
 * The open state of a `file` node. Public for tests and tools; normally reached through a
 * {@link BlockNode}.
 */
export class FileState extends BlockDriverBase {
  readonly filename: string;
  #fh: FileHandle;
  readonly #sys: FileSyscalls | null;
  #locks: ImageLocks | undefined;
  #readOnly: boolean;
  /** Real file size in bytes (the node length is this rounded up to 512, as QEMU reports it). */
  #size: number;
  #canPunch = true;
  #canZeroRange = true;
  #canSeek = true;
  #canCopyRange = true;

  /** @internal Use {@link fileDriver}.open. */
  constructor(init: {
    fh: FileHandle;
    filename: string;
    size: number;
    readOnly: boolean;
    sys: FileSyscalls | null;
    locking: boolean;
  }) {
    super({ requestAlignment: 1, maxTransfer: 0 });
    this.#fh = init.fh;
    this.filename = init.filename;
    this.#size = init.size;
    this.#readOnly = init.readOnly;
    this.#sys = init.sys;
    this.#locks =
      init.sys !== null && init.locking ? new ImageLocks(init.sys, init.fh.fd, init.filename) : undefined;
  }

  /** The file descriptor (for tests; do not close it). */
  get fd(): number {
    return this.#fh.fd;
  }

  /** True when the file was opened read-only (also after an `auto-read-only` fallback). */
  get readOnly(): boolean {
    return this.#readOnly;
  }

  /** True when image locks are applied (locking not off and the FFI available). */
  get locking(): boolean {
    return this.#locks !== undefined;
  }

  /** The real size of the file in bytes (the node length is rounded up to 512 bytes). */
  get fileSize(): number {
    return this.#size;
  }

  // ---- image locks (graph permission hooks) -------------------------------------------------------------

  checkPerm(perm: number, shared: number): void {
    this.#locks?.check(perm, shared);
  }
  setPerm(perm: number, shared: number): void {
    this.#locks?.commit(perm, shared);
  }
  abortPerm(): void {
    this.#locks?.abort();
  }

  /**
   * Switches the file between read-only and read-write (`blockdev-reopen`, a commit job making its base
   * writable): opens a new descriptor, moves the image locks over to it, then closes the old one. The
   * node drains around this.
   * @throws {BlkError} EACCES/EROFS `Could not reopen file: <reason>`; nothing changes then
   */
  async reopen(options: { readOnly: boolean }): Promise<void> {
    if (options.readOnly === this.#readOnly) return;
    let fh: FileHandle;
    try {
      fh = await open(this.filename, options.readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR);
    } catch (e) {
      throw fsError(e, "Could not reopen file");
    }
    const old = this.#fh;
    const held = this.#locks;
    let locks: ImageLocks | undefined;
    if (held !== undefined && this.#sys !== null) {
      // Our own old descriptor still holds the same bytes: take them without a conflict test.
      locks = new ImageLocks(this.#sys, fh.fd, this.filename);
      locks.commit(held.perm, held.shared);
    }
    this.#fh = fh;
    this.#locks = locks;
    this.#readOnly = options.readOnly;
    await old.close();
  }

  // ---- I/O ------------------------------------------------------------------------------------------------

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = await pread(this.#fh.fd, buf, done, buf.length - done, offset + done);
      } catch (e) {
        throw fsError(e, "Could not read image", offset + done);
      }
      if (n === 0) {
        // End of file: the rest reads as zeroes.
        buf.fill(0, done);
        return;
      }
      done += n;
    }
  }

  protected override async _write(offset: number, data: Uint8Array): Promise<void> {
    this.#checkWritable();
    let done = 0;
    while (done < data.length) {
      try {
        done += await pwrite(this.#fh.fd, data, done, data.length - done, offset + done);
      } catch (e) {
        throw fsError(e, "Could not write image", offset + done);
      }
    }
    if (offset + data.length > this.#size) this.#size = offset + data.length;
  }

  #checkWritable(): void {
    if (this.#readOnly) throw new BlkError("EPERM", `Image '${this.filename}' is opened read-only`);
  }

  async #writeZeroBuffer(offset: number, bytes: number): Promise<void> {
    const zero = new Uint8Array(Math.min(bytes, ZERO_CHUNK));
    for (let done = 0; done < bytes; done += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, bytes - done);
      await this._write(offset + done, n === zero.length ? zero : zero.subarray(0, n));
    }
  }

  /** Punches a hole inside the file (KEEP_SIZE); false when the file system cannot. */
  async #punch(offset: number, bytes: number): Promise<boolean> {
    const sys = this.#sys;
    if (sys === null || !this.#canPunch || bytes === 0) return false;
    const r = await sys.fallocate(this.#fh.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
    if (r === 0) return true;
    if (r === -EOPNOTSUPP || r === -ENOSYS) {
      this.#canPunch = false;
      return false;
    }
    throw errnoError(r, "Punching a hole", offset);
  }

  /** `FALLOC_FL_ZERO_RANGE` (may extend the file); false when the file system cannot. */
  async #zeroRange(offset: number, bytes: number): Promise<boolean> {
    const sys = this.#sys;
    if (sys === null || !this.#canZeroRange || bytes === 0) return false;
    const r = await sys.fallocate(this.#fh.fd, FALLOC_FL_ZERO_RANGE, offset, bytes);
    if (r === 0) return true;
    if (r === -EOPNOTSUPP || r === -ENOSYS || r === -EINVAL) {
      this.#canZeroRange = false;
      return false;
    }
    throw errnoError(r, "Zeroing a range", offset);
  }

  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    this.#checkWritable();
    if (bytes === 0) return;
    const end = offset + bytes;
    const inside = Math.max(0, Math.min(end, this.#size) - offset);
    if (inside > 0) {
      let ok = false;
      if (flags.mayUnmap === true) ok = await this.#punch(offset, inside);
      if (!ok) ok = await this.#zeroRange(offset, inside);
      if (!ok && (await this.#punch(offset, inside))) {
        // The hole reads as zeroes; allocate it again so a zero write does not deallocate (as QEMU).
        const sys = this.#sys;
        if (sys !== null) await sys.fallocate(this.#fh.fd, FALLOC_FL_KEEP_SIZE, offset, inside);
        ok = true;
      }
      if (!ok) {
        if (flags.noFallback === true) throw new BlkError("ENOTSUP", "Operation not supported", { offset });
        await this.#writeZeroBuffer(offset, inside);
      }
    }
    if (end > this.#size) {
      // Beyond the end of the file: growing it makes the new range a hole that reads as zeroes.
      try {
        await this.#fh.truncate(end);
      } catch (e) {
        throw fsError(e, "Could not extend image", offset);
      }
      this.#size = end;
    }
    if (flags.fua === true) await this._flush({ toDisk: true });
  }

  // ---- copy offload -------------------------------------------------------------------------------------

  /**
   * Copy offload, source side: the data lies in this file, so the target node stores it (down to its own
   * `file` state, which copies with `copy_file_range`).
   */
  copyRangeFrom(offset: number, bytes: number, dst: CopyRangeDest): Promise<void> {
    return this.request(() =>
      dst.node.copyRangeTo(
        { state: this, offset },
        dst.offset,
        bytes,
        dst.via === undefined ? {} : { via: dst.via },
      ),
    );
  }

  /**
   * Copy offload, target side: `copy_file_range` from a `file` source into this file (short copies are
   * looped over; where the source file ends, the rest of the range reads as zeroes and is written so).
   * @throws {BlkError} ENOTSUP `Copy offloading is not supported: …` when the source is no file, or the
   *   kernel or the file systems cannot copy between the two files (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL)
   */
  copyRangeTo(src: CopyRangeSource, offset: number, bytes: number): Promise<void> {
    return this.request(async () => {
      this.#checkWritable();
      const from = src.state;
      const sys = this.#sys;
      if (!(from instanceof FileState) || sys?.copyFileRange === undefined || !this.#canCopyRange) {
        throw new BlkError("ENOTSUP", "Copy offloading is not supported", { offset });
      }
      let done = 0;
      while (done < bytes) {
        const r = await sys.copyFileRange(
          from.fd,
          src.offset + done,
          this.#fh.fd,
          offset + done,
          bytes - done,
        );
        if (r > 0) {
          done += r;
          if (offset + done > this.#size) this.#size = offset + done;
          continue;
        }
        if (r === 0) {
          // End of the source file: the rest reads as zeroes (the node length is rounded up to 512).
          await this._writeZeroes(offset + done, bytes - done, {});
          return;
        }
        if (r === -EINTR) continue;
        if (r === -EXDEV || r === -EOPNOTSUPP || r === -ENOSYS || r === -EINVAL || r === -EBADF) {
          if (r === -ENOSYS) this.#canCopyRange = false;
          // Whatever was copied is rewritten by the caller's read and write.
          throw new BlkError("ENOTSUP", `Copy offloading is not supported: errno ${-r}`, { offset });
        }
        throw errnoError(r, "Copy offloading", offset + done);
      }
    });
  }

  protected override async _discard(offset: number, bytes: number): Promise<void> {
    this.#checkWritable();
    const inside = Math.max(0, Math.min(offset + bytes, this.#size) - offset);
    if (inside === 0) return;
    if (this.#sys === null) {
      // No FFI: keep discard's effect visible as zeroes.
      await this.#writeZeroBuffer(offset, inside);
      return;
    }
    // Discard is advisory: a file system without hole punching keeps the data.
    await this.#punch(offset, inside);
  }

  protected override async _flush(flags: FlushFlags): Promise<void> {
    if (!flags.toDisk || this.#readOnly) return;
    try {
      await this.#fh.datasync();
    } catch (e) {
      throw fsError(e, "Could not flush image");
    }
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    const end = offset + bytes;
    const size = this.#size;
    if (offset >= size) {
      // The tail up to the 512-byte rounded length, beyond the end of the file, reads as zeroes.
      return [{ offset, length: bytes, data: false, zero: true, allocated: true, hostOffset: offset }];
    }
    const limit = Math.min(end, size);
    const sys = this.#sys;
    if (sys === null || !this.#canSeek) {
      return [
        { offset, length: limit - offset, data: true, zero: false, allocated: true, hostOffset: offset },
      ];
    }
    const fd = this.#fh.fd;
    const data = sys.lseek(fd, offset, SEEK_DATA);
    if (data === -ENXIO) {
      // No data at or after offset: a hole up to the end of the file.
      return [
        { offset, length: limit - offset, data: false, zero: true, allocated: true, hostOffset: offset },
      ];
    }
    if (data < 0) {
      this.#canSeek = false;
      return [
        { offset, length: limit - offset, data: true, zero: false, allocated: true, hostOffset: offset },
      ];
    }
    if (data > offset) {
      const len = Math.min(data, limit) - offset;
      return [{ offset, length: len, data: false, zero: true, allocated: true, hostOffset: offset }];
    }
    const hole = sys.lseek(fd, offset, SEEK_HOLE);
    const dataEnd = hole < 0 ? limit : Math.min(Math.max(hole, offset + 1), limit);
    return [
      { offset, length: dataEnd - offset, data: true, zero: false, allocated: true, hostOffset: offset },
    ];
  }

  protected override async _getLength(): Promise<number> {
    return roundUp(this.#size, SECTOR);
  }

  protected override async _truncate(length: number, flags: TruncateFlags): Promise<void> {
    this.#checkWritable();
    await this.#resize(length, flags.preallocation ?? "off");
  }

  /** Resizes to exactly `length` bytes with QEMU file-posix's preallocation rules. */
  async #resize(length: number, prealloc: PreallocMode): Promise<void> {
    const current = this.#size;
    if (prealloc === "metadata") {
      throw new BlkError("ENOTSUP", "Unsupported preallocation mode: metadata");
    }
    if (prealloc !== "off" && length < current) {
      throw new BlkError("ENOTSUP", "Cannot use preallocation for shrinking files");
    }
    try {
      if (prealloc === "full" && length > current) {
        this.#size = current;
        await this.#writeZeroBuffer(current, length - current);
      } else if (prealloc === "falloc" && length > current) {
        const sys = this.#sys;
        let ok = false;
        if (sys !== null) {
          const r = await sys.fallocate(this.#fh.fd, 0, current, length - current);
          if (r === 0) ok = true;
          else if (r !== -EOPNOTSUPP && r !== -ENOSYS) throw errnoError(r, "Could not preallocate new data");
        }
        if (!ok) await this.#writeZeroBuffer(current, length - current);
      } else {
        await this.#fh.truncate(length);
      }
    } catch (e) {
      if (e instanceof BlkError) throw e;
      throw fsError(e, "Failed to resize the file");
    }
    this.#size = length;
    if (current === 0 && length > 0 && prealloc !== "full") {
      // As QEMU: allocate the first block of a file grown from empty so that its block size can be probed.
      const n = Math.min(FIRST_BLOCK, length);
      await this._write(0, new Uint8Array(n));
    }
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    return { zeroInit: true };
  }

  /** Bytes allocated on the host (`actual-size`: st_blocks × 512). */
  async allocatedSize(): Promise<number> {
    const st = await this.#fh.stat();
    return st.blocks * 512;
  }

  protected override async _close(): Promise<void> {
    await this.#fh.close();
  }
}

function checkOptions(options: FileOptions, cacheDirect: boolean): void {
  if (typeof options.filename !== "string") throw new BlkError("EINVAL", "Parameter 'filename' is missing");
  if (options["pr-manager"] !== undefined) {
    throw new BlkError("ENOTSUP", "pr-manager is not supported by blk's file driver");
  }
  if (cacheDirect) {
    throw new BlkError(
      "ENOTSUP",
      "cache.direct=on is not supported by blk's file driver (O_DIRECT needs aligned buffers)",
    );
  }
}

/**
 * Opens the file: read-write unless `readOnly` (with `autoReadOnly`, a read-write open refused by the
 * OS falls back to read-only).
 * @throws {BlkError} ENOENT/EACCES/EROFS `Could not open 'PATH': <reason>`
 */
async function openFile(
  options: FileOptions,
  ctx: OpenContext & FileOpenExtras,
  sys: FileSyscalls | null,
): Promise<FileState> {
  checkOptions(options, ctx.cacheDirect === true);
  const filename = options.filename;
  if (filename === "") throw new BlkError("EINVAL", "The 'file' block driver requires a file name");
  let readOnly = ctx.readOnly;
  let fh: FileHandle;
  try {
    fh = await open(filename, readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR);
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    if (!readOnly && ctx.autoReadOnly && (code === "EACCES" || code === "EROFS" || code === "EPERM")) {
      try {
        fh = await open(filename, fsConstants.O_RDONLY);
        readOnly = true;
      } catch (e2) {
        throw fsError(e2, `Could not open '${filename}'`);
      }
    } else {
      throw fsError(e, `Could not open '${filename}'`);
    }
  }
  try {
    const st = await fh.stat();
    // QEMU's file driver takes regular files only (devices go to its host_device driver, which blk's
    // file driver stands in for).
    if (!st.isFile() && !st.isBlockDevice() && !st.isCharacterDevice()) {
      throw new BlkError("EINVAL", `'file' driver requires '${filename}' to be a regular file`);
    }
    const locking = options.locking ?? "auto";
    if (sys === null && locking === "on") warnNoSyscalls();
    return new FileState({ fh, filename, size: st.size, readOnly, sys, locking: locking !== "off" });
  } catch (e) {
    await fh.close();
    throw e;
  }
}

/**
 * Creates (or truncates to empty and re-sizes) an image file with QEMU's `file` creation semantics:
 * the file is grown from empty with the requested preallocation, and its first 4 KiB are allocated.
 * @throws {BlkError} EINVAL for a bad size; ENOTSUP for `preallocation=metadata`; EAGAIN (ImageLockError)
 *   when another process uses the file
 */
async function createFile(options: FileCreateOptions, sys: FileSyscalls | null): Promise<void> {
  const size = options.size;
  if (!Number.isSafeInteger(size) || size < 0) throw new BlkError("EINVAL", "Invalid image size specified");
  const prealloc = options.preallocation ?? "off";
  if (prealloc === "metadata") throw new BlkError("ENOTSUP", "Unsupported preallocation mode: metadata");
  const filename = options.filename;
  let fh: FileHandle;
  try {
    fh = await open(filename, fsConstants.O_RDWR | fsConstants.O_CREAT, 0o644);
  } catch (e) {
    throw fsError(e, `Could not create '${filename}'`);
  }
  const state = new FileState({ fh, filename, size: 0, readOnly: false, sys, locking: false });
  try {
    if (sys !== null && (options.locking ?? "auto") !== "off") {
      // As QEMU: before clearing the file, take write+resize without sharing resize, so that an image in
      // use by another process is refused (`Failed to get "write" lock`) instead of destroyed.
      new ImageLocks(sys, fh.fd, filename).check(PERM.WRITE | PERM.RESIZE, PERM_ALL & ~PERM.RESIZE);
    }
    try {
      await fh.truncate(0);
    } catch (e) {
      throw fsError(e, `Could not resize file`);
    }
    if (size > 0) await state.truncate(size, { preallocation: prealloc });
  } finally {
    await state.close();
  }
}

/**
 * Builds a `file` driver. {@link fileDriver} is the default one; tests pass `syscalls: null` to exercise
 * the fallbacks.
 */
export function makeFileDriver(config: FileDriverConfig = {}): BlockDriver<FileOptions> & {
  create(options: FileCreateOptions): Promise<void>;
} {
  const sys = (): FileSyscalls | null => {
    if (config.syscalls !== undefined) return config.syscalls;
    const s = loadSyscalls();
    if (s === null) warnNoSyscalls();
    return s;
  };
  return {
    format: "file",
    kind: "protocol",
    schema: fileSchema,
    open: (options: FileOptions, ctx: OpenContext): Promise<FileState> => openFile(options, ctx, sys()),
    create: (options: FileCreateOptions): Promise<void> => createFile(options, sys()),
  };
}

/** Validates `file` blockdev options with QEMU's wording (`BlockdevOptionsFile`). */
export const fileSchema: { parse(value: unknown): FileOptions } = {
  parse(value: unknown): FileOptions {
    const o = expectObject(value);
    const out: FileOptions = { filename: expectString(o, "filename", true) };
    const locking = expectEnum(o, "locking", ["auto", "on", "off"] as const);
    if (locking !== undefined) out.locking = locking;
    const aio = expectEnum(o, "aio", ["threads", "native", "io_uring"] as const);
    if (aio !== undefined) out.aio = aio;
    const batch = expectInt(o, "aio-max-batch");
    if (batch !== undefined) out["aio-max-batch"] = batch;
    const drop = expectBool(o, "drop-cache");
    if (drop !== undefined) out["drop-cache"] = drop;
    const chk = expectBool(o, "x-check-cache-dropped");
    if (chk !== undefined) out["x-check-cache-dropped"] = chk;
    const pr = expectString(o, "pr-manager", false);
    if (pr !== undefined) out["pr-manager"] = pr;
    rejectUnexpected(o, [
      "filename",
      "locking",
      "aio",
      "aio-max-batch",
      "drop-cache",
      "x-check-cache-dropped",
      "pr-manager",
    ]);
    return out;
  },
};

/*
 * Positional read and write on the descriptor with the callback API: FileHandle.read/write cost about
 * twice the CPU per request (each allocates a promise request object with its own stats array and a
 * global handle), a third of the event loop's time for 4 KiB reads over NBD (profiled). The handle stays
 * open while requests run (the node drains before close and reopen).
 */
function pread(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsRead(fd, buf, off, len, pos, (e, n) => (e ? reject(e) : resolve(n)));
  });
}

function pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsWrite(fd, buf, off, len, pos, (e, n) => (e ? reject(e) : resolve(n)));
  });
}

/** The `file` protocol driver. */
export const fileDriver: BlockDriver<FileOptions> & { create(options: FileCreateOptions): Promise<void> } =
  makeFileDriver();

/**
 * A buffer of `bytes` bytes whose first byte sits on an `alignment` boundary in memory (default 4096: a
 * page). The kernel copies page-aligned buffers to and from the page cache markedly faster than the
 * 16-byte-aligned memory a plain `new Uint8Array` gets, so bulk copies (the copy engine's chunk buffers)
 * should use these. Without the FFI, a plain buffer.
 */
export function alignedBuffer(bytes: number, alignment = 4096): Uint8Array {
  const sys = loadSyscalls();
  if (sys?.addressOf === undefined || alignment <= 1) return new Uint8Array(bytes);
  const raw = new Uint8Array(bytes + alignment);
  const skip = (alignment - (sys.addressOf(raw) % alignment)) % alignment;
  return raw.subarray(skip, skip + bytes);
}

let hugePageSize: number | null | undefined;

/**
 * The size of a transparent huge page when the kernel hands them out on request (`madvise` or `always`
 * in `/sys/kernel/mm/transparent_hugepage/enabled`), else `null`. Read once.
 */
export function transparentHugePageSize(): number | null {
  if (hugePageSize !== undefined) return hugePageSize;
  hugePageSize = null;
  try {
    const thp = "/sys/kernel/mm/transparent_hugepage";
    const enabled = readFileSync(`${thp}/enabled`, "utf8");
    const size = Number(readFileSync(`${thp}/hpage_pmd_size`, "utf8").trim());
    if (!enabled.includes("[never]") && Number.isSafeInteger(size) && size >= 4096) hugePageSize = size;
  } catch {
    // No THP (another OS, an old kernel, no /sys): plain pages.
  }
  return hugePageSize;
}

/**
 * A buffer for bulk copies of `bytes` bytes (at least a huge page, and long-lived: the copy engine's chunk
 * buffers): aligned to a transparent huge page and advised to use them (`MADV_HUGEPAGE`), so the kernel's
 * copies to and from the page cache walk one mapping per 2 MiB instead of 512 (in a plain Node copy loop
 * on a 2-core VM, ~14% less CPU than page-aligned buffers). Smaller buffers, and systems without huge
 * pages or without the FFI, get {@link alignedBuffer}. Allocates up to one huge page more address space
 * than `bytes`; this function does not use what lies outside the buffer.
 */
export function hugePageBuffer(bytes: number): Uint8Array {
  const sys = loadSyscalls();
  const huge = transparentHugePageSize();
  if (sys?.addressOf === undefined || sys.adviseHugePages === undefined || huge === null || bytes < huge) {
    return alignedBuffer(bytes);
  }
  const raw = new Uint8Array(bytes + huge);
  const skip = (huge - (sys.addressOf(raw) % huge)) % huge;
  const buf = raw.subarray(skip, skip + bytes);
  // Advice only: refused (EINVAL on a kernel built without THP), the buffer works as it is.
  sys.adviseHugePages(buf);
  return buf;
}

/** The size of a file in bytes (a convenience for tools). */
export async function fileSize(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch (e) {
    throw fsError(e, `Could not open '${path}'`);
  }
}
