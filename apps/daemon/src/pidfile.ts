/**
 * qemu-storage-daemon's `--pidfile`: the file is created (mode 0600, not truncated), write-locked as a
 * whole for as long as the daemon runs — so a second daemon given the same file fails with `Cannot lock
 * pid file` and leaves it alone —, checked to still be the file at that path, truncated and written with
 * the pid and a newline; on exit it is removed by its resolved path. The lock is an open-file-description
 * lock through the file driver's FFI bindings (Node has no file locks), which conflicts with QEMU's
 * `F_SETLK` lock; when they cannot load, the file is written unlocked and a warning logged.
 */
import {
  closeSync,
  constants,
  fstatSync,
  ftruncateSync,
  openSync,
  realpathSync,
  statSync,
  unlinkSync,
  writeSync,
} from "node:fs";
import { constants as osConstants } from "node:os";
import { type BlkErrorCode, ERRNO, strerror } from "@blk/core";
import { loadSyscalls } from "@blk/drivers/file";

/** glibc's texts for the errno values a pid file can meet that `@blk/core` does not list. */
const MORE_STRERROR: Readonly<Record<string, string>> = {
  ENOTDIR: "Not a directory",
  EISDIR: "Is a directory",
  ELOOP: "Too many levels of symbolic links",
  ENAMETOOLONG: "File name too long",
  EDQUOT: "Disk quota exceeded",
  ETXTBSY: "Text file busy",
  EOPNOTSUPP: "Operation not supported",
  ENOLCK: "No locks available",
};

/** The `strerror` text of an errno name (`ENOENT`), as QEMU prints it. */
function errnoText(code: string | undefined, fallback = "Unknown error"): string {
  if (code === undefined) return fallback;
  if (code in ERRNO) return strerror(code as BlkErrorCode);
  return MORE_STRERROR[code] ?? fallback;
}

const errnoName = (errno: number): string | undefined =>
  Object.entries(osConstants.errno).find(([, v]) => v === errno)?.[0];

/** Why a pid file could not be created; `message` is QEMU's (main prefixes `cannot create PID file: `). */
export class PidFileError extends Error {
  override readonly name = "PidFileError";
  /** False for the message QEMU prints without the `cannot create PID file: ` prefix. */
  readonly prefixed: boolean;
  constructor(message: string, prefixed = true) {
    super(message);
    this.prefixed = prefixed;
  }
}

type WriteLock = (fd: number) => number;

let cachedLock: WriteLock | null | undefined;

/**
 * `fcntl(fd, F_OFD_SETLK, {F_WRLCK, SEEK_SET, 0, 0})` → 0 or `-errno`, through the file driver's FFI
 * bindings; `null` where they cannot load (not Linux, no koffi).
 */
function loadWriteLock(): WriteLock | null {
  if (cachedLock !== undefined) return cachedLock;
  const sys = loadSyscalls();
  const F_WRLCK = 1;
  cachedLock = sys === null ? null : (fd) => sys.ofdSetLock(fd, F_WRLCK, 0, 0);
  return cachedLock;
}

const codeOf = (e: unknown): string | undefined => (e as NodeJS.ErrnoException).code;

/** A written, locked pid file. */
export class PidFile {
  readonly #fd: number;
  readonly #realPath: string;
  #removed = false;

  private constructor(fd: number, realPath: string) {
    this.#fd = fd;
    this.#realPath = realPath;
  }

  /** The file's resolved path (what {@link PidFile.remove} unlinks). */
  get path(): string {
    return this.#realPath;
  }

  /**
   * Creates, locks and writes `path` as qemu-storage-daemon does.
   * @param warn called once when the file cannot be locked for want of the FFI
   * @throws {PidFileError} `Could not create 'P': …`, `Cannot lock pid file: …`, `Failed to truncate pid
   *   file: …`, `Failed to write pid file`, or (unprefixed) `cannot resolve PID file path: P: …`
   */
  static create(path: string, warn: (msg: string) => void = () => {}): PidFile {
    const lock = loadWriteLock();
    if (lock === null) warn("pid file not locked: the koffi FFI could not be loaded");
    let fd: number;
    for (;;) {
      try {
        fd = openSync(path, constants.O_WRONLY | constants.O_CREAT, 0o600);
      } catch (e) {
        throw new PidFileError(`Could not create '${path}': ${errnoText(codeOf(e), (e as Error).message)}`);
      }
      let ino: number;
      try {
        ino = fstatSync(fd).ino;
      } catch (e) {
        closeSync(fd);
        throw new PidFileError(`Cannot stat file: ${errnoText(codeOf(e), (e as Error).message)}`);
      }
      const r = lock?.(fd) ?? 0;
      if (r < 0) {
        closeSync(fd);
        throw new PidFileError(`Cannot lock pid file: ${errnoText(errnoName(-r))}`);
      }
      // Another process may have removed or replaced the file between our open and our lock.
      let now: number | undefined;
      try {
        now = statSync(path).ino;
      } catch {
        now = undefined;
      }
      if (now === ino) break;
      closeSync(fd);
    }
    const fail = (message: string): never => {
      try {
        unlinkSync(path);
      } catch {
        // already gone
      }
      closeSync(fd);
      throw new PidFileError(message);
    };
    try {
      ftruncateSync(fd, 0);
    } catch (e) {
      fail(`Failed to truncate pid file: ${errnoText(codeOf(e), (e as Error).message)}`);
    }
    const text = Buffer.from(`${process.pid}\n`);
    try {
      if (writeSync(fd, text, 0, text.length, 0) !== text.length) fail("Failed to write pid file");
    } catch {
      fail("Failed to write pid file");
    }
    let realPath: string;
    try {
      realPath = realpathSync(path);
    } catch (e) {
      try {
        unlinkSync(path);
      } catch {
        // already gone
      }
      closeSync(fd);
      throw new PidFileError(
        `cannot resolve PID file path: ${path}: ${errnoText(codeOf(e), (e as Error).message)}`,
        false,
      );
    }
    return new PidFile(fd, realPath);
  }

  /** Removes the file (while still holding its lock), then releases the lock. Idempotent. */
  remove(): void {
    if (this.#removed) return;
    this.#removed = true;
    try {
      unlinkSync(this.#realPath);
    } catch {
      // already gone
    }
    try {
      closeSync(this.#fd);
    } catch {
      // already closed
    }
  }
}
