/**
 * The stable string codes an {@link HBitmapError} carries, each with what it means here. QEMU asserts on
 * these conditions; blk throws instead so a caller's mistake never corrupts a bitmap.
 */
export const HBITMAP_ERROR_CODES = {
  /** Invalid argument: not a non-negative safe integer, a misaligned reset or serialization chunk, a bad granularity or chunk size. */
  EINVAL: "EINVAL",
  /** Out of range: a granule past the end of the bitmap, more than 2^41 bits, or a buffer too small. */
  ERANGE: "ERANGE",
  /** Already exists: a meta bitmap was created twice without `freeMeta()` in between. */
  EEXIST: "EEXIST",
  /** Not supported: serialization of a bitmap whose granularity is 58 or more. */
  ENOTSUP: "ENOTSUP",
} as const;

/** The stable string codes an {@link HBitmapError} carries. */
export type HBitmapErrorCode = keyof typeof HBITMAP_ERROR_CODES;

const kHBitmapError = Symbol.for("@blk/hbitmap/error");

/**
 * The error class of `@blk/hbitmap` (a leaf package, so it does not use `@blk/core`'s `BlkError`). Test
 * `code`, never the message. `instanceof` works across two installed copies (a `Symbol.for` brand).
 * @example
 * try { bitmap.reset(1, 3); } catch (e) { if (isHBitmapError(e, "EINVAL")) { ... } }
 */
export class HBitmapError extends Error {
  override readonly name = "HBitmapError";
  /** Stable machine-readable code. */
  readonly code: HBitmapErrorCode;
  constructor(code: HBitmapErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    // A computed class member would break isolatedDeclarations (TS9038), so the brand is defined here.
    Object.defineProperty(this, kHBitmapError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kHBitmapError in v;
  }
}

/** True when `v` is an {@link HBitmapError} (of `code`, when given). */
export const isHBitmapError = (v: unknown, code?: HBitmapErrorCode): v is HBitmapError =>
  v instanceof HBitmapError && (code === undefined || v.code === code);
