/** Stable string codes carried by {@link NotifierError}. */
export type NotifierErrorCode =
  /** An argument is out of range (negative offset, non-integer length, bad alignment). */
  "EINVAL";

const kNotifierError = Symbol.for("@blk/notifiers/error");

/**
 * The error class of `@blk/notifiers`. This package is a leaf (no dependencies), so it cannot use
 * `BlkError`; like it, the class carries a stable string `code` and a `Symbol.for` brand, so `instanceof`
 * works across two installed copies. Test `code`, not the message.
 * @example
 * throw new NotifierError("EINVAL", "offset must be a non-negative integer");
 */
export class NotifierError extends Error {
  override readonly name = "NotifierError";
  readonly code: NotifierErrorCode;
  constructor(code: NotifierErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    // A computed class member would break isolatedDeclarations (TS9038), so the brand is defined here.
    Object.defineProperty(this, kNotifierError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kNotifierError in v;
  }
}

/** True when `v` is a {@link NotifierError} (of `code`, when given). */
export function isNotifierError(v: unknown, code?: NotifierErrorCode): v is NotifierError {
  if (!(v instanceof NotifierError)) return false;
  const actual: string = v.code; // widened: the code union may grow
  return code === undefined || actual === code;
}
