/**
 * Protocol errors: the byte stream broke the NBD framing (or a limit), so the connection is dead.
 * Per-request failures are not protocol errors: they are `BlkError`s mapped to NBD errno values
 * (see `errnoToNbd` / `nbdToBlkErrorCode`), and the connection carries on.
 */

/** Why a stream was refused. */
export type NbdProtocolErrorReason =
  | "BAD_MAGIC"
  | "BAD_FLAGS"
  | "TOO_BIG"
  | "TOO_LONG"
  | "BAD_LENGTH"
  | "BAD_VALUE"
  | "UNEXPECTED"
  | "FAILED";

const kNbdProtocolError = Symbol.for("@blk/nbd-protocol-error");

/**
 * The peer broke the protocol (bad magic, impossible length, a limit exceeded) or the stream is unusable:
 * the connection must be dropped. The message names the field or limit that failed.
 */
export class NbdProtocolError extends Error {
  override readonly name = "NbdProtocolError";
  readonly reason: NbdProtocolErrorReason;
  constructor(reason: NbdProtocolErrorReason, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.reason = reason;
    Object.defineProperty(this, kNbdProtocolError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kNbdProtocolError in v;
  }
}
