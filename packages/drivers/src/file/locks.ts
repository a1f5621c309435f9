/**
 * QEMU-compatible image locks (QEMU's file-posix "perm lock bytes"): an open file description holds a
 * shared OFD lock on byte `100 + bit` for every permission it uses and on byte `200 + bit` for every
 * permission it does not let others use. Another process conflicts when it wants a permission whose
 * "unshared" byte is locked elsewhere, or refuses to share a permission whose "used" byte is locked
 * elsewhere. Bits are QEMU's `BLK_PERM_*` (consistent read 0, write 1, write unchanged 2, resize 3).
 */
import { BlkError } from "@blk/core";
import { F_RDLCK, F_UNLCK, F_WRLCK, type FileSyscalls } from "./sys.ts";

/** First byte of the "permission used" range. */
export const LOCK_BASE_PERM = 100;
/** First byte of the "permission not shared" range. */
export const LOCK_BASE_SHARED = 200;
const NBITS = 4;
const ALL = 0x0f;
/** How QEMU names each permission bit in lock messages. */
const NAMES = ["consistent read", "write", "write unchanged", "resize"] as const;

/** Byte numbers locked for a permission state (for tests and `/proc/locks` comparisons). */
export function lockBytes(perm: number, shared: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < NBITS; i++) if ((perm & (1 << i)) !== 0) out.push(LOCK_BASE_PERM + i);
  for (let i = 0; i < NBITS; i++) if ((~shared & (1 << i)) !== 0) out.push(LOCK_BASE_SHARED + i);
  return out;
}

/**
 * The lock state of one open file. `check` tests and takes what a new permission state needs (keeping
 * the old locks), `commit` settles on it (releasing what is no longer needed), `abort` goes back to the
 * committed state: QEMU's prepare/commit/abort.
 */
export class ImageLocks {
  readonly #sys: FileSyscalls;
  readonly #fd: number;
  readonly #filename: string;
  /** Committed permissions. */
  #perm = 0;
  #shared = ALL;
  /** Bytes actually held: bit i = byte 100+i; bit 4+i = byte 200+i. */
  #held = 0;

  constructor(sys: FileSyscalls, fd: number, filename: string) {
    this.#sys = sys;
    this.#fd = fd;
    this.#filename = filename;
  }

  /** The committed permissions. */
  get perm(): number {
    return this.#perm;
  }
  get shared(): number {
    return this.#shared;
  }

  /**
   * Locks the bytes for `perm`/`~shared` and releases the others when `unlock`.
   * @throws {BlkError} EIO `Failed to lock byte N`
   */
  #apply(perm: number, unshared: number, unlock: boolean): void {
    for (let i = 0; i < 2 * NBITS; i++) {
      const want = i < NBITS ? (perm >> i) & 1 : (unshared >> (i - NBITS)) & 1;
      const byte = i < NBITS ? LOCK_BASE_PERM + i : LOCK_BASE_SHARED + i - NBITS;
      const has = (this.#held >> i) & 1;
      if (want === 1 && has === 0) {
        const r = this.#sys.ofdSetLock(this.#fd, F_RDLCK, byte, 1);
        if (r < 0)
          throw new BlkError(r === -11 || r === -13 ? "EAGAIN" : "EIO", `Failed to lock byte ${byte}`);
        this.#held |= 1 << i;
      } else if (want === 0 && has === 1 && unlock) {
        const r = this.#sys.ofdSetLock(this.#fd, F_UNLCK, byte, 1);
        if (r < 0) throw new BlkError("EIO", `Failed to unlock byte ${byte}`);
        this.#held &= ~(1 << i);
      }
    }
  }

  /**
   * Tests whether another open file description conflicts with `perm`/`shared`.
   * @throws {BlkError} EAGAIN with QEMU's message
   */
  #test(perm: number, shared: number): void {
    for (let i = 0; i < NBITS; i++) {
      if ((perm & (1 << i)) === 0) continue;
      const r = this.#sys.ofdGetLock(this.#fd, F_WRLCK, LOCK_BASE_SHARED + i, 1);
      if (r !== F_UNLCK) throw this.#conflict(`Failed to get "${NAMES[i]}" lock`);
    }
    for (let i = 0; i < NBITS; i++) {
      if ((shared & (1 << i)) !== 0) continue;
      const r = this.#sys.ofdGetLock(this.#fd, F_WRLCK, LOCK_BASE_PERM + i, 1);
      if (r !== F_UNLCK) throw this.#conflict(`Failed to get shared "${NAMES[i]}" lock`);
    }
  }

  #conflict(message: string): BlkError {
    return new ImageLockError(message, `Is another process using the image [${this.#filename}]?`);
  }

  /**
   * Prepares `perm`/`shared`: takes the additional lock bytes and tests for conflicts. On a conflict the
   * committed state is restored and the error thrown.
   * @throws {ImageLockError} EAGAIN `Failed to get "write" lock` / `Failed to get shared "write" lock`
   */
  check(perm: number, shared: number): void {
    if ((this.#perm | perm) === this.#perm && (this.#shared & shared) === this.#shared) return;
    try {
      this.#apply(this.#perm | perm, ~this.#shared | ~shared, false);
      this.#test(perm, shared);
    } catch (e) {
      this.abort();
      throw e;
    }
  }

  /** Settles on `perm`/`shared` (takes and releases bytes). Never throws. */
  commit(perm: number, shared: number): void {
    try {
      this.#apply(perm, ~shared, true);
    } catch {
      // QEMU ignores failures here as well: the stricter lock stays.
    }
    this.#perm = perm;
    this.#shared = shared;
  }

  /** Goes back to the committed state. Never throws. */
  abort(): void {
    try {
      this.#apply(this.#perm, ~this.#shared, true);
    } catch {
      // Releasing cannot usefully fail.
    }
  }
}

/**
 * A lock conflict with another process: `message` is QEMU's error (what QMP's `desc` shows) and `hint`
 * the line QEMU's tools print after it.
 */
export class ImageLockError extends BlkError {
  /** `Is another process using the image [PATH]?` */
  readonly hint: string;
  constructor(message: string, hint: string) {
    super("EAGAIN", message);
    this.hint = hint;
  }
}
