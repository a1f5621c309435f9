/**
 * Linux errno values. QEMU's negative return values and the NBD wire error codes use these whatever the
 * host OS, so they are fixed here rather than read from `os.constants.errno` (which varies by platform
 * and lacks ENOMEDIUM).
 */
export const ERRNO = {
  /** Operation not permitted (a write to a read-only node or export). */
  EPERM: 1,
  /** No such file or directory. */
  ENOENT: 2,
  /** Input/output error: the generic I/O failure. */
  EIO: 5,
  /** Resource temporarily unavailable (an image lock is held elsewhere). */
  EAGAIN: 11,
  /** Out of memory (a metadata table larger than a configured limit). */
  ENOMEM: 12,
  /** Permission denied. */
  EACCES: 13,
  /** Busy: the node or bitmap is in use by a job or export. */
  EBUSY: 16,
  /** Already exists. */
  EEXIST: 17,
  /** Invalid argument: bad option, malformed request or URL. */
  EINVAL: 22,
  /** File too large: beyond a format's or the platform's limit. */
  EFBIG: 27,
  /** No space left on device. */
  ENOSPC: 28,
  /** Read-only file system. */
  EROFS: 30,
  /** Range overflow (an offset beyond 2^53 or a length that does not fit). */
  EOVERFLOW: 75,
  /** Operation not supported by this driver or image. */
  ENOTSUP: 95,
  /** Transport endpoint shut down (an NBD server going away). */
  ESHUTDOWN: 108,
  /** Connection timed out. */
  ETIMEDOUT: 110,
  /** No medium found (a node without a usable child). */
  ENOMEDIUM: 123,
  /** Operation cancelled (a job or request cancelled). */
  ECANCELED: 125,
} as const;

/** glibc's `strerror` text of each code (QEMU prints these, e.g. in a failed job's `error`). */
const STRERROR: Readonly<Record<keyof typeof ERRNO, string>> = {
  EPERM: "Operation not permitted",
  ENOENT: "No such file or directory",
  EIO: "Input/output error",
  EAGAIN: "Resource temporarily unavailable",
  ENOMEM: "Cannot allocate memory",
  EACCES: "Permission denied",
  EBUSY: "Device or resource busy",
  EEXIST: "File exists",
  EINVAL: "Invalid argument",
  EFBIG: "File too large",
  ENOSPC: "No space left on device",
  EROFS: "Read-only file system",
  EOVERFLOW: "Value too large for defined data type",
  ENOTSUP: "Operation not supported",
  ESHUTDOWN: "Cannot send after transport endpoint shutdown",
  ETIMEDOUT: "Connection timed out",
  ENOMEDIUM: "No medium found",
  ECANCELED: "Operation canceled",
};

/**
 * The Linux `strerror` text of `code`, as QEMU prints it.
 * @example strerror("EIO") // "Input/output error"
 */
export function strerror(code: BlkErrorCode): string {
  return STRERROR[code];
}

/** The stable string codes a {@link BlkError} carries. */
export type BlkErrorCode = keyof typeof ERRNO;

const kBlkError = Symbol.for("@blk/error");

/** Options for {@link BlkError}. */
export interface BlkErrorOptions {
  cause?: unknown;
  /** The byte offset the error concerns, when there is one. */
  offset?: number;
}

/**
 * The one error class of blk. Test `code`, never the message; where QEMU's exact message is part of the
 * contract (option validation, gluster URLs, QMP errors) the message is QEMU's. `instanceof` works across
 * two installed copies of the package (a `Symbol.for` brand).
 * @example
 * throw new BlkError("EINVAL", "Parameter 'size' is missing");
 */
export class BlkError extends Error {
  override readonly name = "BlkError";
  readonly code: BlkErrorCode;
  /** Negative errno, as QEMU returns it. */
  readonly errno: number;
  readonly offset: number | undefined;
  constructor(code: BlkErrorCode, message: string, options?: BlkErrorOptions) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.errno = -ERRNO[code];
    this.offset = options?.offset;
    // A computed class member would break isolatedDeclarations (TS9038), so the brand is defined here.
    Object.defineProperty(this, kBlkError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kBlkError in v;
  }
}

/** True when `v` is a {@link BlkError} (of `code`, when given). */
export const isBlkError = (v: unknown, code?: BlkErrorCode): v is BlkError =>
  v instanceof BlkError && (code === undefined || v.code === code);

/** Wraps anything thrown into a {@link BlkError}, keeping BlkErrors as they are and the original as `cause`. */
export function toBlkError(e: unknown, code: BlkErrorCode = "EIO", message?: string): BlkError {
  if (isBlkError(e)) return e;
  const msg = message ?? (e instanceof Error ? e.message : String(e));
  return new BlkError(code, msg, { cause: e });
}
