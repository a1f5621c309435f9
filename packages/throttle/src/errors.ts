/**
 * Stable string codes carried by {@link ThrottleError}.
 * - `EINVAL`: invalid limits or arguments (QEMU's exact message where QEMU has one);
 * - `EBUSY`: a group member still has queued requests;
 * - `ENOENT`: no such throttle group or property.
 */
export type ThrottleErrorCode = "EINVAL" | "EBUSY" | "ENOENT";

const kThrottleError = Symbol.for("@blk/throttle/error");

/**
 * The error class of `@blk/throttle`. This package is a leaf (no dependencies), so it cannot use
 * `BlkError`; like it, the class carries a stable string `code` and a `Symbol.for` brand, so `instanceof`
 * works across two installed copies. Validation errors carry QEMU's exact message (a `GenericError` in
 * QMP).
 * @example
 * throw new ThrottleError("EINVAL", "the burst length cannot be 0");
 */
export class ThrottleError extends Error {
  override readonly name = "ThrottleError";
  readonly code: ThrottleErrorCode;
  constructor(code: ThrottleErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    // A computed class member would break isolatedDeclarations (TS9038), so the brand is defined here.
    Object.defineProperty(this, kThrottleError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kThrottleError in v;
  }
}

/** True when `v` is a {@link ThrottleError} (of `code`, when given). */
export const isThrottleError = (v: unknown, code?: ThrottleErrorCode): v is ThrottleError =>
  v instanceof ThrottleError && (code === undefined || v.code === code);
